"""
The offline demo: a synthetic "shapes" captioning dataset and the tiny backbones it runs on.

    python demo_assets.py                 # rebuild demo/clip-tiny and demo/qwen3-tiny (~10 min, 2 CPU cores)
    python demo_assets.py --data data/shapes   # only write the shapes dataset (train.py --preset demo does this itself)

Why it exists: machines without a GPU or hub access can still prove that the pipeline learns.
The backbones are committed (a few MB, fp16) and load through the same code path as real weights:
  demo/clip-tiny/   open_clip_config.json + open_clip_model.safetensors  (clip_model_name="demo/clip-tiny")
  demo/qwen3-tiny/  transformers save_pretrained folder (Qwen3ForCausalLM + byte-level BPE tokenizer)
The CLIP is trained contrastively on shapes images and captions. The LM is pretrained on *pairs* of
captions of the same image ("caption_a<eos>caption_b<eos>"): a tiny LM trained on single captions
can't be steered by a prefix, because it never learned to carry content forward from its context.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

REPO_DIR = Path(__file__).resolve().parent
CLIP_DIR, LM_DIR = REPO_DIR / "demo" / "clip-tiny", REPO_DIR / "demo" / "qwen3-tiny"
SHAPES_VERSION = 1
IMAGE_SIZE = 64
POOL = 24000

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


def write_split(out: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i in range(n):
            a = random_attrs(rng)
            name = f"shape_{i:05d}.png"
            render(a, rng).save(out / name)
            for cap in captions_for(a):
                w.writerow([name, cap])


SPLITS = {"train": (2000, 1001), "val": (100, 2002), "test": (300, 3003)}  # images, seed


def ensure_shapes_dataset(data_dir) -> Path:
    """Write the shapes dataset (deterministic) unless an identical one is already there."""
    root = Path(data_dir)
    spec = {"version": SHAPES_VERSION, "splits": SPLITS, "image_size": IMAGE_SIZE}
    marker = root / "shapes_dataset.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return root
    t = time.time()
    for name, (n, seed) in SPLITS.items():
        write_split(root / name, n, seed)
    marker.write_text(json.dumps(spec))
    print(f"wrote the shapes dataset to {root} ({', '.join(f'{k}: {v[0]}' for k, v in SPLITS.items())} images, "
          f"5 captions each) in {time.time() - t:.1f}s")
    return root


# ----------------------------------------------------------------------------------------------
# building the tiny backbones (run once; the results are committed)

CLIP_CONFIG = {
    "model_cfg": {"embed_dim": 128,
                  "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
                  "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}},
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                       "resize_mode": "shortest"},
}


def _pool(n: int, seed: int):
    """n random images as a normalised tensor (n, 3, 64, 64) with their attributes."""
    rng = random.Random(seed)
    attrs = [random_attrs(rng) for _ in range(n)]
    arr = np.stack([np.asarray(render(a, rng)) for a in attrs])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    return x, attrs


def _all_attrs():
    return [{"color": c, "shape": s, "size": z, "position": p, "background": b}
            for c in COLORS for s in SHAPES for z in SIZES for p in POSITIONS for b in BACKGROUNDS]


def build_clip(seconds: float, seed: int = 0) -> None:
    import open_clip
    torch.manual_seed(seed)
    model = open_clip.CLIP(**CLIP_CONFIG["model_cfg"])
    tokenize = open_clip.get_tokenizer("ViT-B-32", context_length=24)
    xs, attrs = _pool(POOL, seed=99)
    xv, av = _pool(500, seed=98)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    rng, B, t0, step = random.Random(seed), 256, time.time(), 0
    while time.time() - t0 < seconds:
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * max(0.0, 1 - (time.time() - t0) / seconds))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.sample(range(len(attrs)), B)
        text = tokenize([rng.choice(captions_for(attrs[i])) for i in idx])
        img_f = F.normalize(model.encode_image(xs[idx]), dim=-1)
        txt_f = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        # same-attribute pairs in a batch are true positives: use soft targets over them
        key = [json.dumps(attrs[i], sort_keys=True) for i in idx]
        same = torch.tensor([[a == b for b in key] for a in key], dtype=torch.float)
        tgt = same / same.sum(1, keepdim=True)
        loss = (torch.sum(-tgt * logits.log_softmax(1), 1).mean() + torch.sum(-tgt * logits.T.log_softmax(1), 1).mean()) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % 100 == 0:
            print(f"clip step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():  # held-out image -> caption retrieval among all 720 attribute combinations
        combos = _all_attrs()
        tf = F.normalize(model.encode_text(tokenize([captions_for(a)[0] for a in combos])), dim=-1)
        pred = (F.normalize(model.encode_image(xv), dim=-1) @ tf.T).argmax(1)
        acc = np.mean([combos[j] == a for j, a in zip(pred.tolist(), av)])
        per_attr = {k: np.mean([combos[j][k] == a[k] for j, a in zip(pred.tolist(), av)]) for k in av[0]}
    print(f"clip: {step} steps; held-out image->text top-1 over 720 captions {acc:.3f}; per attribute "
          + ", ".join(f"{k} {v:.3f}" for k, v in per_attr.items()))
    from safetensors.torch import save_file
    CLIP_DIR.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, CLIP_DIR / "open_clip_model.safetensors")
    (CLIP_DIR / "open_clip_config.json").write_text(json.dumps(
        {**CLIP_CONFIG, "preprocess_cfg": {**CLIP_CONFIG["preprocess_cfg"], "size": IMAGE_SIZE},
         "capkit_build": {"steps": step, "heldout_top1": round(float(acc), 4),
                          "per_attribute": {k: round(float(v), 4) for k, v in per_attr.items()}}}, indent=2))


def build_lm(seconds: float, seed: int = 0) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    corpus = [c for a in _all_attrs() for c in captions_for(a)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    eos = tok.eos_token_id
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng, B, t0, step = random.Random(seed + 1), 128, time.time(), 0
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [eos]
    while time.time() - t0 < seconds:
        lr = 2e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * max(0.0, 1 - (time.time() - t0) / seconds))
        for g in opt.param_groups:
            g["lr"] = lr
        seqs = []
        for _ in range(B):
            caps = captions_for(random_attrs(rng))
            a, b = rng.sample(caps, 2)
            seqs.append(enc(a) + enc(b) if rng.random() < 0.8 else enc(a))  # mostly pairs, some singles
        T = max(map(len, seqs))
        ids = torch.full((B, T), eos)
        labels = torch.full((B, T), -100)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, :len(s)] = torch.tensor(s)
        mask = (labels != -100).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"lm step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model = model.half()
    model.generation_config.bos_token_id = None
    LM_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(LM_DIR)
    tok.save_pretrained(LM_DIR)
    (LM_DIR / "capkit_build.json").write_text(json.dumps({"steps": step, "final_loss": round(loss.item(), 4)}))
    print(f"lm: {step} steps, final loss {loss.item():.3f}, vocab {len(tok)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="only write the shapes dataset to this folder")
    ap.add_argument("--clip_seconds", type=float, default=480)
    ap.add_argument("--lm_seconds", type=float, default=240)
    ap.add_argument("--only", choices=["clip", "lm"])
    args = ap.parse_args()
    if args.data:
        ensure_shapes_dataset(args.data)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        if args.only != "lm":
            build_clip(args.clip_seconds)
        if args.only != "clip":
            build_lm(args.lm_seconds)
