"""
Load a trained captioner from a checkpoint and caption an image.

    python load_model_example.py saved_models/model_state_dict_20261122_120000-3.pth photo.jpg
    python load_model_example.py saved_models/adapter_20261122_120000-3 photo.jpg     # git / blip adapter
    python load_model_example.py                 # newest checkpoint in saved_models/, its first test image

In your own code or a notebook:

    from load_model_example import load_model_from_checkpoint
    model, metadata, hyperparams = load_model_from_checkpoint("saved_models/model_state_dict_....pth", "cuda")
    captions = model.generate(pixel_values)      # or caption_images(model, ["a.jpg", "b.jpg"])

The .pth holds only the trained MLP and the model config; the frozen backbones are rebuilt from
their hub ids / local folders named in that config. Loading uses torch.load(weights_only=True):
a checkpoint can't run code on your machine. An adapter folder (git / blip) holds the PEFT adapter
(safetensors) + processor + capkit_config.json; its base model is rebuilt the same way. A merged
folder (train.py --merge_weights) is a standalone model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from checkpoints import checkpoint_globs, metadata_path_for
from dataset import SkipLog, image_problem, load_rgb, load_splits
from common import pick_device, tsv_line
from errors import MissingInputError, NothingReadable, RefusedFileError, run_cli
from model import Generation, load_captioner
from safeio import read_json


def load_model_from_checkpoint(path, device="cpu", datastore=None,
                               **config_overrides) -> tuple[torch.nn.Module, dict, dict]:
    """-> (model in eval mode on device, training metadata (or {} if its JSON is missing), hyperparameters).
    datastore: for a model trained with retrieval, another folder of captioned images (or a saved datastore file)
    to retrieve from instead of the one saved beside the checkpoint."""
    model = load_captioner(path, device, datastore=datastore, **config_overrides)
    meta_path = metadata_path_for(path)
    metadata = read_json(meta_path, "training metadata", RefusedFileError) if meta_path.exists() else {}
    if not isinstance(metadata, dict) or not isinstance(metadata.get("hyperparameters", {}), dict):
        raise RefusedFileError(f"{meta_path}: not a capkit training metadata file (a JSON object with "
                               "'hyperparameters' expected); move it away to load the checkpoint without it")
    return model, metadata, metadata.get("hyperparameters", {})


@torch.no_grad()
def caption_images(model, paths, batch_size: int = 16, **gen_kwargs) -> list[str]:
    out = []
    for s in range(0, len(paths), batch_size):
        pixels = torch.stack([model.preprocess(load_rgb(p)) for p in paths[s:s + batch_size]])
        out += model.generate(pixel_values=pixels, **gen_kwargs)
    return out


def newest_checkpoint(folder="saved_models") -> Path | None:
    """The newest checkpoint (.pth or adapter folder) whose metadata JSON exists (= it was completely written)."""
    ckpts = [p for pattern in checkpoint_globs() for p in Path(folder).glob(pattern)
             if not p.name.startswith(".") and metadata_path_for(p).exists()]
    return max(ckpts, key=lambda p: p.stat().st_mtime) if ckpts else None


def run(argv) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    ckpt = argv[0] if argv else newest_checkpoint()
    if ckpt is None:
        raise MissingInputError("no checkpoint given and none in saved_models/ (run: python train.py --preset demo)")
    model, metadata, hp = load_model_from_checkpoint(ckpt, pick_device("auto"))
    print(f"loaded {ckpt}: epoch {metadata.get('epoch')}, val loss {metadata.get('val_loss')}, "
          f"ROUGE-L {metadata.get('rouge_l')}")
    if len(argv) > 1:
        images = argv[1:]
    else:
        images = load_splits(hp, SkipLog(), which=("test",))["test"].images[:3]
    readable = []
    for p in images:  # a missing or unreadable image is named, the others are still captioned
        try:
            load_rgb(p)
            readable.append(str(p))
        except Exception as e:  # whatever decoding a stranger's file raises: that image is skipped
            print(f"skipped {p}: {image_problem(e)}", file=sys.stderr)
    if not readable:
        raise NothingReadable(f"none of the {len(images)} images could be read")
    captions = caption_images(model, readable, max_new_tokens=hp.get("max_new_tokens", Generation.max_new_tokens))
    for path, caption in zip(readable, captions):
        print(tsv_line(path, caption))
    return 0


def main(argv=None) -> int:
    """The command line: expected failures end in one paragraph and their exit code (errors.py)."""
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
