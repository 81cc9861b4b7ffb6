"""
`python -m tools.bench --decode`: captioning speed on a real checkpoint, capkit's decode loop
(capkit/models/decoding.py) against transformers' `generate` (and `generate` with its static KV cache), same
features, same settings, one run. Prints images/s, ms per decoding step, peak memory and whether the captions are
identical (greedy: token for token; beams: the same final captions).

    python -m tools.bench --decode --checkpoint saved_models/model_state_dict_<run>-3.pth --images ../shared/flickr8k/dev/images
    python -m tools.bench --decode --checkpoint CKPT --images DIR --num_images 256 --batch_size 64 --beams 1 3
"""
from __future__ import annotations

import platform
import resource
import time
from pathlib import Path

import torch

from capkit.data.features import encode_split
from capkit.data.folders import find_images
from capkit.models.captioner import Generation
from capkit.runtime import pick_device
from model import load_checkpoint


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA, this phase)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


@torch.no_grad()
def caption_all(model, feats, batch_size, g: Generation, way: str) -> tuple[list, int]:
    """-> (token ids per batch, decoding steps taken) by one of: "generate", "generate+static", "capkit"."""
    ids, steps = [], 0
    for s in range(0, len(feats), batch_size):
        chunk = feats[s:s + batch_size]
        if way == "capkit":
            out = model.generate_ids(image_embeds=chunk, **vars(g))
        else:
            lead, mask = model.lead_embeds(chunk)
            gen = model.generation_config(g)
            if way == "generate+static":
                gen.cache_implementation = "static"
            out = model.lm.generate(inputs_embeds=lead, attention_mask=mask, generation_config=gen)
        ids.append(out.cpu())
        steps += out.shape[1]
    return ids, steps


def run(checkpoint, images, num_images=256, batch_size=64, beams=(1, 3), max_new_tokens=None, device="cpu",
        ways=("generate", "generate+static", "capkit")) -> None:
    model, _, hp = load_checkpoint(checkpoint, device)
    device = model.device
    paths = find_images(Path(images))[:num_images]
    if not paths:
        raise SystemExit(f"no images in {images}")
    t, (feats, _) = timed(lambda: encode_split(model, paths, batch_size), device)     # (N, E), the images read
    max_new = max_new_tokens or hp.get("max_new_tokens") or Generation().max_new_tokens
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{checkpoint}: {len(paths)} images from {images}, batch {batch_size}, max_new_tokens {max_new}, on "
          f"{device} ({name}, {torch.get_num_threads()} threads, torch {torch.__version__}); features: "
          f"{len(paths) / t:.1f} images/s (not in the figures below)")
    print(f"{'beams':>5} {'decoding':<17} {'images/s':>9} {'ms/step':>8} {'speed-up':>9}  {'captions as generate':<22} "
          "peak memory")
    for k in beams:
        g = Generation(max_new_tokens=max_new, num_beams=k)
        base, ref = None, None
        for way in ways:
            try:
                caption_all(model, feats[:batch_size], batch_size, g, way)  # warm-up: first-call costs aren't timed
                seconds, (ids, steps) = timed(lambda: caption_all(model, feats, batch_size, g, way), device)
            except Exception as e:  # (a way transformers doesn't support here: said, not fatal)
                print(f"{k:>5} {way:<17} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            caps = [c.strip() for b in ids for c in model.tokenizer.batch_decode(b, skip_special_tokens=True)]
            if ref is None:
                base, ref, ref_ids = seconds, caps, ids
            same = sum(a == b for a, b in zip(caps, ref))
            tokens = k == 1 and all(torch.equal(a, b) for a, b in zip(ids, ref_ids))
            print(f"{k:>5} {way:<17} {len(feats) / seconds:>9.2f} {1000 * seconds / steps:>8.1f} "
                  f"{base / seconds:>8.2f}x  {same}/{len(caps)}" + (" token for token" if tokens else "")
                  + f"{'':<4} {peak_memory(device)}", flush=True)


def add_arguments(ap) -> None:
    """tools/bench.py's --decode and its options."""
    ap.add_argument("--decode", action="store_true", help="capkit's decode loop vs transformers' generate on a "
                    "checkpoint (--checkpoint, --images, --num_images, --batch_size, --beams)")
    ap.add_argument("--checkpoint", help="--decode: the checkpoint (a .pth, or a folder: its newest)")
    ap.add_argument("--images", help="--decode: a folder of images to caption")
    ap.add_argument("--num_images", type=int, default=256, help="--decode: how many of them")
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 3], help="--decode: beam counts to time")


def main(args, ap) -> None:
    if not (args.checkpoint and args.images):
        ap.error("--decode needs --checkpoint and --images")
    run(args.checkpoint, args.images, args.num_images, args.batch_size or 64, args.beams,
        device=pick_device(args.device))
