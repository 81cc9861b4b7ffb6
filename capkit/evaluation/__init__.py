"""
Evaluation: scoring captions against references (metrics.py), evaluating a captioner on a split (evaluator.py) and
the HTML report of an evaluation (report.py). Imports the models, the data and the shared leaves.
"""
