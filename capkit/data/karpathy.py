"""
Karpathy's split files -> a CaptionSet per split: dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json,
the format ClipCap, self-critical.pytorch and the COCO captioning papers read.

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                                    "split": "train" | "restval" | "val" | "test",
                                    "sentences": [{"raw": "A man riding a bike.", "tokens": [...]}, ...]}, ...]}

An image is <image root>/<filepath>/<filename> (Flickr's entries have no filepath); its captions are the sentences'
`raw` text. "restval" (COCO's 30,504 validation images outside Karpathy's val and test) joins train, as is customary
(restval=False leaves it out). A missing or unreadable image is a counted skip; a file that is not this format ends
in one message naming the first entry that isn't.

    from capkit.data.karpathy import load_karpathy
    splits = load_karpathy("dataset_coco.json", "/data/coco", SkipLog())   # {"train", "val", "test"}
"""
from __future__ import annotations

from pathlib import Path

from capkit.data.folders import CaptionSet, build_caption_set
from capkit.data.images import SkipLog
from capkit.errors import DataError, MissingInputError
from capkit.files import read_json

SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # Karpathy's split -> capkit's


def read_karpathy(path) -> list[dict]:
    """The file's image entries, each checked: a filename, a known split, sentences with raw text."""
    if not Path(path).is_file():
        raise MissingInputError(f"Karpathy split file {path} does not exist (captions_file: dataset_coco.json, "
                                "dataset_flickr8k.json or dataset_flickr30k.json)")
    data = read_json(path, "Karpathy split file")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: not a Karpathy split file (a JSON object with an 'images' list expected)")
    for i, im in enumerate(images):
        problem = _entry_problem(im)
        if problem:
            raise DataError(f"{path}: images[{i}] {problem}; not a Karpathy split file?")
    return images


def _entry_problem(im) -> str | None:
    if not isinstance(im, dict):
        return "is not an object"
    if not isinstance(im.get("filename"), str) or not im["filename"]:
        return "has no filename"
    if not isinstance(im.get("filepath", ""), str):
        return "has a filepath that is not text"
    if im.get("split") not in SPLIT_OF:
        return f"has split {im.get('split')!r} (expected one of {', '.join(SPLIT_OF)})"
    sentences = im.get("sentences")
    if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
        return "has no list of sentences with 'raw' text"
    return None


def load_karpathy(path, image_root, skips: SkipLog, restval: bool = True) -> dict[str, CaptionSet]:
    """{"train", "val", "test"} CaptionSets of a Karpathy split file, images under image_root."""
    root = Path(image_root)
    if not root.is_dir():
        raise MissingInputError(f"data_dir {image_root} (the images of {path}) is not a folder")
    entries: dict[str, list] = {"train": [], "val": [], "test": []}
    for im in read_karpathy(path):
        if im["split"] == "restval" and not restval:
            continue
        image = root / im.get("filepath", "") / im["filename"]
        entries[SPLIT_OF[im["split"]]] += [(image, s["raw"]) for s in im["sentences"]]
    return {split: build_caption_set(pairs, root, skips) for split, pairs in entries.items()}
