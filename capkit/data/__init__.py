"""
The data: images read safely (images.py), captioned folders (folders.py), Karpathy's split files
(karpathy.py), shards (shards.py) and streams over them
(streams.py), the synthetic demo sets (shapes.py), samples -> batches (batching.py), and the frozen encoder's
features computed once and cached (features.py, shard_features.py). Imports only the shared leaves.
"""
