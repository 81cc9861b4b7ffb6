"""
Captioned data kept in shards: WebDataset tar shards (what img2dataset writes, what open_clip trains from) read
with the webdataset package, and 🤗 datasets (a hub id, parquet files, a save_to_disk folder, an imagefolder)
read with datasets. Every shard yields records, never decoded images:

    {"key": "shards/00003.tar:000123", "image": b"<encoded bytes>", "captions": ["a dog ...", ...]}
    {"key": "shards/00003.tar:000124", "error": "no caption"}           # a counted skip, as the folder loader's

    from capkit.data.shards import tar_shards
    for rec in tar_shards("shards/{00000..00009}.tar")[0].records(): ...

A corrupt member, a sample without an image or a caption and a truncated tar are skips with their reason.
Training reads the shards as a stream (streams.py); the small evaluation splits are written out once as image
files (materialize) so evaluation, its feature cache and the predictions file work as for folders.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import webdataset as wds

from capkit.data.folders import CAPTION_COLUMNS, IMAGE_COLUMNS, CaptionSet, build_caption_set, clean_caption
from capkit.data.images import SkipLog
from capkit.errors import CapkitError, DataError, MissingInputError
from capkit.files import atomic_write, atomic_write_json, open_regular
from capkit.hub import hub_or_cache

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")     # a tar sample's image member (the first of these it has)
JSON_CAPTION_KEYS = ("caption", "captions", "text")  # a .json member: one of these keys, or a list of captions
HF_ROWS_PER_SHARD = 2000                             # a local 🤗 dataset is read in shards of this many rows ...
HF_MIN_SHARDS = 64                                   # ... and at least this many (so many processes x workers share it)


def _captions_of(value) -> tuple[list[str], str | None]:
    """A caption field (text, or a list of texts) -> (usable captions, why none is usable)."""
    raw = value if isinstance(value, (list, tuple)) else [value]
    out, problem = [], None
    for c in raw:
        if not isinstance(c, str):
            problem = f"caption is not text: {type(c).__name__}"
            continue
        text, problem_here = clean_caption(c)
        if problem_here:
            problem = problem_here
        else:
            out.append(text)
    return out, (None if out else problem or "no caption")


# ----------------------------------------------------------------------------------------------
# WebDataset tar shards

@dataclass(frozen=True)
class TarShard:
    path: str

    def ident(self) -> str:
        """Changes when the file does (path, size, modification time): the cache keys on it."""
        st = os.stat(self.path)
        return f"tar|{os.path.abspath(self.path)}|{st.st_size}|{st.st_mtime_ns}"

    def count_images(self) -> int:
        """Image members, from the tar's headers (no member is read): for the feature cache's size estimate."""
        n = 0
        try:
            with open_regular(self.path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    n += info.isreg() and info.name.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES
        except (OSError, tarfile.TarError):
            pass  # a truncated shard: the images listed so far (reading it says what went wrong)
        return n

    def records(self):
        problems = []

        def count_problem(exn):  # webdataset's handler: note it and go on with the next member / shard
            problems.append(exn)
            return True
        try:
            stream = open_regular(self.path)
        except OSError as e:
            yield {"key": self.path, "error": f"unreadable tar shard: {e.strerror or e}"}
            return
        with stream:
            members = wds.tariterators.tar_file_expander([{"url": self.path, "stream": stream}], handler=count_problem)
            for sample in wds.tariterators.group_by_keys(members, handler=count_problem):
                yield self._record(sample)
        if problems:  # a truncated or corrupt tar: the samples before the damage were read
            detail = " ".join(str(problems[0]).split())[:120]
            yield {"key": self.path, "error": f"truncated or corrupt tar shard: {type(problems[0]).__name__} {detail}"}

    def _record(self, sample: dict) -> dict:
        key = f"{self.path}:{sample['__key__']}"
        image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
        if image is None:
            return {"key": key, "error": "no image in the sample (.jpg / .png / .webp)"}
        if "txt" in sample:
            value = sample["txt"].decode("utf-8", "replace").splitlines()  # one caption per line, as .txt sidecars
        elif "json" in sample:
            try:
                value = json.loads(sample["json"])
            except ValueError:
                return {"key": key, "error": "unreadable caption json"}
            if isinstance(value, dict):
                value = next((value[k] for k in JSON_CAPTION_KEYS if k in value), None)
        else:
            return {"key": key, "error": "no caption"}
        captions, problem = _captions_of(value)
        return {"key": key, "error": problem} if problem else {"key": key, "image": image, "captions": captions}


def tar_shards(spec) -> list[TarShard]:
    """Brace patterns ("shards/{00000..00099}.tar"), "::"-joined lists, a folder of .tar files, or a list of
    any of these -> the shards, in order. A missing file is an error naming it."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    paths = []
    for s in map(str, specs):
        if Path(s).is_dir():
            paths += sorted(str(p) for p in Path(s).glob("*.tar"))
        else:
            paths += wds.shardlists.expand_urls(s)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise MissingInputError(f"{len(missing)} of {len(paths)} tar shards not found (first: {missing[0]})")
    if not paths:
        raise MissingInputError(f"no tar shards in {specs}")
    return [TarShard(p) for p in paths]


# ----------------------------------------------------------------------------------------------
# 🤗 datasets

@dataclass
class HFShard:
    data: object            # one shard of a datasets.Dataset (row range) or IterableDataset (its files)
    name: str               # "<dataset>/<split> i/n", for skip keys
    fingerprint: str
    image_column: str
    caption_columns: tuple

    def ident(self) -> str:
        return f"hf|{self.fingerprint}|{self.name}"

    def count_images(self) -> int | None:
        return getattr(self.data, "num_rows", None)

    def records(self):
        for j, row in enumerate(self.data):
            key = f"{self.name}#{j}"
            image = _image_bytes(row.get(self.image_column))
            if isinstance(image, str):
                yield {"key": key, "error": image}
                continue
            captions, problem = _captions_of([c for col in self.caption_columns for c in _as_list(row.get(col))])
            yield {"key": key, "error": problem} if problem else {"key": key, "image": image, "captions": captions}


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _image_bytes(value):
    """An image cell (datasets' Image(decode=False) dict, raw bytes, or a local path) -> bytes, or why not."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        try:
            with open_regular(value) as f:
                return f.read()
        except OSError as e:
            return f"missing file: {e.strerror or e}" if isinstance(e, FileNotFoundError) else \
                f"unreadable image: {e.strerror or e}"
    return "no image in the row"


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def open_hf(source: str, streaming: bool):
    """A DatasetDict (or IterableDatasetDict): a local path with no network, a hub id through the Hub (offline:
    the local cache only, else one paragraph naming hf_dataset)."""
    path = Path(source)
    if _is_saved_to_disk(path):
        d = _loaded(lambda: datasets.load_from_disk(str(path)), source)
        d = d if isinstance(d, datasets.DatasetDict) else datasets.DatasetDict({"train": d})
        return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in d.items()}) if streaming else d
    if path.exists():  # parquet files, an imagefolder, csv / json lines: datasets picks the builder
        return _loaded(lambda: datasets.load_dataset(str(path), streaming=streaming), source)

    def load(offline: bool):
        saved = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = offline or saved
        try:
            return datasets.load_dataset(source, streaming=streaming)
        finally:
            datasets.config.HF_HUB_OFFLINE = saved
    return _loaded(lambda: hub_or_cache(load, f"the dataset {source!r} (hf_dataset)",
                        "set hf_dataset to a local folder: parquet files, a save_to_disk folder or an imagefolder "
                        "(README \"Your own data\").", catch=(ConnectionError, OSError, FileNotFoundError)), source)


def _loaded(load, source: str):
    """load() -> its dataset; whatever datasets raises on a folder it can't read (a damaged parquet file, a
    folder of something else, a hub id that does not exist) -> one paragraph naming hf_dataset."""
    try:
        return load()
    except CapkitError:
        raise
    except Exception as e:  # datasets' own errors have no common base class
        detail = " ".join(str(e).split())[:300]
        raise DataError(f"hf_dataset {source!r}: datasets can't load it ({type(e).__name__}: {detail}). Expected a "
                        "hub id, a folder of parquet files, a save_to_disk folder or an imagefolder") from None


def _pick(columns, wanted, options, what: str, source: str) -> str:
    if wanted is not None:
        if columns and wanted not in columns:  # (a streamed dataset may not announce its columns)
            raise DataError(f"{source}: no column {wanted!r} ({what}); its columns: {list(columns)}")
        return wanted
    found = next((c for c in options if c in columns), None)
    if found is None:
        raise DataError(f"{source}: no {what} among its columns {list(columns)}; set the {what} key")
    return found


def hf_shards(split, source: str, split_name: str, image_column, caption_column) -> list[HFShard]:
    """One split of a 🤗 dataset -> its shards: row ranges of a Dataset, the files of an IterableDataset."""
    columns = list(split.features or split.column_names or [])
    img = _pick(columns, image_column, ("image", "jpg", "png", *IMAGE_COLUMNS), "image_column", source)
    wanted = caption_column if isinstance(caption_column, (list, tuple)) else None
    caps = tuple(_pick(columns, c, (), "caption_column", source) for c in wanted) if wanted else \
        (_pick(columns, caption_column, CAPTION_COLUMNS, "caption_column", source),)
    if split.features and isinstance(split.features.get(img), datasets.Image):
        split = split.cast_column(img, datasets.Image(decode=False))  # bytes: decoded as every other image is
    if isinstance(split, datasets.Dataset):
        n = max(1, min(split.num_rows, max(-(-split.num_rows // HF_ROWS_PER_SHARD), HF_MIN_SHARDS)))
        fp = getattr(split, "_fingerprint", source)
        return [HFShard(split.shard(n, i, contiguous=True), f"{source}/{split_name} {i}/{n}", fp, img, caps)
                for i in range(n)]
    n = split.num_shards
    return [HFShard(split.shard(n, i), f"{source}/{split_name} {i}/{n}", f"{source}|{split_name}", img, caps)
            for i in range(n)]


# ----------------------------------------------------------------------------------------------
# evaluation splits: written out once as image files

def shards_key(shards) -> str:
    return hashlib.sha256("\n".join(s.ident() for s in shards).encode()).hexdigest()[:20]


def materialize(shards, out_dir, skips: SkipLog, what: str) -> CaptionSet:
    """The records of a (small) evaluation split as image files under out_dir (once; a manifest marks it
    complete) -> a CaptionSet, as the folder loader gives: evaluation, its cache and predictions work as for folders."""
    out_dir = Path(out_dir) / shards_key(shards)
    manifest = out_dir / "manifest.json"
    if not manifest.is_file():
        print(f"{what}: writing its images once to {out_dir}")
        entries, problems = [], []
        for n, rec in enumerate(r for s in shards for r in s.records()):
            if "error" in rec:
                problems.append([rec["key"], rec["error"]])
                continue
            name = f"{n:08d}.{_suffix(rec['image'])}"
            atomic_write(out_dir / name, lambda f, b=rec["image"]: f.write(b))
            entries.append([name, rec["key"], rec["captions"]])
        atomic_write_json({"entries": entries, "skipped": problems}, manifest)
    info = json.loads(manifest.read_text())
    for key, reason in info["skipped"]:
        skips.add(key, reason)
    return build_caption_set([(out_dir / name, c) for name, _, caps in info["entries"] for c in caps], out_dir, skips)


def _suffix(data: bytes) -> str:
    """A file suffix from an image's magic bytes (Pillow reads by content; the suffix is for people)."""
    for magic, suffix in ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"RIFF", "webp"), (b"GIF8", "gif")):
        if data.startswith(magic):
            return suffix
    return "img"

