"""
Evaluating a captioner on a split: teacher-forced loss, generated captions and their scores, the image
ablation (features shuffled across the set), the kNN baseline from the training datastore, and how varied the
captions are. train.py calls evaluate() after each epoch; eval.py on a checkpoint.
"""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from capkit.data.batching import length_order, run_sharded
from capkit.data.features import encode_split, image_features
from capkit.data.images import SkipLog
from capkit.evaluation.bootstrap import interval
from capkit.evaluation.metrics import cider, clip_scores, rouge_l, simple_tokenize


def image_inputs(model, images, cache_dir=None, batch_size=32, num_workers=0, skips=None, acc=None):
    """-> (inputs, indices of the images that loaded, forward keyword): frozen-encoder features, cached,
    for prefix models ("image_embeds" (N, E)); preprocessed pixels for git / blip ("pixel_values" (N, 3, S, S))."""
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
        # shortest captions first (less padding: Flickr8k's test loss took 80 s instead of 128 s on 2 CPU cores);
        # the token-weighted mean doesn't depend on the order
        idx = [idx[k] for k in length_order([pairs[j][1] for j in idx])]
        total, n_tok = 0.0, 0
        for s in range(0, len(idx), batch_size):
            chunk = [pairs[j] for j in idx[s:s + batch_size]]
            tok = model.tokenize([c for _, c in chunk], max_caption_length)
            _, loss = model(tok["input_ids"], tok["attention_mask"], **{key: inputs[[i for i, _ in chunk]]})
            n = model.loss_tokens(tok["attention_mask"])
            total, n_tok = total + loss.item() * n, n_tok + n
        return total, n_tok

    parts = run_sharded(acc, len(pairs), score)
    return sum(t for t, _ in parts) / max(sum(n for _, n in parts), 1)


def generate_all(model, inputs, batch_size=32, acc=None, key="image_embeds", **gen_kwargs) -> list[str]:
    """Captions for every row of inputs, in order, with a progress bar over images (the main process's share);
    under accelerate each process decodes its share."""
    def gen(idx):
        out = []
        with tqdm(total=len(idx), desc="Captioning", unit="img", disable=acc is not None and not acc.is_main_process) \
                as bar:
            for s in range(0, len(idx), batch_size):
                out += model.generate(**{key: inputs[idx[s:s + batch_size]]}, **gen_kwargs)
                bar.update(len(idx[s:s + batch_size]))
        return out
    return [c for part in run_sharded(acc, len(inputs), gen) for c in part]


KNN_K = 8  # the kNN baseline's neighbours: their captions are the candidates (Devlin et al. 2015 use more)


def consensus_captions(candidates: list[list[str]]) -> list[str]:
    """For each image, the candidate caption most similar to the image's other candidates (consensus re-ranking,
    Devlin et al. 2015), by CIDEr's similarity: the mean over n = 1..4 of the cosine between tf-idf n-gram vectors,
    document frequencies over all images' candidate sets (vectorised: pycocoevalcap's scorer takes a minute here)."""
    toks = [[simple_tokenize(c).split() for c in cands] for cands in candidates]
    grams = [[[Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1)) for n in range(1, 5)] for t in ts]
             for ts in toks]
    df = Counter(g for per_image in grams for g in {g for cand in per_image for counts in cand for g in counts})
    log_n = np.log(max(len(candidates), 1))
    out = []
    for cands, per_image in zip(candidates, grams):
        vocab = {g: i for i, g in enumerate({g for cand in per_image for counts in cand for g in counts})}
        sim = np.zeros((len(cands), len(cands)))
        for n in range(4):
            v = np.zeros((len(cands), max(len(vocab), 1)))
            for row, cand in enumerate(per_image):
                for g, c in cand[n].items():
                    v[row, vocab[g]] = c * (log_n - np.log(max(df[g], 1)))
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            sim += v @ v.T / 4
        np.fill_diagonal(sim, 0.0)
        out.append(cands[int(sim.sum(1).argmax())])
    return out


def knn_baseline(datastore, feats, references: list[list[str]], k: int = KNN_K) -> dict:
    """Scores of the kNN-consensus caption (from the datastore's k nearest images, by the same features the
    captioner reads) and of the nearest image's first caption, against the same references."""
    rows = datastore.neighbours(feats, k).tolist()
    consensus = consensus_captions([[c for j in row for c in datastore.captions[j]] for row in rows])
    nearest = [datastore.captions[row[0]][0] for row in rows]
    out = {"k": len(rows[0]) if rows else 0, "datastore_images": len(datastore)}
    for name, caps in (("consensus", consensus), ("nearest", nearest)):
        out[f"{name}_cider"], out[f"{name}_rouge_l"] = cider(caps, references)[0], rouge_l(caps, references)[0]
    out["captions"] = consensus
    return out


def caption_spread(captions: list[str]) -> dict:
    """How many images got a caption of their own: the share of distinct captions, and the most repeated one
    with its count. A mapper that collapsed ("the same caption for every image") shows here first."""
    counts = Counter(c.strip() for c in captions)
    top, n = counts.most_common(1)[0] if counts else ("", 0)
    return {"distinct_captions": len(counts) / len(captions) if captions else 0.0, "empty_captions": counts.get("", 0),
            "most_repeated_caption": top, "most_repeated_count": n}


def knn_line(res: dict) -> str:
    """One log line: the model's CIDEr-D against copying the nearest training captions."""
    b = res["knn_baseline"]
    return (f"kNN baseline ({b['k']} nearest of {b['datastore_images']} training images, same features): consensus "
            f"caption CIDEr-D {b['consensus_cider']:.4f}, nearest image's caption {b['nearest_cider']:.4f}; the model "
            f"{res['cider']:.4f} ({res['cider'] - b['consensus_cider']:+.4f} over the consensus)")


COLLAPSE_SHARE = 0.5  # fewer distinct captions than this share of the images: a warning in every log


def spread_line(res: dict) -> str:
    """One log line on caption_spread's figures, a warning when the captions collapsed."""
    share, n = res["distinct_captions"], res.get("num_images", 0)
    line = (f"distinct captions: {share:.0%} of {n} images; most repeated ({res['most_repeated_count']}x): "
            f"{res['most_repeated_caption']!r}")
    if share < COLLAPSE_SHARE:
        line = (f"⚠️ {line}. Fewer than half the images get a caption of their own: the mapper has not "
                "learned to tell them apart yet (train longer, or check the learning rate and the features)")
    return line


def derangement(n: int, seed: int) -> torch.Tensor:
    """A random permutation with no fixed point (Sattolo's algorithm: one n-cycle), so every image
    gets another image's features."""
    rng, p = random.Random(seed), list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        p[i], p[j] = p[j], p[i]
    return torch.tensor(p, dtype=torch.long)


def clip_score_unavailable(model, key: str) -> str | None:
    """Why CLIPScore can't be computed for this model (None: it can). It needs the image embedding of a CLIP
    whose text tower was trained against it: an open_clip encoder, fed pooled features."""
    enc = getattr(model, "image_encoder", None)
    if key != "image_embeds" or enc is None:
        return "CLIPScore needs the captioner's own CLIP image embedding (git / blip models have none)"
    if getattr(enc, "kind", None) != "open_clip":
        return (f"CLIPScore needs a CLIP text tower trained with the image encoder; this model's encoder is "
                f"{model.config.encoder_type} {model.config.encoder_name!r}, which has none")
    if model.config.encoder_features != "pooled":
        return "CLIPScore needs CLIP's pooled image embedding; this model reads patch tokens"
    return None


def no_scores(generate: bool) -> dict:
    """evaluate()'s result for a split with no readable image: the scores are None, never a misleading 0."""
    return {"num_images": 0, "loss": None, **({"rouge_l": None, "predictions": []} if generate else {})}


def evaluate(model, data, batch_size=32, max_caption_length=128, gen_kwargs=None, generate=True,
             ablate_image=False, seed=0, num_workers=0, skips: SkipLog | None = None, cache_dir=None,
             acc=None, clip_score=False, datastore=None) -> dict:
    """Loss (+ ROUGE-L and predictions when generate) on a CaptionSet; ablate_image adds the shuffled-image scores.
    Under accelerate (acc with several processes) every process must call it: each one encodes, scores and
    decodes its share, the predictions are gathered, and every process returns the same result."""
    if data.num_images == 0:  # (the same on every process: nobody enters a collective the others skip)
        return no_scores(generate)
    was_training = model.training
    model.eval()
    inputs, ok, key = image_inputs(model, data.images, cache_dir, batch_size, num_workers, skips, acc)
    if key == "image_embeds":  # small: keep on the device; pixels move there a batch at a time
        inputs = inputs.to(model.device)
    data = data.subset(ok)
    if data.num_images == 0:  # every image was unreadable (ok is gathered: the same on every process)
        model.train(was_training)
        print("note: none of the images to evaluate could be read; no scores (see the skipped inputs)")
        return no_scores(generate)
    gen_kwargs = gen_kwargs or {}
    kw = {"acc": acc, "key": key}
    res = {"num_images": data.num_images,
           "loss": caption_loss(model, inputs, data.captions, batch_size * 2, max_caption_length, **kw)}
    if generate:
        preds = generate_all(model, inputs, batch_size, **kw, **gen_kwargs)
        res["rouge_l"], per = rouge_l(preds, data.captions)
        res["cider"], per_cider = cider(preds, data.captions)
        res["intervals"] = {"rouge_l": interval(per), "cider": interval(per_cider)}  # 95 %, bootstrap over images
        res.update(caption_spread(preds))
        res["predictions"] = [{"image": str(p), "caption": c, "references": r, "rouge_l": s, "cider": d}
                              for p, c, r, s, d in zip(data.images, preds, data.captions, per, per_cider)]
        if datastore is not None and key == "image_embeds":  # does the model beat copying training captions?
            base = knn_baseline(datastore, inputs, data.captions)
            res["knn_baseline"] = {k: v for k, v in base.items() if k != "captions"}
            for row, c in zip(res["predictions"], base["captions"]):
                row["knn_caption"] = c
        if clip_score and not (why := clip_score_unavailable(model, key)):
            # the run's own CLIP: its pooled features are the inputs (patch tokens are not CLIP's embedding)
            cs = clip_scores(model.config, inputs, preds, data.captions)
            res["clip_score"], res["ref_clip_score"] = cs["clip_score"], cs["ref_clip_score"]
            for row, c, r in zip(res["predictions"], cs["clip_score_per_image"], cs["ref_clip_score_per_image"]):
                row.update(clip_score=c, ref_clip_score=r)
        elif clip_score:
            res["clip_score_absent"] = why
    if ablate_image:
        shuffled = inputs[derangement(len(inputs), seed)]
        res["ablated"] = {"loss": caption_loss(model, shuffled, data.captions, batch_size * 2, max_caption_length, **kw)}
        if generate:
            ablated = generate_all(model, shuffled, batch_size, **kw, **gen_kwargs)
            res["ablated"]["rouge_l"] = rouge_l(ablated, data.captions)[0]
            res["ablated"]["cider"] = cider(ablated, data.captions)[0]
    model.train(was_training)
    return res
