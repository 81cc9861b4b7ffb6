"""
A folder of captioned images -> CaptionSet. Layouts, detected in this order: captions.csv or Kaggle's
captions.txt (image,caption, with a header, or without one when the first row names an image file; the
images beside it or in images/ / Images/) | metadata.csv / metadata.jsonl
(HF imagefolder: file_name + text or caption) | a .txt next to each image (one caption per line) | captions
made from file names ("brown_dog_running.jpg" -> "brown dog running"). Bad rows and files are counted skips.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from capkit.data.images import IMAGE_EXTS, SkipLog, check_image
from capkit.errors import DataError, MissingInputError
from capkit.files import open_regular, read_text

IMAGE_COLUMNS = ("image", "file_name", "filename", "image_name", "image_path", "path")
CAPTION_COLUMNS = ("caption", "text", "captions", "sentence")
MAX_CAPTION_CHARS = 20_000  # a longer "caption" (a pasted document, a broken CSV quote) is skipped, counted


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


def _clean(caption) -> str:
    return " ".join(caption.split())


def build_caption_set(entries, root: Path, skips: SkipLog) -> CaptionSet:
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
        caption, problem = clean_caption(caption)
        if problem:
            skips.add(path, problem)
        else:
            grouped[path].append(caption)
    for path in [p for p, caps in grouped.items() if not caps]:
        skips.add(path, "image without captions")
        del grouped[path]
    return CaptionSet(list(grouped), list(grouped.values()))


def clean_caption(caption) -> tuple[str, str | None]:
    """(the caption with its whitespace collapsed, why it can't be used or None). The one set of caption rules
    for every source: folders, Flickr30K, 🤗 datasets and WebDataset shards."""
    caption = _clean(caption or "")
    if not _encodable(caption):  # a lone surrogate from a broken JSON escape: no tokenizer takes it
        return caption, "caption is not valid text"
    if len(caption) > MAX_CAPTION_CHARS:
        return caption, f"caption too long: {len(caption):,} characters (limit {MAX_CAPTION_CHARS:,})"
    return caption, None if caption else "empty caption"


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
        if _names_an_image(header):  # seed 000's captions.csv: "image1.jpg,A sunset", no header
            return build_caption_set(_headerless_rows(text, csv_path, image_dir, skips), image_dir, skips)
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
    return build_caption_set(entries, image_dir, skips)


def _names_an_image(header: list) -> bool:
    """Is a CSV's first row an (image, caption) row rather than a header? It names an image file (by its
    extension; a missing one is then a counted skip like any row's) and no column a header would."""
    first = (header[0] or "").strip()
    return len(header) >= 2 and Path(first).suffix.lower() in IMAGE_EXTS and not any(
        h.strip().lower() in IMAGE_COLUMNS + CAPTION_COLUMNS for h in header if h)


def _headerless_rows(text: str, csv_path: Path, image_dir: Path, skips: SkipLog) -> list:
    """(image path, caption) of each `image,caption` row; an unquoted comma inside the caption stays in it."""
    entries, reader = [], csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return entries
        except csv.Error as e:
            skips.add(f"{csv_path}:{reader.line_num}", f"bad CSV row: {e}")
            continue
        if not any(c.strip() for c in row):
            continue
        if len(row) < 2 or not row[0].strip():
            skips.add(f"{csv_path}:{reader.line_num}", "row without an image name and a caption")
            continue
        entries.append((_join(image_dir, row[0]), ",".join(row[1:])))


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
        return build_caption_set(entries, root, skips)
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
    return build_caption_set(entries, root, skips)


def caption_from_filename(path) -> str:
    """'Brown_dog-running_02.jpg' -> 'brown dog running' (trailing counters dropped)."""
    words = re.split(r"[\s_\-.]+", Path(path).stem)
    while words and re.fullmatch(r"\(?\d+\)?", words[-1]):
        words.pop()
    return " ".join(w.lower() for w in words if w)


def from_filenames(root, skips: SkipLog) -> CaptionSet:
    root = Path(root)
    return build_caption_set([(p, caption_from_filename(p)) for p in find_images(root)], root, skips)


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
