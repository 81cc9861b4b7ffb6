"""Numbers you can trust: the bootstrap interval contains the point estimate and shrinks with more images; the paired
difference of a file with itself is 0; eval.py --compare prints B - A with its interval and writes a page with both
captions per image (rendered in headless Chromium, as the report's test does)."""
import json
import random

import numpy as np
import pytest
from conftest import write_image
from test_report import chromium

import eval as eval_mod
from capkit.evaluation.bootstrap import interval, paired


def test_the_interval_holds_the_mean_and_narrows_with_more_images():
    rng = random.Random(0)
    few = [rng.random() for _ in range(50)]
    many = [rng.random() for _ in range(2000)]
    for x in (few, many):
        lo, hi = interval(x)
        assert lo < np.mean(x) < hi
    assert interval(many)[1] - interval(many)[0] < 0.35 * (interval(few)[1] - interval(few)[0])
    assert interval(few) == interval(few) and interval(few, seed=1) != interval(few)  # seeded
    assert all(np.isnan(interval([])))


def test_every_coco_metric_has_an_interval_around_it_that_narrows_with_more_images():
    """Corpus BLEU rebuilt from the per-image counts is pycocoevalcap's to the last digit; each metric's interval
    holds its value and is narrower on 400 images than on 40."""
    from test_metrics import REF

    from capkit.evaluation.metrics import bleu_statistics, caption_metrics, corpus_bleu, simple_tokenize
    gts = json.loads((REF / "coco_fakecap_1000/gts.json").read_text())
    res = {k: v[0] for k, v in json.loads((REF / "coco_fakecap_1000/res.json").read_text()).items()}
    ids = sorted(gts)
    widths = {}
    for n in (40, 400):
        m = caption_metrics({i: gts[i] for i in ids[:n]}, {i: res[i] for i in ids[:n]})
        keys = [k for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr") if k in m]
        assert set(keys) == set(m["intervals"]) and len(keys) >= 6
        for k in keys:
            lo, hi = m["intervals"][k]
            assert lo < m[k] < hi, (k, lo, m[k], hi)
        widths[n] = {k: m["intervals"][k][1] - m["intervals"][k][0] for k in keys}
    assert all(widths[400][k] < 0.6 * widths[40][k] for k in widths[40])
    tok = {i: [simple_tokenize(r) for r in gts[i]] for i in ids[:100]}
    out = {i: [simple_tokenize(res[i])] for i in ids[:100]}
    from pycocoevalcap.bleu.bleu import Bleu
    theirs, _ = Bleu(4).compute_score(tok, out, verbose=0)
    np.testing.assert_allclose(corpus_bleu(bleu_statistics(tok, out).sum(0)), theirs, rtol=1e-12)


def test_a_paired_difference_sees_a_real_gain_and_none_between_equals():
    rng = random.Random(1)
    a = [rng.random() for _ in range(300)]
    same = paired(a, a)
    assert same["difference"] == 0 and same["interval"] == (0.0, 0.0) and same["b_better"] == 0
    better = paired(a, [x + 0.05 + rng.gauss(0, 0.1) for x in a])
    assert better["interval"][0] > 0 and better["b_better"] > 0.99
    with pytest.raises(ValueError, match="same images"):
        paired(a, a[:-1])


def predictions_file(tmp_path, name, captions, shift=0.0):
    rows = []
    for i, cap in enumerate(captions):
        img = write_image(tmp_path / "imgs" / f"{i}.png", color=(30 * i % 255, 120, 200), size=(64, 64))
        rows.append({"image": str(img), "caption": cap, "references": [f"a picture number {i}", "a picture"],
                     "rouge_l": 0.1 * (i % 5) + shift, "cider": 0.3 * (i % 4) + shift})
    path = tmp_path / name
    path.write_text(json.dumps({"split": "test", "predictions": rows}))
    return path


def test_compare_a_file_with_itself_gives_zero_and_its_page_renders(tmp_path, capsys):
    a = predictions_file(tmp_path, "a.json", [f"caption {i}" for i in range(12)])
    assert eval_mod.main(["--compare", str(a), str(a), "--report", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "cider    A" in out and "B - A 0.0000 [0.0000, 0.0000]" in out
    index = tmp_path / "cmp" / "index.html"
    page = index.read_text()
    assert "A: caption 3<br>B: caption 3" in page and 'data-key="cider_b_minus_a"' in page
    shot = tmp_path / "shot.png"
    p = chromium("--window-size=1200,1600", f"--screenshot={shot}", index.as_uri(), cwd=tmp_path)
    assert shot.exists(), p.stderr[-2000:]


def test_compare_puts_the_most_different_images_first(tmp_path, capsys):
    caps = [f"caption {i}" for i in range(8)]
    a = predictions_file(tmp_path, "a.json", caps)
    b_rows = json.loads(a.read_text())
    b_rows["predictions"][5]["cider"] += 2.0                 # image 5: B much better
    b_rows["predictions"][5]["caption"] = "a much better caption"
    b = tmp_path / "b.json"
    b.write_text(json.dumps(b_rows))
    assert eval_mod.main(["--compare", str(a), str(b), "--report", str(tmp_path / "cmp")]) == 0
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert page.index("a much better caption") < page.index("B: caption 0")
    assert "B ahead in" in capsys.readouterr().out


def test_compare_refuses_files_of_different_images(tmp_path, capsys):
    a = predictions_file(tmp_path, "a.json", ["x", "y", "z"])
    rows = json.loads(a.read_text())
    rows["predictions"] = rows["predictions"][:2]
    b = tmp_path / "b.json"
    b.write_text(json.dumps(rows))
    assert eval_mod.main(["--compare", str(a), str(b)]) == 2
    assert "not scored on the same images" in capsys.readouterr().err


def test_compare_refuses_files_it_cannot_pair_in_one_sentence(tmp_path, capsys):
    a = predictions_file(tmp_path, "a.json", ["x", "y"])
    no_scores = json.loads(a.read_text())
    for row in no_scores["predictions"]:
        del row["cider"]
    (tmp_path / "noscores.json").write_text(json.dumps(no_scores))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text('[{"image_id": 1, "caption": "a"}]')   # COCO results: no references
    for bad, said in (("noscores.json", "without per-image cider"), ("broken.json", "broken.json"),
                      ("list.json", "'predictions' must be a list")):
        assert eval_mod.main(["--compare", str(a), str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
