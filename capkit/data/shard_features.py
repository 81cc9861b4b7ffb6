"""
Frozen-encoder features of sharded data: one feature shard per data shard, extracted once, in parallel (the
processes of a run share the shards; each process's DataLoader workers decode theirs), and read back as a
stream: memory holds one shard per worker, never the whole set.

    shards = extract_shard_features(model, tar_shards("shards/{0000..0099}.tar"), "cache/features", skips)
    # -> [FeatureShard, ...]: records {"key", "embeds" (E,) or (N, W) fp16, "captions"}; .pairs for the plan

A feature shard is a safetensors file named by the encoder's fingerprint and its data shard's identity (path,
size, modification time; or a 🤗 dataset's fingerprint), written atomically: an interrupted extraction resumes
with the shards it has not written. Records that could not be used are kept in the file and counted again as skips.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch.utils.data import DataLoader
from tqdm import tqdm

from capkit.data.batching import run_sharded
from capkit.data.features import announce_size, encoder_fingerprint
from capkit.data.images import SkipLog, load_item
from capkit.errors import DataError, RunStopped
from capkit.files import atomic_write

SHARD_FORMAT = "capkit.feature_shard.v1"


@dataclass(frozen=True)
class FeatureShard:
    path: str
    images: int     # images with features in it
    pairs: int      # (image, caption) pairs

    def ident(self) -> str:
        return f"features|{self.path}"

    def records(self):
        feats = load_file(self.path)["features"]                     # (n, E) or (n, N, W) fp16
        meta = _header(self.path)
        for i, (key, caps) in enumerate(zip(json.loads(meta["keys"]), json.loads(meta["captions"]))):
            yield {"key": key, "embeds": feats[i], "captions": caps}


def _header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _usable(path: Path) -> dict | None:
    """The header of a complete feature shard, or None (absent, foreign, damaged: it is written again)."""
    if not path.is_file():
        return None
    try:
        meta = _header(path)
    except Exception:  # a truncated or foreign file: rebuilt, never trusted
        return None
    return meta if meta.get("format") == SHARD_FORMAT else None


class _ShardPixels(torch.utils.data.IterableDataset):
    """Worker w of a DataLoader reads shards w, w + W, ... of `todo` and yields chunks of up to `chunk` decoded
    images of one shard: (shard index, items, last chunk of the shard?)."""

    def __init__(self, shards, todo, transform, chunk: int):
        self.shards, self.todo, self.transform, self.chunk = shards, todo, transform, chunk

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in self.todo[w::n]:
            items = []
            for rec in self.shards[i].records():
                if "error" in rec:
                    items.append({"key": rec["key"], "error": rec["error"]})
                    continue
                item = load_item(io.BytesIO(rec["image"]), self.transform)
                if "error" in item:  # (named by its key, not by the buffer it was decoded from)
                    item["error"] = item["error"][1]
                items.append({"key": rec["key"], "captions": rec["captions"], **item})
                if len(items) == self.chunk:
                    yield i, items, False
                    items = []
            yield i, items, True


def _write(path: Path, source: str, embeds: list, keys: list, captions: list, skipped: list) -> None:
    feats = torch.cat(embeds).half().contiguous() if embeds else torch.empty(0, dtype=torch.float16)
    blob = save({"features": feats}, metadata={"format": SHARD_FORMAT, "source": source, "keys": json.dumps(keys),
                                               "captions": json.dumps(captions), "skipped": json.dumps(skipped)})
    try:
        atomic_write(path, lambda f: f.write(blob))
    except OSError as e:  # unlike the folder cache, these shards are the training data: no shard, no run
        raise RunStopped(f"could not write the feature shard {path} ({e.strerror or e}): free space there or set "
                         "feature_cache_dir to a folder with room (the size was announced above); the shards "
                         "already written are kept and not extracted again") from None


@torch.no_grad()
def _extract(model, shards, todo, paths, batch_size: int, workers: int, progress: bool) -> None:
    """This process's shards through the encoder; each feature shard written when its last chunk is encoded."""
    loader = DataLoader(_ShardPixels(shards, todo, model.preprocess, batch_size), batch_size=None,
                        num_workers=workers)
    open_: dict[int, tuple] = {}  # shard -> (embeds, keys, captions, skipped) while its chunks arrive
    bar = tqdm(total=len(todo), desc="Extracting shard features", dynamic_ncols=True, disable=not progress)
    for i, items, last in loader:
        embeds, keys, caps, skipped = open_.setdefault(i, ([], [], [], []))
        good = [it for it in items if "error" not in it]
        skipped += [[it["key"], it["error"]] for it in items if "error" in it]
        if good:
            embeds.append(model.encode_images(torch.stack([it["pixel_values"] for it in good])).cpu())
            keys += [it["key"] for it in good]
            caps += [it["captions"] for it in good]
        if last:
            _write(paths[i], shards[i].ident(), *open_.pop(i))
            bar.update(1)
    bar.close()


def extract_shard_features(model, shards, cache_dir, skips: SkipLog, batch_size: int = 64, workers: int = 0,
                           acc=None) -> list[FeatureShard]:
    """Every data shard's features, extracted where missing (shared among the processes of `acc`) ->
    the feature shards in data-shard order. The disk they take is said before extracting."""
    main = acc is None or acc.is_main_process
    folder = Path(cache_dir) / encoder_fingerprint(model) / "shards"
    paths = [folder / f"{hashlib.sha256(s.ident().encode()).hexdigest()[:24]}.safetensors" for s in shards]
    if acc is not None and acc.num_processes > 1:
        acc.wait_for_everyone()  # every process lists the missing shards before any writes one: the same list
    todo = [i for i, p in enumerate(paths) if _usable(p) is None]
    if todo:
        rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
        mine = todo[rank::world]
        images = sum(c for c in (shards[i].count_images() for i in mine) if c is not None)  # (from tar headers)
        if world > 1:
            images = sum(gather_object([images]))
        if main:
            announce_size(model, images, folder / "*.safetensors")
            print(f"extracting features of {len(todo)} of {len(shards)} shards"
                  + (f" on {world} processes" if world > 1 else ""))
        _extract(model, shards, mine, paths, batch_size, workers, progress=main)
        if world > 1:
            acc.wait_for_everyone()  # nobody reads a feature shard another process is still writing
    out = []
    for p in paths:
        meta = _usable(p)
        if meta is None:
            raise DataError(f"feature shard {p} is missing after extraction: on several machines, feature_cache_dir "
                            "must be a folder every machine sees (a shared file system); else the disk is full")
        for key, reason in json.loads(meta["skipped"]):
            skips.add(key, reason)
        captions = json.loads(meta["captions"])
        out.append(FeatureShard(str(p), len(captions), sum(map(len, captions))))
    return out


def count_pairs(shards, skips: SkipLog, acc=None) -> list[int]:
    """Pairs per data shard, by reading every record (no image decoded): what the stream's plan needs when no
    features are cached (images decoded per step: augment_images, git / blip)."""
    def count(idx):
        out = []
        for i in idx:
            n, bad = 0, []
            for rec in shards[i].records():
                if "error" in rec:
                    bad.append((rec["key"], rec["error"]))
                else:
                    n += len(rec["captions"])
            out.append((n, bad))
        return out
    counts = []
    for part in run_sharded(acc, len(shards), count):
        for n, bad in part:
            counts.append(n)
            for key, reason in bad:
                skips.add(key, reason)
    return counts
