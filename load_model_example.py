"""
Load a trained captioner from a checkpoint and caption some images: the example to copy into your own code.

    python load_model_example.py saved_models/model_state_dict_20261122_120000-3.pth photo.jpg
    python load_model_example.py saved_models/adapter_20261122_120000-3 photo.jpg     # git / blip adapter
    python load_model_example.py                 # the newest checkpoint in saved_models/, its first test images

In your own code or a notebook:

    from load_model_example import load_model_from_checkpoint
    model, metadata, hyperparams = load_model_from_checkpoint("saved_models/model_state_dict_<run>-<epoch>.pth", device)

The .pth holds only the trained mapper and the model config; the frozen backbones are rebuilt from
the hub ids / local folders that config names. Loading uses torch.load(weights_only=True): a checkpoint can't
run code on your machine. An adapter folder (git / blip) holds the PEFT adapter + processor + capkit_config.json.
"""
from __future__ import annotations

import sys

import torch

from capkit.checkpoints import newest_checkpoint
from capkit.cli import tsv_line
from capkit.data.images import SkipLog, image_problem, load_rgb
from capkit.errors import MissingInputError, NothingReadable, run_cli
from capkit.models.captioner import Generation
from capkit.runtime import pick_device
from dataset import load_splits
from model import load_checkpoint


def load_model_from_checkpoint(path, device="cpu"):
    """A checkpoint (.pth, adapter or merged folder) -> (the captioner in eval mode on `device`, its run's training
    metadata, the run's hyperparameters)."""
    return load_checkpoint(path, device)


@torch.no_grad()
def caption_images(model, paths, batch_size: int = 16, **gen_kwargs) -> list[str]:
    """Image files -> one caption each (gen_kwargs: num_beams, max_new_tokens, do_sample, temperature, ...)."""
    out = []
    for s in range(0, len(paths), batch_size):
        pixels = torch.stack([model.preprocess(load_rgb(p)) for p in paths[s:s + batch_size]])  # (B, 3, S, S)
        out += model.generate(pixel_values=pixels, **gen_kwargs)
    return out


def run(argv) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    ckpt = argv[0] if argv else newest_checkpoint()
    if ckpt is None:
        raise MissingInputError("no checkpoint given and none in saved_models/ (run: python train.py --preset demo)")
    model, metadata, hp = load_model_from_checkpoint(ckpt, pick_device("auto"))  # (eval mode, run metadata, hparams)
    print(f"loaded {ckpt}: epoch {metadata.get('epoch')}, val loss {metadata.get('val_loss')}")
    images = argv[1:] or load_splits(hp, SkipLog(), which=("test",))["test"].images[:3]
    readable = [p for p in images if readable_image(p)]  # a bad file is named on stderr; the others are captioned
    if not readable:
        raise NothingReadable(f"none of the {len(images)} images could be read")
    captions = caption_images(model, readable, max_new_tokens=hp.get("max_new_tokens", Generation.max_new_tokens))
    for path, caption in zip(readable, captions):
        print(tsv_line(str(path), caption))
    return 0


def readable_image(path) -> bool:
    try:
        load_rgb(path)
        return True
    except Exception as e:  # whatever decoding a stranger's file raises: that image is skipped, by name
        print(f"skipped {path}: {image_problem(e)}", file=sys.stderr)
        return False


def main(argv=None) -> int:
    """The command line: an expected failure ends in one paragraph and its exit code (capkit/errors.py)."""
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
