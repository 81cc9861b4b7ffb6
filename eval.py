"""
Evaluate a checkpoint on held-out data: validation loss and ROUGE-L, with per-image predictions.

    python eval.py --checkpoint saved_models/model_state_dict_20261122_120000-3.pth
    python eval.py --checkpoint saved_models/adapter_20261122_120000-3        # git / blip adapter (or merged folder)
    python eval.py --checkpoint ...pth --split val --output preds.json
    python eval.py --checkpoint ...pth --ablate_image     # also score with images shuffled across the set
    accelerate launch --multi_gpu --num_processes 4 eval.py --checkpoint ...pth   # decode on 4 GPUs

The dataset comes from the checkpoint's training metadata (the JSON next to it); --data_dir etc.
point at another copy. ROUGE-L here = mean over images of the best rouge_score ROUGE-L F-measure
between the generated caption and each of that image's references (Porter stemming on).
--ablate_image gives every image another image's features (a derangement, seeded): if captions
really depend on the image, ROUGE-L drops and the loss rises.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from dataset import SkipLog, run_sharded
from features import encode_split, image_features


def rouge_l(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """Mean over images of max over references of rouge_score's ROUGE-L F (stemmed)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per = [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in zip(predictions, references)]
    return (sum(per) / len(per) if per else 0.0), per


def image_inputs(model, images, cache_dir=None, batch_size=32, num_workers=0, skips=None, acc=None):
    """-> (inputs, indices of the images that loaded, forward keyword): frozen-CLIP features, cached,
    for clip_mlp ("image_embeds" (N, E)); preprocessed pixels for git / blip ("pixel_values" (N, 3, S, S))."""
    if model.supports_feature_cache:
        x, ok = image_features(model, images, cache_dir, batch_size, num_workers, skips, acc=acc)
        return x, ok, "image_embeds"
    x, ok = encode_split(model, images, batch_size, num_workers, skips, progress=True, acc=acc, encode=False)
    return x, ok, "pixel_values"


@torch.no_grad()
def caption_loss(model, inputs, captions, batch_size=64, max_caption_length=128, acc=None, key="image_embeds") -> float:
    """Teacher-forced loss averaged over caption tokens; captions[i] are the references of inputs[i].
    Under accelerate each process scores its share of the pairs and the token-weighted sums are combined."""
    pairs = [(i, c) for i, caps in enumerate(captions) for c in caps]

    def score(idx):
        total, n_tok = 0.0, 0
        for s in range(0, len(idx), batch_size):
            chunk = [pairs[j] for j in idx[s:s + batch_size]]
            tok = model.tokenize([c for _, c in chunk], max_caption_length)
            _, loss = model(tok["input_ids"], tok["attention_mask"], **{key: inputs[[i for i, _ in chunk]]})
            n = _n_targets(model, tok["attention_mask"])
            total, n_tok = total + loss.item() * n, n_tok + n
        return total, n_tok

    parts = run_sharded(acc, len(pairs), score)
    return sum(t for t, _ in parts) / max(sum(n for _, n in parts), 1)


def _n_targets(model, attention_mask) -> int:
    """How many tokens a batch's loss averages over (git / blip never predict their BOS)."""
    return int(attention_mask.sum()) - (0 if model.config.model_type == "clip_mlp" else attention_mask.shape[0])


def generate_all(model, inputs, batch_size=32, acc=None, key="image_embeds", **gen_kwargs) -> list[str]:
    """Captions for every row of inputs, in order; under accelerate each process decodes its share."""
    def gen(idx):
        return [c for s in range(0, len(idx), batch_size)
                for c in model.generate(**{key: inputs[idx[s:s + batch_size]]}, **gen_kwargs)]
    return [c for part in run_sharded(acc, len(inputs), gen) for c in part]


def derangement(n: int, seed: int) -> torch.Tensor:
    """A random permutation with no fixed point (Sattolo's algorithm: one n-cycle), so every image
    gets another image's features."""
    rng, p = random.Random(seed), list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        p[i], p[j] = p[j], p[i]
    return torch.tensor(p, dtype=torch.long)


def evaluate(model, data, batch_size=32, max_caption_length=128, gen_kwargs=None, generate=True,
             ablate_image=False, seed=0, num_workers=0, skips: SkipLog | None = None, cache_dir=None,
             acc=None) -> dict:
    """Loss (+ ROUGE-L and predictions when generate) on a CaptionSet; ablate_image adds the shuffled-image scores.
    Under accelerate (acc with several processes) every process must call it: each one encodes, scores and
    decodes its share, the predictions are gathered, and every process returns the same result."""
    was_training = model.training
    model.eval()
    inputs, ok, key = image_inputs(model, data.images, cache_dir, batch_size, num_workers, skips, acc)
    if key == "image_embeds":  # small: keep on the device; pixels move there a batch at a time
        inputs = inputs.to(model.device)
    data = data.subset(ok)
    gen_kwargs = gen_kwargs or {}
    kw = {"acc": acc, "key": key}
    res = {"num_images": data.num_images,
           "loss": caption_loss(model, inputs, data.captions, batch_size * 2, max_caption_length, **kw)}
    if generate:
        preds = generate_all(model, inputs, batch_size, **kw, **gen_kwargs)
        res["rouge_l"], per = rouge_l(preds, data.captions)
        res["predictions"] = [{"image": str(p), "caption": c, "references": r, "rouge_l": s}
                              for p, c, r, s in zip(data.images, preds, data.captions, per)]
    if ablate_image:
        shuffled = inputs[derangement(len(inputs), seed)]
        res["ablated"] = {"loss": caption_loss(model, shuffled, data.captions, batch_size * 2, max_caption_length, **kw)}
        if generate:
            res["ablated"]["rouge_l"] = rouge_l(generate_all(model, shuffled, batch_size, **kw, **gen_kwargs),
                                                data.captions)[0]
    model.train(was_training)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a model_state_dict_*.pth, adapter_* folder or merged folder")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    ap.add_argument("--output", help="predictions JSON (default: next to the checkpoint)")
    ap.add_argument("--ablate_image", action="store_true", help="also score with images shuffled across the set")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--num_beams", type=int, default=None)
    for key in ("dataset", "data_dir", "train_dir", "val_dir", "test_dir", "captions_file"):
        ap.add_argument(f"--{key}", default=None, help="override the training run's value")
    args = ap.parse_args(argv)

    from accelerate import Accelerator

    from dataset import load_splits
    from load_model_example import load_model_from_checkpoint
    from model import HubUnavailableError
    from train import pick_device
    # under `accelerate launch` each process decodes its share of the images; one process otherwise
    acc = Accelerator(cpu=args.device == "cpu")
    device = acc.device if acc.num_processes > 1 else pick_device(args.device)
    try:
        model, meta, hp = load_model_from_checkpoint(args.checkpoint, device)
        hp = {**hp, **{k: v for k in ("dataset", "data_dir", "train_dir", "val_dir", "test_dir", "captions_file")
                       if (v := getattr(args, k)) is not None}}
        skips = SkipLog()
        data = load_splits(hp, skips, which=(args.split,))[args.split]
    except (HubUnavailableError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = {"max_new_tokens": args.max_new_tokens or hp.get("max_new_tokens", 40),
           "num_beams": args.num_beams or hp.get("num_beams", 1)}
    res = evaluate(model, data, batch_size=args.batch_size or hp.get("eval_batch_size", 32),
                   max_caption_length=hp.get("max_caption_length", 128), gen_kwargs=gen,
                   ablate_image=args.ablate_image, seed=hp.get("seed", 0), skips=skips,
                   cache_dir=hp.get("feature_cache_dir"), acc=acc)
    if not acc.is_main_process:
        return 0
    out = Path(args.output) if args.output else Path(args.checkpoint).with_name(
        Path(args.checkpoint).stem.replace("model_state_dict", f"predictions_{args.split}") + ".json")
    summary = {k: v for k, v in res.items() if k != "predictions"}
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"checkpoint": str(args.checkpoint), "split": args.split, **summary,
                   "skipped_inputs": dict(skips.counts), "predictions": res["predictions"]}, f, indent=2)
    print(f"{args.split}: {res['num_images']} images; {skips.summary()}")
    print(f"📈 loss: {res['loss']:.4f}")
    print(f"🎯 ROUGE-L: {res['rouge_l']:.4f}")
    if args.ablate_image:
        a = res["ablated"]
        print(f"🔀 images shuffled: loss {a['loss']:.4f}, ROUGE-L {a['rouge_l']:.4f} "
              f"(ROUGE-L drop {res['rouge_l'] - a['rouge_l']:.4f})")
    print(f"predictions: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
