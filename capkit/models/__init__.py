"""
The models: what every captioner is (captioner.py: its config, decoding settings, interface and loss), the frozen
image encoders (encoders.py), the trainable mappers (mappers.py), the frozen decoder LM (decoders.py), the GIT /
BLIP adapter path (hf_captioner.py) and retrieval over a datastore (retrieval.py). The main path's joint model,
PrefixCaptioner, is model.py at the root. Imports the data part and the shared leaves.
"""
