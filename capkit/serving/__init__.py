"""
What serve.py is built from: admission control (admission.py: body bytes in flight, body deadlines, idle
connections), dynamic batching (batcher.py) and the operator's counters (metrics.py). Nothing else in capkit
imports these; they import nothing of capkit's.
"""
import re

SERVING = re.compile(r"^serving .* at (http://\S+/)$")  # the line serve.py prints once it serves (loadtest waits)
