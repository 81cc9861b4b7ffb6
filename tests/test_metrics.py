"""The COCO caption metrics reproduce the toolkit's published numbers (tests/data/metric_reference, copied from
the sources its SOURCES.md names), whatever the order of images and references."""
import json
import random
import shutil

import pytest
from conftest import REPO

import eval as eval_mod
from capkit.evaluation import metrics

REF = REPO / "tests" / "data" / "metric_reference"
JAVA = shutil.which("java") is not None

FAKECAP = {"Bleu_1": 0.5793995754573356, "Bleu_2": 0.40439129741018104, "Bleu_3": 0.2785363856619147,
           "Bleu_4": 0.1908290437674253, "METEOR": 0.195254671778, "ROUGE_L": 0.39625269357570847,
           "CIDEr": 0.5997905185184199}
NLG_EVAL = {"Bleu_1": 0.55, "Bleu_2": 0.428174, "Bleu_3": 0.284043, "Bleu_4": 0.201143, "METEOR": 0.295797,
            "ROUGE_L": 0.522104, "CIDEr": 1.242192}


def nlg_eval_example():
    lines = {n: (REF / "nlg_eval_example" / f"{n}.txt").read_text().splitlines() for n in ("hyp", "ref1", "ref2")}
    refs = {str(i): [lines["ref1"][i].strip(), lines["ref2"][i].strip()] for i in range(len(lines["hyp"]))}
    return refs, {str(i): h.strip() for i, h in enumerate(lines["hyp"])}


def check(got, expected):
    for k, v in expected.items():
        if k == "METEOR" and not JAVA:
            assert "METEOR" not in got
            continue
        assert got[k] == pytest.approx(v, abs=5e-4), (k, got[k], v)


def test_coco_fakecap_1000_through_the_command_line(tmp_path):
    out = tmp_path / "scores.json"
    assert eval_mod.main(["--references", str(REF / "coco_fakecap_1000/gts.json"), "--predictions",
                          str(REF / "coco_fakecap_1000/captions_val2014_fakecap_results.json"),  # COCO results format
                          "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    check(got, FAKECAP)
    assert got["tokenizer"].startswith("ptb" if JAVA else "simple")
    # the Fréchet distance comes along, naming its embedder; 1000 candidates vs 5000 references
    assert got["frechet_distance"] > 0 and got["frechet_embedder"] and got["frechet_sizes"][0] == 1000


def test_nlg_eval_example_and_the_dict_prediction_format(tmp_path):
    refs, hyps = nlg_eval_example()
    (tmp_path / "r.json").write_text(json.dumps(refs))
    (tmp_path / "p.json").write_text(json.dumps(hyps))
    assert eval_mod.main(["--references", str(tmp_path / "r.json"), "--predictions", str(tmp_path / "p.json"),
                          "--output", str(tmp_path / "s.json")]) == 0
    check(json.loads((tmp_path / "s.json").read_text()), NLG_EVAL)


def test_result_does_not_depend_on_the_order_of_images_or_references():
    gts = json.loads((REF / "coco_fakecap_1000/gts.json").read_text())
    res = {k: v[0] for k, v in json.loads((REF / "coco_fakecap_1000/res.json").read_text()).items()}
    ids = sorted(gts)[:60]
    a = metrics.caption_metrics({i: gts[i] for i in ids}, {i: res[i] for i in ids})
    rng = random.Random(0)
    shuffled = ids[:]
    rng.shuffle(shuffled)
    b = metrics.caption_metrics({i: rng.sample(gts[i], len(gts[i])) for i in shuffled},
                                 {i: res[i] for i in reversed(shuffled)})
    assert a == b


def test_no_java_falls_back_to_a_python_tokenizer(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    refs = {"1": ["A dog runs on the grass.", "The dog's running!"], "2": ["Two cats sit, quietly."]}
    got = metrics.caption_metrics(refs, {"1": "a dog runs on grass", "2": "two cats sit"})
    assert got["tokenizer"].startswith("simple") and "METEOR" not in got and got["skipped"]["METEOR"] == "needs Java"
    assert "no Java" in capsys.readouterr().out
    assert metrics.simple_tokenize("The dog's running, fast!") == "the dog 's running fast"
    assert 0 < got["Bleu_1"] <= 1 and got["CIDEr"] > 0


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="same images"):
        metrics.caption_metrics({"1": ["a"], "2": ["b"]}, {"1": "a"})
    (tmp_path / "r.json").write_text(json.dumps({"1": "not a list"}))
    (tmp_path / "p.json").write_text(json.dumps([{"image_id": 1, "caption": "a"}]))
    assert eval_mod.main(["--references", str(tmp_path / "r.json"), "--predictions", str(tmp_path / "p.json")]) == 2
    assert "image_id: [reference" in capsys.readouterr().err


def test_diversity():
    d = metrics.diversity(["a red dog", "a red cat", "A red dog."])
    assert d["vocab_size"] == 4
    assert d["distinct_1"] == pytest.approx(4 / 9) and d["distinct_2"] == pytest.approx(3 / 6)
    assert metrics.diversity([]) == {"vocab_size": 0, "distinct_1": 0.0, "distinct_2": 0.0}
