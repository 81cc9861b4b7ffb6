"""
Frozen-encoder features, computed once: the image encoder never changes during training, so each image's
embedding is extracted in batches (with a progress bar) and cached on disk.

    from capkit.data.features import image_features
    feats, ok = image_features(model, data.images, cache_dir="cache/features")   # (N_ok, E) or (N_ok, N, W) fp16

What is cached follows encoder_features: the pooled embedding (E per image) or the ViT's patch tokens
(N x W per image; announce_size says how much disk that takes before extracting).
The cache key is the encoder's identity (kind + name + layer + a hash of its weights + its preprocessing + encoder_features)
and the content of every image (a hash of the file bytes): change any of them and the features
are recomputed. Files are safetensors (fp16) written atomically; a file that is truncated, corrupt
or doesn't match its key is detected and rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import save
from torch.utils.data import DataLoader
from tqdm import tqdm

from capkit.data.batching import Collate, run_sharded
from capkit.data.images import DECODE_VERSION, ImageDataset, SkipLog
from capkit.files import atomic_write, open_regular

CACHE_FORMAT = "capkit.features.v1"


@torch.no_grad()
def encode_split(model, images, batch_size=32, num_workers=0, skips: SkipLog | None = None, progress=False, acc=None,
                 encode=True):
    """Every image through the frozen encoder once -> (embeds (N_ok, E) float32, indices of images that loaded).
    encode=False: the preprocessed pixels (N_ok, 3, S, S) instead, for models whose image side trains.
    Under accelerate (acc with several processes) each process encodes its share and all get the whole result."""
    main = acc is None or acc.is_main_process

    def run(idx):
        loader = DataLoader(ImageDataset([images[i] for i in idx], model.preprocess), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=Collate())
        if progress and main:
            loader = tqdm(loader, desc="Extracting image features" if encode else "Loading images", dynamic_ncols=True)
        embeds, ok, skipped = [], [], []
        for batch in loader:
            skipped += batch["skipped"]
            if "pixel_values" in batch:
                px = batch["pixel_values"]
                embeds.append(model.encode_images(px).cpu() if encode else px)
                ok += [idx[i] for i in batch["image_idx"].tolist()]
        return embeds, ok, skipped

    embeds, ok = [], []
    for part_embeds, part_ok, part_skipped in run_sharded(acc, len(images), run):
        embeds, ok = embeds + part_embeds, ok + part_ok
        for path, reason in part_skipped:
            if skips is not None:
                skips.add(path, reason)
    return (torch.cat(embeds) if embeds else torch.empty(0)), ok


def encoder_fingerprint(model) -> str:
    """Name + weights + preprocessing of the frozen encoder (and the version of the decoding before it)."""
    h = hashlib.sha256()
    c = model.config
    h.update(f"{c.encoder_type}|{c.encoder_name}|{c.encoder_pretrained}|{c.encoder_image_size}|decode {DECODE_VERSION}|"
             f"{c.encoder_features}|layer {c.encoder_layer}".encode())
    for name, t in sorted(model.image_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    h.update(repr(model.preprocess).encode())
    return h.hexdigest()[:20]


def announce_size(model, n_images: int, path: Path) -> None:
    """Say how much disk the features will take before extracting them (patch tokens of a big set take
    gigabytes: Flickr30K with ViT-B-32 tokens is ~2.2 GB), and warn when the disk hasn't that much free."""
    shape = model.feature_shape  # (E,) or (N, W)
    need = n_images * math.prod(shape) * 2  # fp16
    what = "x".join(map(str, shape))
    print(f"feature cache: {n_images} images x {what} fp16 ({model.config.encoder_features}) = {need / 1e6:,.1f} MB "
          f"-> {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < need * 1.1:
        print(f"note: only {free / 1e6:,.1f} MB free there; the cache may not be written (features are then "
              "recomputed on each run). Set feature_cache_dir to a larger disk, or None")


def file_digest(path) -> str:
    h = hashlib.sha1()
    try:
        with open_regular(path) as f:  # a FIFO swapped in for an image is never waited on
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return "missing"
    return h.hexdigest()


def _load(path: Path, digests: list[str]):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT or json.loads(meta["digests"]) != digests:
            raise ValueError("key mismatch")
        feats, ok = f.get_tensor("features").half(), f.get_tensor("ok").tolist()
    if feats.shape[0] != len(ok) or (ok and max(ok) >= len(digests)):
        raise ValueError("inconsistent shapes")
    return feats, ok


def image_features(model, images, cache_dir=None, batch_size=64, num_workers=0, skips: SkipLog | None = None,
                   acc=None):
    """Cached encode_split. With cache_dir None, always computes. Under accelerate every process calls
    it: a missing cache is filled by all processes (each its share) and written by the main one."""
    if cache_dir is None:
        return encode_split(model, images, batch_size, num_workers, skips, progress=True, acc=acc)
    digests = [file_digest(p) for p in images]
    set_key = hashlib.sha256("\n".join(digests).encode()).hexdigest()[:24]
    path = Path(cache_dir) / encoder_fingerprint(model) / f"{set_key}.safetensors"
    cached = None
    if path.is_file():
        try:
            cached = _load(path, digests)
        except Exception as e:  # truncated / corrupt / foreign file: rebuild
            if acc is None or acc.is_main_process:
                print(f"feature cache {path} is unusable ({type(e).__name__}: {e}); rebuilding it")
    everyone_has_it = cached is not None
    if acc is not None and acc.num_processes > 1:  # all processes must take the same branch below
        everyone_has_it = all(gather_object([cached is not None]))
    if everyone_has_it:
        feats, ok = cached
        if skips is not None:  # images that failed when the cache was built are still skips
            for i in sorted(set(range(len(images))) - set(ok)):
                skips.add(images[i], "unreadable image: cached")
        return feats, ok
    if acc is None or acc.is_main_process:
        announce_size(model, len(images), path)
    feats, ok = encode_split(model, images, batch_size, num_workers, skips, progress=True, acc=acc)
    if acc is None or acc.is_main_process:
        blob = save({"features": feats.half().contiguous(), "ok": torch.tensor(ok, dtype=torch.long)},
                    metadata={"format": CACHE_FORMAT, "digests": json.dumps(digests)})
        try:
            atomic_write(path, lambda f: f.write(blob))
        except OSError as e:  # the cache only saves time: a full disk or a read-only folder costs a recompute later
            print(f"note: feature cache not written ({path}: {e.strerror or e}); features are recomputed next time")
    if acc is not None:
        acc.wait_for_everyone()  # nobody reads a half-written cache
    return feats.half(), ok  # the same values (and dtype) a later cache hit returns
