"""
capkit's library, by part (capkit/README.md is the map, with one training step traced file by file):

    data/        images, captioned folders, shards and streams -> batches; frozen-encoder features, cached
    models/      the captioner interface, the encoders, the mappers, the decoders, GIT / BLIP, retrieval
    evaluation/  metrics, evaluating a captioner on a split, the HTML report
    training/    train.py's hyperparameters checked and read as meant, --help, resume
    serving/     serve.py's admission control, dynamic batching and counters

and the shared leaves every part may use: errors, files (safe reads, atomic writes), hub (local paths and the
Hugging Face Hub), runtime (device, compile, versions), cli (the scripts' argument types), checkpoints (a
checkpoint's names, format tags and metadata), names (the old names capkit still reads).
"""
