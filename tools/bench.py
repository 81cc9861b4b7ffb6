"""
Benchmark capkit's training and generation path against a naive reference loop: same model, same data,
same machine, one run.

    python -m tools.bench --config demo                 # the shipped tiny demo backbones
    python -m tools.bench --config real-shape        # ViT-B-32 + Qwen3 with the 0.6B model's dimensions, random weights
    python -m tools.bench --config real-shape --steps 5 --captions 16 --batch_size 8
    python -m tools.bench --config real-shape --batch_size 64 --steps 50 --compile    # on a GPU: MFU + epoch time
    python -m tools.bench --mappers [--device cuda --batch_size 64 --steps 20]   # samples/s per mapper, real shapes
    python -m tools.bench --decode --checkpoint CKPT --images DIR     # capkit's decode loop vs generate (decode_bench.py)

The naive loop (how a first captioning script is usually written) encodes every batch through CLIP, pads every
caption to max_caption_length (128), computes logits on every position, trains in fp32 and
generates one image at a time, re-running the whole sequence for every token.
The real path uses features extracted once (timed separately: it is paid once per dataset, not per
epoch), dynamic padding with length-grouped batches, logits only where there are labels, the
decoder in bf16 on CUDA (fp32 on CPU, where bf16 matmuls are slower without AMX), and batched
generation with the KV cache. The last two lines printed are the speedups.
"""
from __future__ import annotations

import argparse
import copy
import random
import resource
import time

import open_clip
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from capkit.data.batching import LengthGroupedBatches, pad_to_multiple
from capkit.data.shapes import captions_for, random_attrs, render
from capkit.models.captioner import CaptionerConfig
from capkit.models.decoders import resolve_dtype, tokenize_captions
from capkit.runtime import COMPILE_PAD_MULTIPLE, compile_step, pick_device
from model import PrefixCaptioner
from tools import decode_bench
from tools.paths import DEMO_LM_DIR

CONFIGS = {
    "demo": {"batch_size": 64, "steps": 20, "captions": 64, "max_new_tokens": 24},
    "real-shape": {"batch_size": 8, "steps": 2, "captions": 8, "max_new_tokens": 20},  # 8: a first script's usual batch
}
NAIVE_MAX_CAPTION_LENGTH = 128
FLICKR30K_PAIRS = 145_000  # Karpathy train split: ~29k images x 5 captions
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


def real_shape_lm_config(tok):
    """A Qwen3 config with Qwen3-0.6B-Base's dimensions (596M parameters); weights are random."""
    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                       tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build(config: str, device):
    if config == "demo":
        cfg = CaptionerConfig(encoder_name="demo/clip-tiny", encoder_pretrained=None, lm_name="demo/qwen3-tiny",
                              mapper_prefix_length=8, mapper_hidden_dim=512, lm_dtype="float32")
        return PrefixCaptioner.from_config(cfg).to(device)
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    # any tokenizer will do: its ids index the 151,936-row table
    tok = AutoTokenizer.from_pretrained(DEMO_LM_DIR, trust_remote_code=False)
    dtype = resolve_dtype("auto", device)  # as train.py's lm_dtype=auto on this device
    lm = Qwen3ForCausalLM._from_config(real_shape_lm_config(tok), dtype=dtype)
    cfg = CaptionerConfig(encoder_name="ViT-B-32", encoder_pretrained=None, mapper_prefix_length=10,
                          lm_dtype=str(dtype).removeprefix("torch."))
    return PrefixCaptioner(cfg, clip.visual, lm, tok, preprocess).to(device)


def make_data(n: int, seed: int = 0):
    rng = random.Random(seed)
    attrs = [random_attrs(rng) for _ in range(n)]
    return [render(a, rng) for a in attrs], [rng.choice(captions_for(a)) for a in attrs]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mem(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


# ---------------------------------------------------------------------------------------------- naive reference loop
def naive_train(model, lm32, images, captions, steps, B, device):
    """Every batch: preprocess + CLIP, captions padded to 128, full logits, fp32."""
    opt = torch.optim.AdamW(model.mapper.parameters(), lr=1e-4)
    tok, emb = model.tokenizer, lm32.get_input_embeddings()
    tokens, t0 = 0, None
    for step in range(steps + 1):  # step 0 warms up
        if step == 1:
            sync(device)
            t0 = time.time()
        idx = [(step * B + i) % len(images) for i in range(B)]
        pixels = torch.stack([model.preprocess(images[i]) for i in idx]).to(device)
        feats = model.encode_images(pixels)
        prefix = model.prefix_embeds(feats).float()                                   # (B, P, H)
        enc = tok([captions[i] + tok.eos_token for i in idx], padding="max_length", truncation=True,
                  max_length=NAIVE_MAX_CAPTION_LENGTH, return_tensors="pt", add_special_tokens=False)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        labels = torch.cat([torch.full((B, prefix.shape[1]), -100, device=device), ids.masked_fill(mask == 0, -100)], 1)
        out = lm32(inputs_embeds=torch.cat([prefix, emb(ids)], 1),
                   attention_mask=torch.cat([torch.ones(B, prefix.shape[1], device=device, dtype=mask.dtype), mask], 1),
                   labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 1:
            tokens += int(mask.sum())
    sync(device)
    return time.time() - t0, tokens


@torch.no_grad()
def naive_generate(model, lm32, images, max_new_tokens, device):
    """One image at a time, no KV cache: the whole sequence is re-run for each new token."""
    emb, eos, out = lm32.get_input_embeddings(), model.tokenizer.eos_token_id, []
    for im in images:
        feats = model.encode_images(model.preprocess(im).unsqueeze(0).to(device))
        seq = model.prefix_embeds(feats).float()                                     # (1, P, H)
        ids = []
        for _ in range(max_new_tokens):
            nxt = int(lm32(inputs_embeds=seq, use_cache=False).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            seq = torch.cat([seq, emb(torch.tensor([[nxt]], device=device))], 1)
        out.append(model.tokenizer.decode(ids))
    return out


# ---------------------------------------------------------------------------------------------- real path
def real_train(model, feats, captions, steps, B, device, compile=False):
    # compiled as train.py does (static shapes, CUDA graphs on CUDA): the first batches of each shape compile
    step_model, warmup = (compile_step(model, device), 6) if compile else (model, 1)
    opt = torch.optim.AdamW(model.mapper.parameters(), lr=1e-4)
    lengths = [len(x) for x in model.tokenizer(captions, add_special_tokens=False)["input_ids"]]
    batches = iter(LengthGroupedBatches(lengths, B, torch.Generator().manual_seed(0)))
    tokens, t0 = 0, None
    for step in range(steps + warmup):
        if step == warmup:
            sync(device)
            t0 = time.time()
        try:
            idx = next(batches)
        except StopIteration:
            batches = iter(LengthGroupedBatches(lengths, B, torch.Generator().manual_seed(step)))
            idx = next(batches)
        enc = tokenize_captions(model.tokenizer, [captions[i] for i in idx], 128)
        if compile:
            enc = pad_to_multiple(enc, COMPILE_PAD_MULTIPLE, model.tokenizer.pad_token_id)
        _, loss = step_model(enc["input_ids"], enc["attention_mask"], image_embeds=feats[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += int(enc["attention_mask"].sum())
    sync(device)
    return time.time() - t0, tokens


# ---------------------------------------------------------------------------------------------- mappers
# each mapper at its default size (train.py's hyperparameters) on the features it takes
MAPPER_BENCH = (("mlp", "pooled"), ("linear", "pooled"), ("transformer", "pooled"), ("transformer", "tokens"),
                ("resampler", "tokens"))


def bench_mappers(device, steps: int, B: int) -> None:
    """The real shapes (ViT-B-32 + Qwen3-0.6B dims, random weights; the decoder in bf16 on CUDA, fp32 on CPU, as
    train.py's lm_dtype=auto, since a bf16 step without AMX takes minutes): training samples/s with each mapping
    network, from cached features (the one-off extraction excluded)."""
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    tok = AutoTokenizer.from_pretrained(DEMO_LM_DIR, trust_remote_code=False)
    dtype = resolve_dtype("auto", device)  # as train.py's lm_dtype=auto on this device
    lm_dtype = str(dtype).removeprefix("torch.")  # bfloat16 or float32
    lm = Qwen3ForCausalLM._from_config(real_shape_lm_config(tok), dtype=dtype).to(device)
    images, captions = make_data(B * (steps + 1))
    print(f"mappers at the real shapes on {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {torch.get_num_threads()} threads): "
          f"ViT-B-32 + Qwen3-0.6B dims, decoder in {lm_dtype}, batch {B}, {steps} timed step(s) after one warm-up")
    print(f"{'mapper':<12} {'features':<8} {'params':>9} {'samples/s':>10} {'step s':>8}  peak memory")
    for mapper_type, features in MAPPER_BENCH:
        cfg = CaptionerConfig(encoder_name="ViT-B-32", encoder_pretrained=None, mapper_type=mapper_type,
                              encoder_features=features, lm_dtype=lm_dtype)
        model = PrefixCaptioner(cfg, clip.visual, lm, tok, preprocess).to(device).train()
        feats = encode_pil(model, images, device)                                   # (N, E) or (N, 49, 768)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, _ = real_train(model, feats, captions, steps, B, device)
        n = sum(p.numel() for p in model.mapper.parameters())
        print(f"{mapper_type:<12} {features:<8} {n / 1e6:>8.1f}M {steps * B / seconds:>10.2f} {seconds / steps:>8.2f}  "
              f"{peak_mem(device)}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="demo")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--captions", type=int)
    ap.add_argument("--batch_size", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the real path's training step")
    ap.add_argument("--mappers", action="store_true", help="samples/s of each mapper at the real shapes")
    decode_bench.add_arguments(ap)
    args = ap.parse_args()
    if args.decode:
        return decode_bench.main(args, ap)
    c = {**CONFIGS[args.config], **{k: v for k in ("steps", "captions", "batch_size") if (v := getattr(args, k))}}
    device = pick_device(args.device)
    if args.mappers:
        return bench_mappers(device, args.steps or 1, args.batch_size or 8)
    torch.manual_seed(0)
    model = build(args.config, device).train()
    # the naive loop trains in fp32: on a bf16 GPU model it gets an fp32 copy of the same weights
    lm32 = model.lm if next(model.lm.parameters()).dtype == torch.float32 else copy.deepcopy(model.lm).float()
    n_img = max(c["steps"] + 1, 1) * c["batch_size"]
    images, captions = make_data(max(n_img, c["captions"]))
    B, steps, M, T = c["batch_size"], c["steps"], c["captions"], c["max_new_tokens"]
    n_params = sum(p.numel() for p in model.lm.parameters())
    print(f"config {args.config} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads): batch {B}, {steps} timed steps, {M} captions, decoder {n_params / 1e6:.0f}M params")

    start = copy.deepcopy(model.mapper.state_dict())  # every phase starts from the same MLP weights
    naive_s, naive_tok = naive_train(model, lm32, images, captions, steps, B, device)
    naive_mem = peak_mem(device)
    model.mapper.load_state_dict(start)
    sync(device)
    t = time.time()
    naive_caps = naive_generate(model.eval(), lm32, images[:M], T, device)
    sync(device)
    naive_gen_s = time.time() - t

    if lm32 is not model.lm:
        del lm32  # the fp32 copy is the naive loop's; it must not count in the real path's peak memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.time()
    feats = encode_pil(model, images, device)
    extract_s = time.time() - t
    model.mapper.load_state_dict(start)
    model.train()
    real_s, real_tok = real_train(model, feats, captions, steps, B, device, args.compile)
    real_mem = peak_mem(device)
    model.mapper.load_state_dict(start)
    model.eval()
    sync(device)
    t = time.time()
    with torch.no_grad():
        f = encode_pil(model, images[:M], device)
        real_caps = model.generate(image_embeds=f, max_new_tokens=T)
    sync(device)
    real_gen_s = time.time() - t
    same = sum(a.strip() == b.strip() for a, b in zip(naive_caps, real_caps))

    rows = [("naive loop", naive_s, naive_tok, naive_gen_s, naive_mem),
            ("capkit", real_s, real_tok, real_gen_s, real_mem)]
    print(f"\n{'path':<16} {'train samples/s':>16} {'caption tok/s':>14} {'captions/s':>11}  peak memory")
    for name, s, tok, g, mem in rows:
        print(f"{name:<16} {steps * B / s:>16.2f} {tok / s:>14.1f} {M / g:>11.2f}  {mem}")
    print(f"feature extraction (once per dataset, not per epoch): {len(images) / extract_s:.1f} images/s")
    print(f"greedy captions identical between the two paths: {same}/{M}")
    print(f"a Flickr30K epoch (145,000 pairs) at capkit's training rate: {FLICKR30K_PAIRS * real_s / (steps * B):.0f} s")
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        flops = 4 * n_params * (real_tok + steps * B * model.config.mapper_prefix_length) / real_s
        print("model FLOP utilisation (MLP-only training ~ 4 x decoder params x tokens): "
              + (f"{100 * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s bf16" if peak else f"{flops / 1e12:.1f} TFLOP/s"))
    print(f"train_speedup_vs_naive_loop: {naive_s / real_s:.2f}")
    print(f"generate_speedup_vs_naive_loop: {naive_gen_s / real_gen_s:.2f}")


@torch.no_grad()
def encode_pil(model, images, device, batch_size=64):
    """Batched preprocessing + encoding of in-memory images (the real path's one-off extraction)."""
    out = [model.encode_images(torch.stack([model.preprocess(im) for im in images[s:s + batch_size]]).to(device))
           for s in range(0, len(images), batch_size)]
    return torch.cat(out)                                                            # (N, E)


if __name__ == "__main__":
    main()
