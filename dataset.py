"""
The data a run trains and is scored on: Flickr30K (Karpathy split), your own folders of images + captions
(capkit/data/folders.py reads each layout), or a synthetic demo set (capkit/data/shapes.py); split by image; then one
sample per (image, caption) pair, with optional caption and image augmentation.

    from dataset import load_splits
    from capkit.data.images import SkipLog
    skips = SkipLog()
    splits = load_splits({"dataset": "folder", "train_dir": "my_photos/", ...}, skips)
    print(splits["train"].num_images, skips.summary())

Bad input never crashes a run: missing or unreadable images, non-images, empty captions and paths
that leave the dataset folder are skipped and counted (SkipLog), with one summary line.
"""
from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from torch.utils.data import DataLoader
from torchvision.transforms import ColorJitter, RandomResizedCrop

from capkit.data.batching import Collate
from capkit.data.folders import CaptionSet, build_caption_set, load_folder, split_by_image
from capkit.data.images import SkipLog, load_item
from capkit.data.karpathy import load_karpathy
from capkit.data.shapes import STYLE_OF, ensure_shapes_dataset
from capkit.data.shards import hf_shards, materialize, open_hf, tar_shards
from capkit.errors import DataError, MissingInputError
from capkit.files import read_text
from capkit.hub import hub_or_cache, resolve_local_path
from capkit.runtime import COMPILE_PAD_MULTIPLE

FLICKR30K_REPO = "nlphuji/flickr30k"
FLICKR30K_FILES = ("flickr_annotations_30k.csv", "flickr30k-images.zip")


# ----------------------------------------------------------------------------------------------
# Flickr30K (Karpathy split: 29,000 train / 1,014 val / 1,000 test images, 5 captions each)

def flickr30k_files(data_dir=None) -> tuple[Path, Path]:
    """(annotations CSV, images folder or zip). Local files in data_dir win; else fetched from the
    hub dataset nlphuji/flickr30k (its loading script is refused by datasets>=4, so we read the
    two data files directly)."""
    if data_dir:
        d = Path(data_dir)
        csv_path = d / FLICKR30K_FILES[0]
        for images in (d / "flickr30k-images", d / FLICKR30K_FILES[1]):
            if csv_path.exists() and images.exists():
                return csv_path, images
        raise MissingInputError(f"{d}: expected {FLICKR30K_FILES[0]} and flickr30k-images/ (or {FLICKR30K_FILES[1]})")
    paths = hub_or_cache(
        lambda offline: [Path(hf_hub_download(FLICKR30K_REPO, f, repo_type="dataset", local_files_only=offline))
                         for f in FLICKR30K_FILES],
        f"Flickr30K ({FLICKR30K_REPO})", f"set `data_dir` to a folder holding {FLICKR30K_FILES[0]} and "
        f"flickr30k-images/ (or {FLICKR30K_FILES[1]}).")
    return paths[0], paths[1]


def _extracted(zip_path: Path) -> Path:
    """Extract the image zip once, next to it; a marker file says the extraction finished."""
    out = zip_path.with_suffix("")
    out = out.parent / (out.name + "_extracted")
    marker = out / ".complete"
    if not marker.exists():
        print(f"extracting {zip_path.name} (once) to {out}")
        try:  # extractall keeps every member inside `out` (it drops absolute paths and '..')
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(out)
        except (zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{zip_path} is not a readable zip file ({e}); download it again") from None
        marker.touch()
    return out


def load_flickr30k(split: str, skips: SkipLog, data_dir=None) -> CaptionSet:
    csv_path, images = flickr30k_files(data_dir)
    if images.suffix == ".zip":
        images = _extracted(images)
    # images may sit directly in the folder or one level down (flickr30k-images/xxx.jpg inside the zip)
    sub = images / "flickr30k-images"
    image_dir = sub if sub.is_dir() else images
    entries = []
    reader = csv.DictReader(io.StringIO(read_text(csv_path, "Flickr30K annotations"), newline=""))
    missing = [c for c in ("raw", "filename", "split") if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{csv_path}: not the Flickr30K annotations file (no {', '.join(missing)} column)")
    for row in reader:
        if row["split"] != split:
            continue
        try:
            caps = json.loads(row["raw"] or "")
        except json.JSONDecodeError:
            caps = None
        if not isinstance(caps, list):
            skips.add(f"{csv_path}:{reader.line_num}", "bad caption list")
            continue
        entries += [(image_dir / (row["filename"] or ""), c) for c in caps]
    return build_caption_set(entries, image_dir, skips)


# ----------------------------------------------------------------------------------------------
# one entry point for train.py / eval.py

PATH_KEYS = ("data_dir", "train_dir", "val_dir", "test_dir", "captions_file", "hf_dataset")  # the data's paths


def from_here_or_clone(path: str) -> str:
    """A relative path from a run's hyperparameters: as given when it exists from the working directory (or is
    absolute), else from the clone when it exists there (a notebook in notebooks/ finds the run's data/shapes)."""
    if Path(path).is_absolute() or Path(path).exists():
        return path
    found = resolve_local_path(path)
    return str(found) if found is not None else path


def load_splits(hp: dict, skips: SkipLog, which=("train", "val", "test")) -> dict[str, CaptionSet]:
    """Build the requested splits from hyperparameters (dataset, data_dir, train_dir, val_dir,
    test_dir, captions_file, split_ratio, val_ratio, seed)."""
    hp = {**hp, **{k: from_here_or_clone(hp[k]) for k in PATH_KEYS if isinstance(hp.get(k), str)}}
    kind = hp.get("dataset")
    if kind is None:  # a checkpoint whose training metadata is gone doesn't say which data it was trained on
        raise DataError("no dataset named (a checkpoint without its training metadata doesn't say which data it "
                        "was trained on): pass --dataset and --data_dir (or --test_dir)")
    if kind == "flickr30k":
        return {s: load_flickr30k(s, skips, hp.get("data_dir")) for s in which}
    if kind in ("hf", "webdataset"):
        return load_shard_splits(hp, skips, which)
    if kind == "karpathy":  # Karpathy's dataset_*.json (COCO, Flickr8k, Flickr30k) + the folder of its images
        if not (hp.get("captions_file") and hp.get("data_dir")):
            raise DataError("dataset='karpathy' needs captions_file (Karpathy's dataset_coco.json, "
                            "dataset_flickr8k.json or dataset_flickr30k.json) and data_dir (the folder of its images)")
        return usable(load_karpathy(hp["captions_file"], hp["data_dir"], skips, hp.get("karpathy_restval", True)),
                      which, skips)
    listed = [k for k in PATH_KEYS if isinstance(hp.get(k), list)]
    if listed:
        raise DataError(f"{listed[0]}: a list of paths is for dataset='webdataset' (tar shard patterns); "
                        f"dataset={kind!r} takes one folder")
    if kind in STYLE_OF:  # the demo datasets (shapes_b: one style-B caption per image; scenes: two shapes)
        root = ensure_shapes_dataset(hp["data_dir"], STYLE_OF[kind])
        return {s: load_folder(root / s, skips) for s in which}
    if kind != "folder":
        raise DataError(f"unknown dataset {kind!r}; expected one of "
                        f"{', '.join(('flickr30k', 'folder', 'karpathy', 'hf', 'webdataset', *STYLE_OF))}")
    seed = hp.get("seed", 0)
    held_out = {"test": hp.get("test_dir"), "val": hp.get("val_dir")}
    if len(which) == 1 and held_out.get(which[0]):  # eval.py --test_dir: that folder alone, whatever trained
        return usable({which[0]: load_folder(held_out[which[0]], skips, hp.get("captions_file"))}, which, skips)
    if hp.get("train_dir"):
        train = load_folder(hp["train_dir"], skips, hp.get("captions_file"))
        test = load_folder(hp["test_dir"], skips, hp.get("captions_file")) if hp.get("test_dir") else None
    else:
        if not hp.get("data_dir"):
            raise DataError("dataset='folder' needs data_dir (one folder, split by split_ratio) or train_dir/test_dir")
        all_ = load_folder(hp["data_dir"], skips, hp.get("captions_file"))
        r = hp.get("split_ratio", 0.9)
        parts = split_by_image(all_, {"train": r, "test": 1 - r}, seed)
        train, test = parts["train"], parts["test"]
    if hp.get("val_dir"):
        val = load_folder(hp["val_dir"], skips, hp.get("captions_file"))
    else:  # carve validation images out of train so the test split stays untouched
        parts = split_by_image(train, {"train": 1 - hp.get("val_ratio", 0.05), "val": hp.get("val_ratio", 0.05)}, seed)
        train, val = parts["train"], parts["val"]
    if test is None:
        test = val
    return usable({"train": train, "val": val, "test": test}, which, skips)


def usable(splits: dict, which, skips: SkipLog) -> dict:
    """The splits asked for, refused when one that must have images has none: train always, and the one split an
    evaluation asks for (an empty val / test split is allowed in training, a small folder: train.py says so)."""
    for name in which:
        if splits[name].num_images == 0 and (name == "train" or len(which) == 1):
            raise DataError(f"the {name} split has no usable images ({skips.summary()})")
    return {s: splits[s] for s in which}


# ----------------------------------------------------------------------------------------------
# data in shards (hf, webdataset): training streamed, evaluation splits written out once as image files

@dataclass
class ShardSource:
    """A training split kept in shards and read as a stream (capkit/data/streams.py): TarShard or HFShard."""
    shards: list
    name: str

    num_images = None  # not known before the shards are read


def _shard_parts(hp: dict) -> dict:
    """hp -> {"train" / "val" / "test": the split's shards, or a reason it is absent}."""
    seed = hp.get("seed", 0)
    if hp["dataset"] == "webdataset":
        if hp.get("train_dir"):
            parts = {"train": tar_shards(hp["train_dir"])}
            parts.update({s: tar_shards(hp[f"{s}_dir"]) for s in ("val", "test") if hp.get(f"{s}_dir")})
        elif hp.get("data_dir"):  # one set of shards: split by shard (a shard's samples stay together)
            parts = _split_list(tar_shards(hp["data_dir"]), "test", 1 - hp.get("split_ratio", 0.9), seed)
        else:
            raise DataError("dataset='webdataset' needs data_dir (tar shards, split by split_ratio) or "
                            "train_dir / val_dir / test_dir: patterns like shards/{00000..00099}.tar")
        if "val" not in parts:
            parts = {**parts, **_split_list(parts["train"], "val", hp.get("val_ratio", 0.05), seed)}
        return parts
    return _hf_parts(hp, seed)


def _split_list(shards: list, name: str, fraction: float, seed: int) -> dict:
    """Hold out round(fraction x len) shards (at least one when fraction > 0 and two are left) as `name`."""
    order = list(range(len(shards)))
    random.Random(seed).shuffle(order)
    n = min(len(shards) - 1, max(1 if fraction > 0 else 0, round(fraction * len(shards))))
    held = set(order[:n])
    return {"train": [s for i, s in enumerate(shards) if i not in held],
            name: [s for i, s in enumerate(shards) if i in held]}


def _hf_parts(hp: dict, seed: int) -> dict:
    if not hp.get("hf_dataset"):
        raise DataError("dataset='hf' needs hf_dataset: a hub id, or a local folder of parquet files, a "
                        "save_to_disk folder or an imagefolder")
    src = hp["hf_dataset"]
    names = {"train": "train", "val": "validation", "test": "test", **(hp.get("hf_splits") or {})}
    unknown = set(names) - {"train", "val", "test"}
    if unknown:
        raise DataError(f"hf_splits: unknown key {sorted(unknown)[0]!r}; it maps train / val / test to split names")
    d = open_hf(src, hp.get("streaming", False))
    if names["train"] not in d:
        raise DataError(f"{src} has no split {names['train']!r} (its splits: {', '.join(d)}): set hf_splits")
    splits = {s: d[n] for s, n in names.items() if n in d}
    held_out = (("test", 1 - hp.get("split_ratio", 0.9)), ("val", hp.get("val_ratio", 0.05)))  # missing splits
    for s, ratio in held_out:
        can_cut = hasattr(splits["train"], "train_test_split") and splits["train"].num_rows > 1  # (not streamed)
        if s not in splits and can_cut and ratio > 0:
            cut = splits["train"].train_test_split(test_size=ratio, seed=seed)  # by row: an image's captions together
            splits["train"], splits[s] = cut["train"], cut["test"]
    parts = {s: hf_shards(v, src, names.get(s, s), hp.get("image_column"), hp.get("caption_column"))
             for s, v in splits.items()}
    for s, ratio in held_out:
        if s not in parts and ratio > 0:  # streamed: whole files are held out, as tar shards are
            parts = {**parts, **_split_list(parts["train"], s, ratio, seed)}
    return parts


def load_shard_splits(hp: dict, skips: SkipLog, which) -> dict:
    """train: a ShardSource, streamed; val / test: CaptionSets of their images, written once under data_cache_dir."""
    parts, out = _shard_parts(hp), {}
    for name in which:
        if name == "train":
            out[name] = ShardSource(parts["train"], f"{hp['dataset']} train ({len(parts['train'])} shards)")
            continue
        shards = parts.get(name) or (parts.get("val") if name == "test" else None) or []
        out[name] = materialize(shards, Path(hp.get("data_cache_dir") or "cache/data") / "eval_splits", skips,
                                f"{hp['dataset']} {name} split") if shards else CaptionSet([], [])
    if len(which) == 1 and which[0] != "train" and out[which[0]].num_images == 0:
        raise DataError(f"the {which[0]} split has no usable images ({skips.summary()})")
    return out


# ----------------------------------------------------------------------------------------------
# torch datasets + collate

class CaptionAugment:
    """Tag-style caption augmentation (as in caption-train): split on commas, keep the first
    `frozen_parts` parts in place, drop each other part with probability `dropout` (at least one
    part stays) and shuffle the rest. Draws from torch's RNG (seeded per DataLoader worker)."""

    def __init__(self, shuffle: bool, frozen_parts: int = 0, dropout: float = 0.0):
        self.shuffle, self.frozen, self.dropout = shuffle, frozen_parts, dropout

    def __call__(self, caption: str) -> str:
        parts = [p.strip() for p in caption.split(",") if p.strip()]
        head, tail = parts[:self.frozen], parts[self.frozen:]
        if self.dropout > 0 and tail:
            kept = [p for p in tail if float(torch.rand(())) >= self.dropout]
            tail = kept if kept or head else [tail[int(torch.randint(len(tail), ()))]]
        if self.shuffle and len(tail) > 1:
            tail = [tail[j] for j in torch.randperm(len(tail)).tolist()]
        return ", ".join(head + tail)


class AugmentThenPreprocess:
    """Random resized crop (85-100% of the area) + brightness/contrast jitter, then the model's
    preprocessing. No flips and no hue changes: captions name sides and colours."""

    def __init__(self, preprocess):
        self.preprocess, self.jitter = preprocess, ColorJitter(brightness=0.2, contrast=0.2)

    def __call__(self, image):
        image = RandomResizedCrop(image.size[::-1], scale=(0.85, 1.0), ratio=(0.9, 1.1))(image)  # same (H, W)
        return self.preprocess(self.jitter(image))


class PairDataset(torch.utils.data.Dataset):
    """One sample per (image, caption) pair. transform=None: no image is loaded (cached features are used)."""

    def __init__(self, data: CaptionSet, transform, pairs=None, caption_transform=None):
        self.data, self.transform, self.caption_transform = data, transform, caption_transform
        self.pairs = pairs if pairs is not None else data.pairs()

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_idx, caption = self.pairs[i]
        if self.caption_transform is not None:
            caption = self.caption_transform(caption)
        if self.transform is None:  # features come from the cache: no image I/O at all
            return {"caption": caption, "image_idx": img_idx}
        return load_item(self.data.images[img_idx], self.transform, caption=caption, image_idx=img_idx)


# ----------------------------------------------------------------------------------------------
# the training loader: one builder for folders and streams (train.py's build_training_data / build_stream_data)

def loader_workers(hp: dict, device: torch.device) -> int:
    """DataLoader workers: num_workers, or by default 4 on a GPU (decoding images keeps up with it) and 0 on a CPU."""
    return hp["num_workers"] if hp["num_workers"] is not None else (4 if device.type == "cuda" else 0)


def caption_augment(hp: dict) -> CaptionAugment | None:
    """The tag-style caption augmentation the hyperparameters ask for, or None."""
    if not (hp["shuffle_captions"] or hp["caption_dropout"]):
        return None
    return CaptionAugment(hp["shuffle_captions"], hp["frozen_parts"], hp["caption_dropout"])


def image_transform(hp: dict, preprocess):
    """PIL image -> the model's input tensor: augmented first when augment_images is on."""
    return AugmentThenPreprocess(preprocess) if hp["augment_images"] else preprocess


def training_loader(items, model, hp: dict, device: torch.device, workers: int, **batching) -> DataLoader:
    """The one training DataLoader: items a PairDataset (batching: a batch_sampler, or batch_size + shuffle, and
    the generator that seeds the order or the workers) or a ShardStream, which batches itself (batch_size=None).
    Collate tokenizes and right-pads the captions -> input_ids / attention_mask (B, T); with compile=True, T is
    rounded up to a multiple of COMPILE_PAD_MULTIPLE (a few static shapes)."""
    collate = Collate(model.tokenize, hp["max_caption_length"], pad_id=model.tokenizer.pad_token_id,
                      pad_to_multiple_of=COMPILE_PAD_MULTIPLE if hp["compile"] else None)
    return DataLoader(items, **batching, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda")
