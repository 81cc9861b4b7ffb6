"""
The synthetic "shapes" captioning dataset: the offline demo's data. Coloured shapes on plain
backgrounds, each image with five human-like phrasings of the same facts (like five Flickr annotators),
written as a folder dataset (images + captions.csv) that dataset.py reads like any user's folder.

    python shapes.py data/shapes          # write it (train.py --preset demo does this itself)

    from shapes import write_split, render, random_attrs, captions_for

It imports no model code: the demo backbones that were trained on it are built by demo_assets.py.
"""
from __future__ import annotations

import csv
import json
import math
import random
import re
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from errors import DataError

SHAPES_VERSION = 1
IMAGE_SIZE = 64

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 215, 40),
          "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.12, "large": 0.24}                    # half extent, as a fraction of the image side
POSITIONS = {"center": (0.5, 0.5), "top left": (0.27, 0.27), "top right": (0.73, 0.27),
             "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}

# five phrasings, each with its own synonyms and word order, like five Flickr annotators
_BIG = {"small": "little", "large": "big"}
_HUGE = {"small": "tiny", "large": "huge"}
_SHAPE2 = {"circle": "dot", "square": "box", "triangle": "triangle", "star": "star"}
_POS2 = {"center": "middle", "top left": "upper left", "top right": "upper right",
         "bottom left": "lower left", "bottom right": "lower right"}


def captions_for(a: dict) -> list[str]:
    c, s, z, p, b = a["color"], a["shape"], a["size"], a["position"], a["background"]
    near = "near the center" if p == "center" else f"near the {p} corner"
    return [
        f"a {z} {c} {s} in the {p} on a {b} background",
        f"a {_BIG[z]} {c} {_SHAPE2[s]} at the {_POS2[p]} of a {b} picture",
        f"on a {b} background there is a {_HUGE[z]} {c} {s} {near}",
        f"the {c} {s} is {z} and sits in the {_POS2[p]} of the {b} frame",
        f"{b} image showing a {_BIG[z]} {c} {_SHAPE2[s]} in the {p}",
    ]


def caption_style_a(a: dict) -> str:
    """The one phrasing the tiny GIT / BLIP are pretrained on."""
    return captions_for(a)[0]


def caption_style_b(a: dict) -> str:
    """Another phrasing (the parts in another order) that the git_demo adapters must learn. It uses
    only style A's words on purpose: the tiny base only ever trained the embeddings of those (its
    tied input/output embeddings for other words are still random, and adapters don't touch them;
    measured: with new words, LoRA stalled at loss 3.4). A real git-base knows the whole vocabulary."""
    return f"on a {a['background']} background in the {a['position']} a {a['size']} {a['color']} {a['shape']}"


def random_attrs(rng: random.Random) -> dict:
    return {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "size": rng.choice(list(SIZES)),
            "position": rng.choice(list(POSITIONS)), "background": rng.choice(list(BACKGROUNDS))}


def render(a: dict, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw at 4x and downsample (anti-aliased edges); small jitter in place, size and colour."""
    S = size * 4
    jit = lambda v: tuple(min(255, max(0, x + rng.randint(-18, 18))) for x in v)
    im = Image.new("RGB", (S, S), jit(BACKGROUNDS[a["background"]]))
    d = ImageDraw.Draw(im)
    cx, cy = POSITIONS[a["position"]]
    cx, cy = (cx + rng.uniform(-0.04, 0.04)) * S, (cy + rng.uniform(-0.04, 0.04)) * S
    r = SIZES[a["size"]] * S * rng.uniform(0.9, 1.1)
    col = jit(COLORS[a["color"]])
    if a["shape"] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif a["shape"] == "square":
        q = r * 0.85
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=col)
    elif a["shape"] == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=col)
    else:  # five-pointed star
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=col)
    return im.resize((size, size), Image.LANCZOS)


CAPTION_STYLES = {"all": captions_for, "b": lambda a: [caption_style_b(a)]}


def write_split(out: Path, n: int, seed: int, style: str = "all") -> None:
    """n images; captions: "all" = the five phrasings, "b" = style B only."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i in range(n):
            a = random_attrs(rng)
            name = f"shape_{i:05d}.png"
            render(a, rng).save(out / name)
            for cap in CAPTION_STYLES[style](a):
                w.writerow([name, cap])


SPLITS = {"train": (2000, 1001), "val": (100, 2002), "test": (300, 3003)}  # images, seed
STYLE_B_SPLITS = {"train": (600, 1101), "val": (50, 2102), "test": (200, 3103)}  # git_demo: style B captions


def _only_shapes(root: Path, splits: dict) -> bool:
    """Does root hold nothing but (part of) a shapes dataset, e.g. one whose writing was interrupted?"""
    if not root.is_dir():
        return False
    for entry in root.iterdir():
        if entry.name not in splits or not entry.is_dir() or not all(
                f.name == "captions.csv" or re.fullmatch(r"shape_\d{5}\.png", f.name) for f in entry.iterdir()):
            return False
    return True


def ensure_shapes_dataset(data_dir, style: str = "all") -> Path:
    """Write the shapes dataset (deterministic) unless an identical one is already there."""
    root = Path(data_dir)
    splits = SPLITS if style == "all" else STYLE_B_SPLITS
    spec = {"version": SHAPES_VERSION, "splits": splits, "image_size": IMAGE_SIZE, "style": style}
    marker = root / "shapes_dataset.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return root
    if not marker.exists() and root.exists() and not _only_shapes(root, splits):
        # e.g. `--preset demo --data_dir=my_photos/`: the preset's dataset="shapes" would write over their captions
        raise DataError(f"data_dir {root} holds other files and is not a capkit shapes dataset; dataset="
                        f"{'shapes' if style == 'all' else 'shapes_b'} (the demo's synthetic data) writes its images "
                        "and captions.csv there. For your own photos use --dataset=folder; for the demo, another data_dir")
    t = time.time()
    for name, (n, seed) in splits.items():
        write_split(root / name, n, seed, style)
    marker.write_text(json.dumps(spec))
    print(f"wrote the shapes dataset to {root} ({', '.join(f'{k}: {v[0]}' for k, v in splits.items())} images, "
          f"{'5 captions' if style == 'all' else '1 style-B caption'} each) in {time.time() - t:.1f}s")
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(f"usage: python shapes.py DATA_DIR\n{__doc__}")
    ensure_shapes_dataset(sys.argv[1])
