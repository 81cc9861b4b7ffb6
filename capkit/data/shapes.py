"""
The synthetic "shapes" captioning dataset: the offline demo's data. Coloured shapes on plain
backgrounds, each image with five human-like phrasings of the same facts (like five Flickr annotators),
written as a folder dataset (images + captions.csv) that dataset.py reads like any user's folder.

    python -m capkit.data.shapes data/shapes          # write it (train.py --preset demo does this itself)

    from capkit.data.shapes import write_split, render, random_attrs, captions_for

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

from capkit.errors import DataError

SHAPES_VERSION = 3  # 3: the scenes style (a written dataset with another version is rewritten)
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
    im = Image.new("RGB", (S, S), _jitter(BACKGROUNDS[a["background"]], rng))
    cx, cy = POSITIONS[a["position"]]
    cx, cy = (cx + rng.uniform(-0.04, 0.04)) * S, (cy + rng.uniform(-0.04, 0.04)) * S
    draw_shape(ImageDraw.Draw(im), a["shape"], cx, cy, SIZES[a["size"]] * S * rng.uniform(0.9, 1.1),
               _jitter(COLORS[a["color"]], rng))
    return im.resize((size, size), Image.LANCZOS)


def _jitter(rgb, rng: random.Random) -> tuple:
    return tuple(min(255, max(0, x + rng.randint(-18, 18))) for x in rgb)


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, col: tuple) -> None:
    """One shape of half extent r centred at (cx, cy), in pixels."""
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "square":
        q = r * 0.85
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=col)
    else:  # five-pointed star
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=col)


# ----------------------------------------------------------------------------------------------
# "scenes": two shapes and the relation between them, the harder demo (dataset="scenes"). Which colour
# goes with which shape, and which object is where, are exactly what one pooled embedding tends to blur
# (CLIP's known weakness at attribute binding and spatial relations); the patch tokens keep them apart.

RELATIONS = {"to the left of": (-1, 0), "to the right of": (1, 0), "above": (0, -1), "below": (0, 1)}
_INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
SCENE_SIZES = {"small": 0.11, "large": 0.19}
# the object named first (a) is always the left or the upper one, so an image's five captions follow from the image:
# drawn either way, a perfect caption of the other order would score against references of one order only.
# Phrasings 2 and 5 still name b first, with the relation inverted.
NAMED_FIRST = ("to the left of", "above")


def random_scene(rng: random.Random) -> dict:
    """Two objects that differ in colour or shape (so every caption names one scene), a relation of the first
    to the second, a background."""
    def obj():
        return {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "size": rng.choice(list(SCENE_SIZES))}
    a, b = obj(), obj()
    while (a["color"], a["shape"]) == (b["color"], b["shape"]):
        b = obj()
    return {"a": a, "b": b, "relation": rng.choice(NAMED_FIRST), "background": rng.choice(list(BACKGROUNDS))}


def vary_scene(sc: dict, rng: random.Random) -> dict:
    """The same scene with one thing changed: an object's colour, shape or size, or the relation (a near miss,
    for contrastive training that must notice each attribute)."""
    while True:
        out = json.loads(json.dumps(sc))
        what = rng.choice(["a", "b", "relation"])
        if what == "relation":
            out["relation"] = rng.choice([r for r in NAMED_FIRST if r != sc["relation"]])
        else:
            key = rng.choice(["color", "shape", "size"])
            pool = {"color": list(COLORS), "shape": SHAPES, "size": list(SCENE_SIZES)}[key]
            out[what][key] = rng.choice([v for v in pool if v != sc[what][key]])
        if (out["a"]["color"], out["a"]["shape"]) != (out["b"]["color"], out["b"]["shape"]):
            return out


def render_scene(sc: dict, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Object a placed on the relation's side of object b, the pair somewhere near the middle."""
    S = size * 4
    im = Image.new("RGB", (S, S), _jitter(BACKGROUNDS[sc["background"]], rng))
    d = ImageDraw.Draw(im)
    dx, dy = RELATIONS[sc["relation"]]
    mx, my = 0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05)
    for obj, sign in ((sc["a"], 1), (sc["b"], -1)):
        off = 0.23 + rng.uniform(-0.02, 0.02)
        cx = (mx + sign * dx * off + (rng.uniform(-0.05, 0.05) if dx == 0 else 0)) * S
        cy = (my + sign * dy * off + (rng.uniform(-0.05, 0.05) if dy == 0 else 0)) * S
        draw_shape(d, obj["shape"], cx, cy, SCENE_SIZES[obj["size"]] * S * rng.uniform(0.9, 1.1),
                   _jitter(COLORS[obj["color"]], rng))
    return im.resize((size, size), Image.LANCZOS)


def scene_captions(sc: dict) -> list[str]:
    """Five phrasings; two of them put the second object first (with the inverse relation)."""
    def phrase(o, big=None):
        return f"{(big or {}).get(o['size'], o['size'])} {o['color']} {o['shape']}"
    a, b, r, bg = sc["a"], sc["b"], sc["relation"], sc["background"]
    inv = _INVERSE[r]
    return [
        f"a {phrase(a)} {r} a {phrase(b)} on a {bg} background",
        f"a {phrase(b, _BIG)} {inv} a {phrase(a, _BIG)} in a {bg} picture",
        f"on a {bg} background there is a {phrase(a, _HUGE)} {r} a {phrase(b, _HUGE)}",
        f"the {phrase(a)} is {r} the {phrase(b)} on {bg}",
        f"{bg} image showing a {phrase(b)} with a {phrase(a)} {r} it",
    ]


SPLITS = {"train": (2000, 1001), "val": (100, 2002), "test": (300, 3003)}  # images, seed
STYLE_B_SPLITS = {"train": (600, 1101), "val": (50, 2102), "test": (200, 3103)}  # git_demo: style B captions
SCENE_SPLITS = {"train": (4000, 1201), "val": (100, 2202), "test": (300, 3203)}
# style -> (draw one example's facts, render them, their captions, the splits, image file prefix)
DATASET_NAMES = {"all": "shapes", "b": "shapes_b", "scenes": "scenes"}  # dataset= for each style
STYLE_OF = {v: k for k, v in DATASET_NAMES.items()}
STYLES = {"all": (random_attrs, render, captions_for, SPLITS, "shape"),
          "b": (random_attrs, render, lambda a: [caption_style_b(a)], STYLE_B_SPLITS, "shape"),
          "scenes": (random_scene, render_scene, scene_captions, SCENE_SPLITS, "scene")}


def write_split(out: Path, n: int, seed: int, style: str = "all") -> None:
    """n images; captions: "all" = the five phrasings, "b" = style B only, "scenes" = two-shape scenes."""
    draw, paint, caption, _, prefix = STYLES[style]
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i in range(n):
            a = draw(rng)
            name = f"{prefix}_{i:05d}.png"
            paint(a, rng).save(out / name)
            for cap in caption(a):
                w.writerow([name, cap])


def _only_shapes(root: Path, splits: dict) -> bool:
    """Does root hold nothing but (part of) a shapes dataset, e.g. one whose writing was interrupted?"""
    if not root.is_dir():
        return False
    for entry in root.iterdir():
        if entry.name not in splits or not entry.is_dir() or not all(
                f.name == "captions.csv" or re.fullmatch(r"(shape|scene)_\d{5}\.png", f.name) for f in entry.iterdir()):
            return False
    return True


def ensure_shapes_dataset(data_dir, style: str = "all") -> Path:
    """Write the shapes dataset (deterministic) unless an identical one is already there."""
    root = Path(data_dir)
    splits = STYLES[style][3]
    spec = {"version": SHAPES_VERSION, "splits": splits, "image_size": IMAGE_SIZE, "style": style}
    marker = root / "shapes_dataset.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return root
    if not marker.exists() and root.exists() and not _only_shapes(root, splits):
        # e.g. `--preset demo --data_dir=my_photos/`: the preset's dataset="shapes" would write over their captions
        raise DataError(f"data_dir {root} holds other files and is not a capkit shapes dataset; dataset="
                        f"{DATASET_NAMES[style]} (the demo's synthetic data) writes its images "
                        "and captions.csv there. For your own photos use --dataset=folder; for the demo, another data_dir")
    t = time.time()
    for name, (n, seed) in splits.items():
        write_split(root / name, n, seed, style)
    marker.write_text(json.dumps(spec))
    print(f"wrote the shapes dataset to {root} ({', '.join(f'{k}: {v[0]}' for k, v in splits.items())} images, "
          f"{'1 style-B caption' if style == 'b' else '5 captions'} each) in {time.time() - t:.1f}s")
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(f"usage: python -m capkit.data.shapes DATA_DIR\n{__doc__}")
    ensure_shapes_dataset(sys.argv[1])
