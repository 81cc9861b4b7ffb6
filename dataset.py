"""
Datasets for capkit: Flickr30K (Karpathy split) and your own folders of images + captions.

    from dataset import load_splits, SkipLog
    skips = SkipLog()
    splits = load_splits({"dataset": "folder", "train_dir": "my_photos/", ...}, skips)
    print(splits["train"].num_images, skips.summary())

Custom folder formats, detected in this order (see README):
  captions.csv or Kaggle's captions.txt (image,caption; several rows per image; the images beside it or in
  images/ / Images/) | metadata.csv / metadata.jsonl (HF imagefolder:
  file_name + text or caption) | a .txt next to each image (one caption per line; searched recursively)
  | no captions at all: a caption made from each file name ("brown_dog_running.jpg" -> "brown dog running").

Bad input never crashes a run: missing or unreadable images, non-images, empty captions and paths
that leave the dataset folder are skipped and counted (SkipLog), with one summary line.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from huggingface_hub import hf_hub_download
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.transforms import ColorJitter, RandomResizedCrop

from common import hub_or_cache
from errors import DataError, MissingInputError
from safeio import NotRegularFile, open_regular, read_text
from shapes import STYLE_OF, ensure_shapes_dataset

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FLICKR30K_REPO = "nlphuji/flickr30k"
FLICKR30K_FILES = ("flickr_annotations_30k.csv", "flickr30k-images.zip")
IMAGE_COLUMNS = ("image", "file_name", "filename", "image_name", "image_path", "path")
CAPTION_COLUMNS = ("caption", "text", "captions", "sentence")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error (skipped), not silently grey pixels
# images with more pixels are skipped (counted), never decoded: Pillow's own decompression-bomb limit
# (2 x Image.MAX_IMAGE_PIXELS, ~179 MP). A 100-megapixel panorama still loads (~300 MB while decoding).
MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# how load_rgb turns a file into pixels; features.py keys its cache on it (2: 16-bit and float grayscale
# images are scaled to 8 bits instead of clipped white, so features cached from the old pixels are stale)
DECODE_VERSION = 2
MAX_CAPTION_CHARS = 20_000  # a longer "caption" (a pasted document, a broken CSV quote) is skipped, counted


# ----------------------------------------------------------------------------------------------
# bookkeeping

@dataclass
class SkipLog:
    """Counts and lists every input that was skipped, and why."""
    items: list = field(default_factory=list)  # (path, reason)
    _seen: set = field(default_factory=set, repr=False)

    def add(self, path, reason: str) -> None:
        """Record a skipped input once: the same file skipped again for the same kind of reason (a bad
        validation image at every epoch, a failure remembered by the feature cache) is not counted twice."""
        key = (str(path), reason.split(":")[0])
        if key not in self._seen:
            self._seen.add(key)
            self.items.append((str(path), reason))

    @property
    def counts(self) -> Counter:
        return Counter(r.split(":")[0] for _, r in self.items)

    def summary(self) -> str:
        if not self.items:
            return "skipped inputs: none"
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items()))
        return f"skipped inputs: {len(self.items)} ({parts})"

    def write(self, path) -> None:
        """One line per item: tabs, newlines and NULs in names are escaped, undecodable bytes kept as \\x.."""
        escape = {9: "\\t", 10: "\\n", 13: "\\r", 0: "\\0"}
        with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
            for p, r in self.items:
                f.write(f"{p.translate(escape)}\t{r.translate(escape)}\n")


@dataclass
class CaptionSet:
    """Images with all their reference captions. Training uses every (image, caption) pair;
    evaluation groups all references of an image."""
    images: list[Path]
    captions: list[list[str]]

    @property
    def num_images(self) -> int:
        return len(self.images)

    def pairs(self) -> list[tuple[int, str]]:
        return [(i, c) for i, caps in enumerate(self.captions) for c in caps]

    def subset(self, idx) -> "CaptionSet":
        return CaptionSet([self.images[i] for i in idx], [self.captions[i] for i in idx])


# ----------------------------------------------------------------------------------------------
# images

class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than the budget: args = (its size in words, the budget)."""


def open_image(source, max_pixels: int | None = None) -> Image.Image:
    """Image.open on a regular file only (a FIFO or device named like an image is refused, never waited
    on) or on an open binary file (serve.py's uploads, in memory), with the pixel budget checked from the
    header before anything is decoded (max_pixels: MAX_IMAGE_PIXELS unless given)."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    f = source if hasattr(source, "read") else open_regular(source)
    try:
        with warnings.catch_warnings():  # under the budget Pillow's bomb warning is noise; above it we refuse
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(f)
        if im.width * im.height > max_pixels:
            im.close()
            raise ImageTooLarge(f"{im.width}x{im.height} pixels", max_pixels)
        return im
    except BaseException:
        f.close()
        raise


def load_rgb(source, max_pixels: int | None = None) -> Image.Image:
    """Open any PIL-readable image (a path, or an open binary file) as RGB: EXIF rotation applied;
    transparency composited on white; grayscale, palette, CMYK, 16-bit and float images converted."""
    with open_image(source, max_pixels) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode == "P":
            im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode in ("RGBA", "LA", "PA"):
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").split()[-1])
            return bg
        if im.mode.startswith("I") or im.mode == "F":
            return _to_8_bit(im).convert("RGB")
        return im.convert("RGB")


def _to_8_bit(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grayscale image as 8-bit "L". Pillow's own convert clips these at 255,
    which turns an ordinary 16-bit PNG white: integers are scaled from 16 bits, floats from [0, 1]
    (or from their own range when they leave it)."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        low, high = (0.0, 1.0) if a.size == 0 or (a.min() >= 0 and a.max() <= 1) else (a.min(), a.max())
    else:
        low, high = 0.0, 65535.0 if a.size == 0 or a.max() <= 65535 else a.max()
    scaled = (a - low) / max(high - low, 1e-12) * 255
    return Image.fromarray(np.nan_to_num(scaled, nan=0.0).clip(0, 255).round().astype(np.uint8), mode="L")


def image_problem(e: BaseException) -> str:
    """The skip reason for an image that failed to open or decode ("kind: detail"; SkipLog counts the kind)."""
    if isinstance(e, ImageTooLarge):
        return f"image too large: over {e.args[1]:,} pixels"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image too large: over {MAX_IMAGE_PIXELS:,} pixels"
    if isinstance(e, NotRegularFile):
        return f"not a regular file: {e.kind}"
    if isinstance(e, FileNotFoundError):
        return "missing file"
    if isinstance(e, UnidentifiedImageError):
        return "unreadable image: not in any image format Pillow reads"
    detail = " ".join(str(e).split())[:120]
    return f"unreadable image: damaged or truncated ({type(e).__name__}{': ' + detail if detail else ''})"


def check_image(path: Path, root: Path | None, skips: SkipLog) -> bool:
    """Cheap header check at index time; full decoding errors are caught again when loading."""
    try:
        outside = root is not None and not path.resolve().is_relative_to(root.resolve())
        exists = path.exists()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte, a name too long for the file system
        skips.add(path, "unreadable path")
        return False
    if outside:
        skips.add(path, "outside dataset folder")
        return False
    if not exists:
        skips.add(path, "missing file")
        return False
    try:
        with open_image(path) as im:
            im.verify()
    except Exception as e:  # anything a decoder raises on a hostile file is that file's problem, not the run's
        skips.add(path, image_problem(e))
        return False
    return True


def _clean(caption) -> str:
    return " ".join(caption.split())


def _build(entries, root: Path, skips: SkipLog) -> CaptionSet:
    """entries: iterable of (image path, caption). Groups by image in first-seen order and drops bad ones."""
    grouped: dict[Path, list[str]] = {}
    bad: set[Path] = set()
    for path, caption in entries:
        path = Path(path)
        if path in bad:
            continue
        if path not in grouped:
            if not check_image(path, root, skips):
                bad.add(path)
                continue
            grouped[path] = []
        if caption is not None and not isinstance(caption, str):
            skips.add(path, f"caption is not text: {type(caption).__name__}")
            continue
        caption = _clean(caption or "")
        if not _encodable(caption):  # a lone surrogate from a broken JSON escape: no tokenizer takes it
            skips.add(path, "caption is not valid text")
        elif len(caption) > MAX_CAPTION_CHARS:
            skips.add(path, f"caption too long: {len(caption):,} characters (limit {MAX_CAPTION_CHARS:,})")
        elif caption:
            grouped[path].append(caption)
        else:
            skips.add(path, "empty caption")
    for path in [p for p, caps in grouped.items() if not caps]:
        skips.add(path, "image without captions")
        del grouped[path]
    return CaptionSet(list(grouped), list(grouped.values()))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _pick_column(header, options, what, source) -> str:
    lower = {h.strip().lower(): h for h in header if h}
    for o in options:
        if o in lower:
            return lower[o]
    raise DataError(f"{source}: no {what} column; expected one of {list(options)}, found {list(header)}")


def _join(root: Path, name: str) -> Path:
    return root / name.strip().replace("\\", "/")


# ----------------------------------------------------------------------------------------------
# custom folders

def from_captions_csv(csv_path, image_dir, skips: SkipLog) -> CaptionSet:
    """CSV with an image column and a caption column (proper CSV quoting; several rows per image).
    A row the csv module can't parse is skipped and counted as <file>:<line>."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    text = read_text(csv_path, "captions file")
    limit = csv.field_size_limit(1 << 26)  # an overlong caption is read as one field, then skipped as too long
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise DataError(f"{csv_path}: its header line is not valid CSV ({e})") from None
        if not header:
            raise DataError(f"{csv_path}: empty CSV (expected a header like 'image,caption')")
        icol = _pick_column(header, IMAGE_COLUMNS, "image", csv_path)
        ccol = _pick_column(header, CAPTION_COLUMNS, "caption", csv_path)
        entries = []
        lines_of_file = functools.cache(lambda: io.StringIO(text, newline="").readlines())  # as line_num counts
        while True:
            before = reader.line_num
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                skips.add(f"{csv_path}:{reader.line_num}", f"bad CSV row: {e}")
                continue
            if _unclosed_quote(csv_path, lines_of_file, before, row.get(ccol), skips):
                continue
            name = row.get(icol)
            if not isinstance(name, str) or not name.strip():
                skips.add(f"{csv_path}:{reader.line_num}", "row without image name")
                continue
            entries.append((_join(image_dir, name), row.get(ccol)))
    finally:
        csv.field_size_limit(limit)
    return _build(entries, image_dir, skips)


# a line with a field of its own that names an image ("dog.jpg,..." or "...,dog.jpg"): inside a quoted caption, it
# means the quote was never closed
_ROW_LIKE = re.compile(r'(?:^|,)\s*"?[^",]+\.(?:' + "|".join(e.lstrip(".") for e in sorted(IMAGE_EXTS))
                       + r')"?\s*(?:,|$)', re.I)


def _unclosed_quote(csv_path: Path, lines_of_file, before: int, caption, skips: SkipLog) -> bool:
    """A caption whose quote is never closed runs on and swallows the rows below it (the csv module reads them as
    its text). Such a row and each swallowed row are skipped and counted by line, so the user can close the quote;
    a genuine multi-line caption (no line of it looks like a row) is kept. `before`: the line the previous row
    ended on; lines_of_file(): the file's lines, split once and only when a quote is left open."""
    if not isinstance(caption, str) or "\n" not in caption:
        return False
    lines = caption.split("\n")
    swallowed = [i for i, line in enumerate(lines) if i and _ROW_LIKE.search(line.rstrip("\r"))]
    if not swallowed:
        return False
    physical = lines_of_file()
    first = before + 1
    while first < len(physical) and not physical[first - 1].rstrip("\r\n"):  # blank lines the reader skipped
        first += 1
    skips.add(f"{csv_path}:{first}", f"unclosed quote: this caption runs on over the {len(swallowed)} row(s) "
                                     "below it; close its quote")
    for i in swallowed:
        skips.add(f"{csv_path}:{first + i}", f"unclosed quote: this row was read as part of the caption on line {first}")
    return True


def from_metadata(root, skips: SkipLog) -> CaptionSet:
    """Hugging Face imagefolder layout: metadata.jsonl or metadata.csv with file_name + text/caption."""
    root = Path(root)
    entries = []
    jl = root / "metadata.jsonl"
    if jl.exists():
        for n, line in enumerate(read_text(jl, "captions file").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                icol = _pick_column(rec.keys(), IMAGE_COLUMNS, "image", jl)
                ccol = _pick_column(rec.keys(), CAPTION_COLUMNS, "caption", jl)
            except (ValueError, AttributeError, RecursionError) as e:
                skips.add(f"{jl}:{n}", f"bad metadata line: {type(e).__name__}")
                continue
            if not isinstance(rec[icol], (str, int)) or not str(rec[icol]).strip():
                skips.add(f"{jl}:{n}", "row without image name")
                continue
            caps = rec[ccol] if isinstance(rec[ccol], list) else [rec[ccol]]
            entries += [(_join(root, str(rec[icol])), c) for c in caps]
        return _build(entries, root, skips)
    return from_captions_csv(root / "metadata.csv", root, skips)


def find_images(root: Path) -> list[Path]:
    """Image files under root, recursively, sorted; hidden files and folders are ignored."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def from_sidecar_txt(root, skips: SkipLog) -> CaptionSet:
    """Each image with a .txt of the same name beside it (recursive); each non-empty line is a caption."""
    root = Path(root)
    entries = []
    for img in find_images(root):
        txt = img.with_suffix(".txt")
        if not txt.exists():
            skips.add(img, "no caption file")
            continue
        try:
            text = read_text(txt, "caption file")
        except DataError as e:  # one image's caption file among many: a counted skip, not the run's end
            skips.add(img, f"unreadable caption file: {e}")
            continue
        lines = [ln for ln in text.splitlines() if ln.strip()]
        entries += [(img, ln) for ln in lines] or [(img, "")]  # an empty file counts as one empty caption
    return _build(entries, root, skips)


def caption_from_filename(path) -> str:
    """'Brown_dog-running_02.jpg' -> 'brown dog running' (trailing counters dropped)."""
    words = re.split(r"[\s_\-.]+", Path(path).stem)
    while words and re.fullmatch(r"\(?\d+\)?", words[-1]):
        words.pop()
    return " ".join(w.lower() for w in words if w)


def from_filenames(root, skips: SkipLog) -> CaptionSet:
    root = Path(root)
    return _build([(p, caption_from_filename(p)) for p in find_images(root)], root, skips)


CAPTION_FILES = ("captions.csv", "captions.txt")
IMAGE_SUBFOLDERS = ("images", "Images")  # Kaggle's Flickr8k: captions.txt beside Images/


def _csv_header(path: Path) -> bool:
    """Does a .txt file start with a CSV header naming an image and a caption column (Kaggle's captions.txt)?"""
    try:
        with open_regular(path) as f:
            first = f.readline(4096).decode("utf-8", "replace").strip().lower()
    except OSError:
        return False
    cols = [c.strip().strip('"') for c in first.split(",")]
    return any(c in IMAGE_COLUMNS for c in cols) and any(c in CAPTION_COLUMNS for c in cols)


def _image_folder(root: Path) -> Path:
    """Where a captions file's image names point: the folder itself, or its images/ (Images/) subfolder when
    the images sit there and not beside the captions file."""
    if any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir() if p.is_file()):
        return root
    return next((root / s for s in IMAGE_SUBFOLDERS if (root / s).is_dir()), root)


def load_folder(root, skips: SkipLog, captions_file=None) -> CaptionSet:
    """Detect the layout of a custom folder (see module docstring) and load it."""
    root = Path(root)
    if not root.is_dir():
        if root.exists():
            raise DataError(f"dataset folder {root} is a file, not a folder")
        raise MissingInputError(f"dataset folder not found: {root}")
    if captions_file:
        return from_captions_csv(captions_file, root, skips)
    for name in CAPTION_FILES:  # captions.csv, or Kaggle's Flickr8k captions.txt (the same CSV), at the top
        if (root / name).exists() and (name.endswith(".csv") or _csv_header(root / name)):
            return from_captions_csv(root / name, _image_folder(root), skips)
    if (root / "metadata.jsonl").exists() or (root / "metadata.csv").exists():
        return from_metadata(root, skips)
    if any(root.rglob("*.txt")):
        return from_sidecar_txt(root, skips)
    return from_filenames(root, skips)


def split_by_image(data: CaptionSet, fractions: dict[str, float], seed: int) -> dict[str, CaptionSet]:
    """Random split of images (never of captions: an image's captions all land in one split)."""
    order = list(range(data.num_images))
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    names = list(fractions)
    for i, name in enumerate(names):
        n = data.num_images - start if i == len(names) - 1 else max(1, round(fractions[name] * data.num_images))
        if i == len(names) - 2 and fractions[names[-1]] > 0 and n == data.num_images - start and n >= 2:
            n -= 1  # a small dataset: the last split keeps one image rather than rounding down to none
        out[name] = data.subset(sorted(order[start:start + n]))
        start += n
    return out


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
    return _build(entries, image_dir, skips)


# ----------------------------------------------------------------------------------------------
# one entry point for train.py / eval.py

def load_splits(hp: dict, skips: SkipLog, which=("train", "val", "test")) -> dict[str, CaptionSet]:
    """Build the requested splits from hyperparameters (dataset, data_dir, train_dir, val_dir,
    test_dir, captions_file, split_ratio, val_ratio, seed)."""
    kind = hp.get("dataset")
    if kind is None:  # a checkpoint whose training metadata is gone doesn't say which data it was trained on
        raise DataError("no dataset named (a checkpoint without its training metadata doesn't say which data it "
                        "was trained on): pass --dataset and --data_dir (or --test_dir)")
    if kind == "flickr30k":
        return {s: load_flickr30k(s, skips, hp.get("data_dir")) for s in which}
    if kind in STYLE_OF:  # the demo datasets (shapes_b: one style-B caption per image; scenes: two shapes)
        root = ensure_shapes_dataset(hp["data_dir"], STYLE_OF[kind])
        return {s: load_folder(root / s, skips) for s in which}
    if kind != "folder":
        raise DataError(f"unknown dataset {kind!r}; expected one of {', '.join(('flickr30k', 'folder', *STYLE_OF))}")
    seed = hp.get("seed", 0)
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
    out = {"train": train, "val": val, "test": test}
    for name in which:  # an empty val / test split is allowed in training (a small folder): train.py says so
        if out[name].num_images == 0 and (name == "train" or len(which) == 1):
            raise DataError(f"the {name} split has no usable images ({skips.summary()})")
    return {s: out[s] for s in which}


# ----------------------------------------------------------------------------------------------
# several processes (accelerate launch)

def run_sharded(acc, n: int, fn) -> list:
    """Split range(n) into one contiguous share per process, run fn(indices) on this process's share
    and return every process's result, in rank order, on every process (so results concatenated in
    that order follow index order). acc None or one process: just [fn(list(range(n)))]."""
    if acc is None or acc.num_processes == 1:
        return [fn(list(range(n)))]
    with acc.split_between_processes(list(range(n))) as mine:
        part = fn(list(mine))
    return gather_object([part])


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
        return _load_item(self.data.images[img_idx], self.transform, caption=caption, image_idx=img_idx)


class ImageDataset(torch.utils.data.Dataset):
    """One sample per image (for generation); works on a CaptionSet or a plain list of paths."""

    def __init__(self, images, transform):
        self.images, self.transform = list(images), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return _load_item(self.images[i], self.transform, image_idx=i)


def _load_item(path, transform, **extra):
    try:
        image = load_rgb(path)
    except Exception as e:  # decoding a file from anywhere: whatever it raises, that image is skipped
        # an image can also turn bad after indexing (truncated, deleted, replaced by a FIFO): report it, don't crash
        return {"error": (str(path), image_problem(e))}
    try:
        pixels = transform(image)
    except (OSError, ValueError, TypeError) as e:
        return {"error": (str(path), image_problem(e))}
    return {"pixel_values": pixels, **extra}


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar caption length, in random order: shuffle all pairs, cut them into groups of
    `group` batches, sort each group by length, then shuffle the batches. Less padding per batch with
    the randomness kept; each epoch draws a new order from the generator."""

    def __init__(self, lengths, batch_size: int, generator: torch.Generator, group: int = 50):
        self.lengths, self.batch_size, self.generator, self.group = list(lengths), batch_size, generator, group

    def __len__(self):
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.batch_size * self.group
        batches = []
        for s in range(0, len(order), span):
            chunk = sorted(order[s:s + span], key=lambda i: self.lengths[i])
            batches += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


class Collate:
    """Stacks images and tokenizes captions with `tokenize(captions, max_length)` (a model's
    .tokenize: truncated, padded to the longest in the batch; pad positions have attention_mask 0
    and are ignored by the loss). Failed items are dropped and reported in batch['skipped']."""

    def __init__(self, tokenize=None, max_length: int = 128, pad_to_multiple_of: int | None = None, pad_id: int = 0):
        self.tokenize, self.max_length = tokenize, max_length
        self.pad_to_multiple_of, self.pad_id = pad_to_multiple_of, pad_id

    def __call__(self, items):
        skipped = [it["error"] for it in items if "error" in it]
        items = [it for it in items if "error" not in it]
        batch = {"skipped": skipped, "image_idx": torch.tensor([it["image_idx"] for it in items], dtype=torch.long)}
        if not items:
            return batch
        if "pixel_values" in items[0]:
            batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
        if self.tokenize is not None and "caption" in items[0]:
            enc = self.tokenize([it["caption"] for it in items], self.max_length)
            batch.update(pad_to_multiple(enc, self.pad_to_multiple_of, self.pad_id) if self.pad_to_multiple_of else enc)
        return batch


def pad_to_multiple(enc: dict, multiple: int, pad_id: int) -> dict:
    """Right-pad input_ids (with pad_id) and attention_mask (with 0) to a length that is a multiple of
    `multiple`: a compiled step then sees a few recurring shapes instead of one per caption length.
    The extra positions are masked out of attention and loss, so the loss is unchanged."""
    T = enc["input_ids"].shape[1]
    extra = -T % multiple
    if not extra:
        return enc
    return {**enc, "input_ids": torch.nn.functional.pad(enc["input_ids"], (0, extra), value=pad_id),
            "attention_mask": torch.nn.functional.pad(enc["attention_mask"], (0, extra), value=0)}
