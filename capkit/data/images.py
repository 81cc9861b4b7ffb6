"""
Reading images from anywhere, safely: regular files only, decompression bombs and odd modes handled, every
image that can't be read skipped and counted (SkipLog) rather than fatal.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from capkit.files import NotRegularFile, open_regular

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error (skipped), not silently grey pixels


# images with more pixels are skipped (counted), never decoded: Pillow's own decompression-bomb limit
# (2 x Image.MAX_IMAGE_PIXELS, ~179 MP). A 100-megapixel panorama still loads (~300 MB while decoding).
MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


# how load_rgb turns a file into pixels; features.py keys its cache on it (2: 16-bit and float grayscale
# images are scaled to 8 bits instead of clipped white, so features cached from the old pixels are stale)
DECODE_VERSION = 2


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


class ImageDataset(torch.utils.data.Dataset):
    """One sample per image (for generation); works on a CaptionSet or a plain list of paths."""

    def __init__(self, images, transform):
        self.images, self.transform = list(images), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return load_item(self.images[i], self.transform, image_idx=i)


def load_item(path, transform, **extra):
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
