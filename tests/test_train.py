"""train.py's configuration handling and its failure modes."""
import json
import os
import subprocess
import sys
import time

import pytest

import train
from conftest import REPO


def test_defaults_have_the_design_keys():
    for key in ("batch_size", "num_epochs", "learning_rate", "learning_rate_decay", "learning_rate_decay_step",
                "learning_rate_scheduler_enabled", "image_size", "tokenizer_name", "max_caption_length",
                "training_size_limit", "evaluation_enabled"):
        assert key in train.hyperparameters
    assert set(train.NONE_DEFAULT_TYPES) <= set(train.hyperparameters)
    for preset in train.PRESETS.values():
        train.check_keys(preset, "preset")


def test_overrides_preset_and_types():
    hp = train.resolve_hparams(["--preset", "demo", "--batch_size=16", "--learning_rate=1e-3",
                                "--training_size_limit=None", "--evaluation_enabled=false", "--data_dir", "x/y"])
    assert hp["batch_size"] == 16 and hp["learning_rate"] == 1e-3 and hp["training_size_limit"] is None
    assert hp["evaluation_enabled"] is False and hp["data_dir"] == "x/y"
    assert hp["lm_name"] == "demo/qwen3-tiny"  # from the preset
    assert train.resolve_hparams(["--learning_rate=1"])["learning_rate"] == 1.0  # int accepted for float


@pytest.mark.parametrize("argv, message", [
    (["--bach_size=4"], "did you mean 'batch_size'"),
    (["--batch_size=abc"], "must be int"),
    (["--batch_size=2.5"], "must be int"),
    (["--evaluation_enabled=3"], "must be bool"),
    (["--batch_size=None"], "can't be None"),
    (["--preset=nope"], "unknown preset"),
    (["batch_size=3"], "unexpected argument"),
    (["--num_epochs"], "needs a value"),
])
def test_bad_configuration_is_refused(argv, message):
    with pytest.raises(train.ConfigError, match=message):
        train.resolve_hparams(argv)


def test_unknown_key_lists_valid_keys(capsys):
    assert train.main(["--bach_size=4"]) == 2
    err = capsys.readouterr().err
    assert "Valid keys:" in err and "batch_size" in err and "Traceback" not in err


def test_offline_real_defaults_exit_fast_with_one_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    t = time.time()
    p = subprocess.run([sys.executable, "train.py", f"--output_dir={tmp_path}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    took = time.time() - t
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "ERROR" not in p.stderr
    assert "ViT-B-32" in p.stderr and "Qwen/Qwen3-0.6B-Base" in p.stderr and "lm_name" in p.stderr
    assert "Flickr30K" in p.stderr and "data_dir" in p.stderr  # every missing download named at once
    assert took < 15, f"took {took:.1f}s"


def test_compiled_training_step_gives_the_eager_losses(tmp_path):
    """compile=True (torch.compile through accelerate, dynamic shapes) trains the same as eager."""
    from demo_assets import write_split
    for split, n, seed in (("train", 32, 1), ("val", 4, 2)):
        write_split(tmp_path / "data" / split, n, seed)
    from torch._dynamo.utils import counters
    counters.clear()
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"out_{compiled}"
        hp = train.resolve_hparams(["--preset=demo", "--dataset=folder", f"--train_dir={tmp_path / 'data/train'}",
                                    f"--val_dir={tmp_path / 'data/val'}", "--num_epochs=1", "--batch_size=16",
                                    "--test_evaluation_enabled=False", "--evaluation_enabled=False",
                                    f"--compile={compiled}", f"--output_dir={out}",
                                    f"--feature_cache_dir={tmp_path / 'cache'}"])
        train.train(hp)
        (log,) = out.glob("train_log_*.jsonl")
        losses[compiled] = [json.loads(x)["loss"] for x in log.read_text().splitlines()]
    assert counters["stats"]["unique_graphs"] >= 1  # the step really went through dynamo
    assert len(losses[True]) == len(losses[False]) == 10
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
