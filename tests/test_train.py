"""train.py's configuration handling and its failure modes."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

import train
from capkit.training import config


def test_defaults_have_the_design_keys():
    for key in ("batch_size", "num_epochs", "learning_rate", "learning_rate_decay", "learning_rate_decay_step",
                "learning_rate_scheduler_enabled", "image_size", "tokenizer_name", "max_caption_length",
                "training_size_limit", "evaluation_enabled"):
        assert key in train.hyperparameters
    assert set(config.NONE_DEFAULT_TYPES) <= set(train.hyperparameters)
    for preset in train.PRESETS.values():
        config.check_keys(preset, "preset", train.hyperparameters)


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
    # a hang on network retries takes minutes; the bound leaves the ~7 s of imports and start-up room on a busy
    # 2-core machine
    assert took < 30, f"took {took:.1f}s"


def test_compiled_training_step_gives_the_eager_losses(tmp_path):
    """compile=True (static shapes: captions padded to a multiple of 8) trains the same as eager."""
    from capkit.data.shapes import write_split
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


# ---------------------------------------------------------------------------------------------- options

def test_toml_config_file_and_precedence(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('batch_size = 12\nlr_scheduler = "OneCycleLR"\nseed = 1337\n'
                   '[optimizer_args]\nbetas = [0.9, 0.99]\n[scheduler_args]\npct_start = 0.2\n')
    hp = train.resolve_hparams(["--preset=demo", "--config", str(cfg), "--seed=7"])
    assert hp["batch_size"] == 12 and hp["lr_scheduler"] == "OneCycleLR"  # TOML over the preset
    assert hp["optimizer_args"] == {"betas": [0.9, 0.99]} and hp["scheduler_args"] == {"pct_start": 0.2}
    assert hp["seed"] == 7 and hp["lm_name"] == "demo/qwen3-tiny"  # command line over TOML; preset kept
    (tmp_path / "bad.toml").write_text("bach_size = 3\n")
    with pytest.raises(train.ConfigError, match="did you mean 'batch_size'"):
        train.resolve_hparams(["--config", str(tmp_path / "bad.toml")])
    (tmp_path / "broken.toml").write_text("batch_size = \n")
    with pytest.raises(train.ConfigError, match="not valid TOML"):
        train.resolve_hparams(["--config", str(tmp_path / "broken.toml")])


@pytest.mark.parametrize("argv, message", [
    (["--optimizer=SGD"], "must be one of"),
    (["--lr_scheduler=Linear"], "must be one of"),
    (["--model_type=gpt2"], "must be one of"),
    (["--quantization_bits=3"], "must be one of"),
    (["--lr_scheduler=OneCycleLR", "--warmup_steps=5"], "ramps the learning rate up by itself"),
    (["--gradient_accumulation_steps=0"], ">= 1"),
    (["--caption_dropout=1.5"], "caption_dropout"),
])
def test_bad_option_values_are_refused(argv, message):
    with pytest.raises(train.ConfigError, match=message):
        train.resolve_hparams(argv)


def test_the_old_model_type_name_still_reads_and_only_it():
    """model_type "clip_mlp" (the main path's name until 2026-12) reads as "prefix", in hyperparameters and in a
    model config; a near miss is still refused, and the message offers today's names only."""
    assert train.resolve_hparams(["--model_type=clip_mlp"])["model_type"] == "prefix"
    assert config.model_config_from_hparams(train.resolve_hparams(["--model_type=clip_mlp"])).model_type == "prefix"
    with pytest.raises(train.ConfigError, match="'prefix', 'git', 'blip'; got 'clip'"):
        train.resolve_hparams(["--model_type=clip"])
    from capkit.models.captioner import CaptionerConfig
    assert CaptionerConfig.from_dict({"model_type": "clip_mlp"}).model_type == "prefix"
    with pytest.raises(ValueError, match="unknown model_type 'clip_mlp2'"):
        CaptionerConfig.from_dict({"model_type": "clip_mlp2"})


def _lrs(hp, steps_per_epoch, n):
    import torch
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=hp["learning_rate"])
    sched = config.make_scheduler(opt, hp, steps_per_epoch)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


def test_schedulers_follow_the_run_length():
    base = train.resolve_hparams(["--learning_rate=0.1", "--num_epochs=4"])
    # StepLR's default meaning: x0.9 every 2 epochs (here 5 steps per epoch)
    lrs = _lrs(base, 5, 20)
    assert lrs[:10] == [0.1] * 10 and lrs[10] == pytest.approx(0.09) and lrs[19] == pytest.approx(0.09)
    warm = _lrs({**base, "lr_scheduler": "CosineAnnealingLR", "warmup_steps": 4}, 5, 20)
    assert warm[0] == pytest.approx(0.02) and warm[3] == pytest.approx(0.08) and warm[4] == pytest.approx(0.1)
    assert warm[4:] == sorted(warm[4:], reverse=True) and warm[-1] < 0.01  # cosine down to ~0 at the run's end
    one = _lrs({**base, "lr_scheduler": "OneCycleLR"}, 5, 20)
    assert max(one) == pytest.approx(0.1) and one[0] < 0.01 and one[-1] < 0.001
    cyc = _lrs({**base, "lr_scheduler": "CyclicLR", "scheduler_args": {"step_size_up": 2}}, 5, 8)
    assert cyc[:5] == pytest.approx([0.01, 0.055, 0.1, 0.055, 0.01])  # scheduler_args override the defaults
    restarts = _lrs({**base, "lr_scheduler": "CosineAnnealingWarmRestarts"}, 5, 11)
    assert restarts[0] == restarts[5] == restarts[10] == pytest.approx(0.1) and restarts[4] < 0.1
    assert _lrs({**base, "learning_rate_scheduler_enabled": False}, 5, 12) == [0.1] * 12
    with pytest.raises(train.ConfigError, match="scheduler_args"):
        _lrs({**base, "scheduler_args": {"no_such_arg": 1}}, 5, 2)


def test_caption_shuffle_and_dropout():
    import torch

    from dataset import CaptionAugment
    cap = "woodcut style, a fox, snow, trees, moon"
    torch.manual_seed(0)
    shuffled = [CaptionAugment(True, frozen_parts=1)(cap) for _ in range(30)]
    assert all(s.startswith("woodcut style, ") for s in shuffled)           # frozen part stays first
    assert all(sorted(s.split(", ")) == sorted(cap.split(", ")) for s in shuffled)  # nothing lost
    assert len(set(shuffled)) > 5                                            # order really changes
    dropped = [CaptionAugment(False, frozen_parts=1, dropout=0.5)(cap) for _ in range(200)]
    n_parts = [len(s.split(", ")) for s in dropped]
    assert all(s.startswith("woodcut style") for s in dropped) and min(n_parts) >= 1 and max(n_parts) <= 5
    assert 2.0 < sum(n_parts) / len(n_parts) < 4.0                           # ~1 + 4 x 0.5 parts on average
    assert all(CaptionAugment(False, 0, 0.99)("only one part") == "only one part" for _ in range(20))
    assert CaptionAugment(True, 0, 0.0)("no commas here") == "no commas here"


def _folder_data(tmp_path, n_train=32):
    from capkit.data.shapes import write_split
    for split, n, seed in (("train", n_train, 1), ("val", 4, 2)):
        write_split(tmp_path / "data" / split, n, seed)
    return ["--preset=demo", "--dataset=folder", f"--train_dir={tmp_path / 'data/train'}",
            f"--val_dir={tmp_path / 'data/val'}", "--test_evaluation_enabled=False", "--evaluation_enabled=False"]


def test_run_name_save_every_warmup_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    hp = train.resolve_hparams(_folder_data(tmp_path) + [
        "--num_epochs=3", "--batch_size=16", "--save_every_n_epochs=2", "--training_name=exp", "--warmup_steps=3",
        "--lr_scheduler=CosineAnnealingLR", f"--output_dir={out}", f"--feature_cache_dir={tmp_path / 'cache'}"])
    meta = train.train(hp)
    assert meta["run_id"].startswith("exp_")
    epochs = sorted(json.loads(p.read_text())["epoch"] for p in out.glob("training_metadata_exp_*.json"))
    assert epochs == [2, 3] and len(list(out.glob("model_state_dict_exp_*.pth"))) == 2  # every 2nd + the last
    (log,) = out.glob("train_log_exp_*.jsonl")
    lrs = [json.loads(x)["lr"] for x in log.read_text().splitlines()]
    assert len(lrs) == 30 and lrs[0] == pytest.approx(0.002 / 4) and lrs[3] == pytest.approx(0.002)
    assert lrs[-1] < lrs[3] / 10
    ea = EventAccumulator(str(out / "logs" / meta["run_id"]))  # (add_hparams adds a subfolder of its own)
    ea.Reload()
    assert len(ea.Scalars("train/loss")) == 30 and len(ea.Scalars("val/loss")) == 3


def test_gradient_accumulation_follows_the_bigger_batch(tmp_path):
    """batch 8 x 2 accumulation steps ~ batch 16: the same pairs per optimizer step (same shuffle), the
    same number of steps, and loss curves that agree (not bit for bit: each micro-batch is averaged
    over its own tokens)."""
    curves = {}
    for name, extra in {"big": ["--batch_size=16"], "accum": ["--batch_size=8", "--gradient_accumulation_steps=2"]}.items():
        out = tmp_path / name
        hp = train.resolve_hparams(_folder_data(tmp_path) + extra + [
            "--num_epochs=2", "--group_by_length=False", f"--output_dir={out}",
            f"--feature_cache_dir={tmp_path / 'cache'}", "--log_with=None"])
        train.train(hp)
        (log,) = out.glob("train_log_*.jsonl")
        curves[name] = [json.loads(x)["loss"] for x in log.read_text().splitlines()]
    assert len(curves["big"]) == len(curves["accum"]) == 20
    rel = [abs(a - b) / a for a, b in zip(curves["big"], curves["accum"])]
    assert max(rel) < 0.03, rel
    assert curves["accum"][-1] < curves["accum"][0] * 0.8


def test_prodigy_optimizer_trains(tmp_path):
    out = tmp_path / "out"
    hp = train.resolve_hparams(_folder_data(tmp_path) + [
        "--optimizer=Prodigy", "--learning_rate=1.0", "--learning_rate_scheduler_enabled=False", "--num_epochs=2",
        "--batch_size=16", f"--output_dir={out}", f"--feature_cache_dir={tmp_path / 'cache'}", "--log_with=None"])
    train.train(hp)
    (log,) = out.glob("train_log_*.jsonl")
    losses = [json.loads(x)["loss"] for x in log.read_text().splitlines()]
    assert losses[-1] < losses[0] * 0.8


def test_augment_images_bypasses_the_cache(tmp_path, monkeypatch, capsys):
    from conftest import count_encoder_calls
    calls = count_encoder_calls(monkeypatch)
    hp = train.resolve_hparams(_folder_data(tmp_path, 16) + [
        "--augment_images=True", "--num_epochs=2", "--batch_size=8", f"--output_dir={tmp_path / 'out'}",
        f"--feature_cache_dir={tmp_path / 'cache'}", "--log_with=None"])
    train.train(hp)
    out = capsys.readouterr().out
    assert out.count("feature cache is bypassed") == 1
    # the encoder runs inside every training step (2 epochs x 80 pairs / 8), once for the (cached) val images and
    # once for the datastore's plain training images (the kNN baseline and retrieval read those)
    assert calls["n"] == 2 * 10 + 1 + 1


def test_a_training_size_limit_below_the_data_says_how_much_it_leaves_out(tmp_path, capsys):
    base = _folder_data(tmp_path) + ["--num_epochs=1", "--batch_size=16", f"--feature_cache_dir={tmp_path / 'c'}",
                                     "--log_with=None"]
    train.train(train.resolve_hparams(base + ["--training_size_limit=48", f"--output_dir={tmp_path / 'cut'}"]))
    (note,) = [x for x in capsys.readouterr().out.splitlines() if "training_size_limit=48" in x]
    assert "trains on 48 pairs of the" in note and "--training_size_limit=None" in note
    there = int(note.split("of the ")[1].split()[0].replace(",", ""))
    assert there > 48
    (log,) = (tmp_path / "cut").glob("train_log_*.jsonl")
    assert len(log.read_text().splitlines()) == 3  # 48 pairs / 16
    train.train(train.resolve_hparams(base + [f"--training_size_limit={there}", f"--output_dir={tmp_path / 'all'}"]))
    assert "training_size_limit=" not in capsys.readouterr().out  # nothing left out: no note


def test_wandb_without_the_package_is_a_clear_error(tmp_path, capsys):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    assert train.main(["--preset=demo", "--log_with=wandb", f"--output_dir={tmp_path}"]) == 2
    assert "pip install wandb" in capsys.readouterr().err



@pytest.mark.parametrize("optimizer,scheduler", [("AdamW", s) for s in config.SCHEDULERS] + [("Prodigy", "StepLR")])
def test_every_optimizer_and_scheduler_trains_a_run_and_moves_the_learning_rate(tmp_path, optimizer, scheduler):
    """Two epochs of 5 steps each; the logged learning rate (the one each step used) follows the schedule's shape,
    so a scheduler built but never stepped, or stepped per epoch, fails here."""
    out = tmp_path / "out"
    hp = train.resolve_hparams(_folder_data(tmp_path, 8) + [
        f"--optimizer={optimizer}", f"--lr_scheduler={scheduler}", "--num_epochs=2", "--batch_size=8",
        "--learning_rate_decay=0.5", "--learning_rate_decay_step=1", "--warmup_steps=0",
        f"--output_dir={out}", f"--feature_cache_dir={tmp_path / 'cache'}", "--log_with=None"]
        + (["--learning_rate=1.0"] if optimizer == "Prodigy" else []))
    train.train(hp)
    (log,) = out.glob("train_log_*.jsonl")
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rows) == 10 and all(r["loss"] == r["loss"] and r["lr"] > 0 for r in rows)  # 40 pairs / 8, no NaN
    lr, peak = [r["lr"] for r in rows], hp["learning_rate"]
    if scheduler == "StepLR":                      # x0.5 after each epoch of 5 steps
        assert lr[:5] == pytest.approx([peak] * 5) and lr[5:] == pytest.approx([peak / 2] * 5)
    elif scheduler == "CosineAnnealingLR":         # from the peak, down every step
        assert lr[0] == pytest.approx(peak) and all(a > b for a, b in zip(lr, lr[1:]))
    elif scheduler == "CosineAnnealingWarmRestarts":  # down over an epoch, then back to the peak
        assert lr[0] == pytest.approx(lr[5]) == pytest.approx(peak) and all(a > b for a, b in zip(lr[:5], lr[1:5]))
    else:                                          # CyclicLR, OneCycleLR: up from below the peak, then down
        top = lr.index(max(lr))
        assert lr[0] < 0.5 * peak and 0 < top < 9 and lr[-1] < lr[top] and max(lr) <= peak * 1.0001


def test_toml_config_gives_the_same_run_as_flags(tmp_path):
    flags = ["--num_epochs=2", "--batch_size=8", "--lr_scheduler=CosineAnnealingLR", "--warmup_steps=2",
             "--optimizer_args={'betas': (0.8, 0.95)}", "--seed=3", "--log_with=None"]
    (tmp_path / "run.toml").write_text('num_epochs = 2\nbatch_size = 8\nlr_scheduler = "CosineAnnealingLR"\n'
                                       'warmup_steps = 2\nseed = 3\n[optimizer_args]\nbetas = [0.8, 0.95]\n')
    losses, hps = {}, {}
    for name, extra in {"flags": flags, "toml": ["--config", str(tmp_path / "run.toml"), "--log_with=None"]}.items():
        hp = train.resolve_hparams(_folder_data(tmp_path, 16) + extra + [
            f"--output_dir={tmp_path / name}", f"--feature_cache_dir={tmp_path / 'cache'}"])
        hps[name] = {k: v for k, v in hp.items() if k != "output_dir"}
        train.train(hp)
        (log,) = (tmp_path / name).glob("train_log_*.jsonl")
        losses[name] = [json.loads(x) for x in log.read_text().splitlines()]
    assert tuple(hps["toml"].pop("optimizer_args")["betas"]) == hps["flags"].pop("optimizer_args")["betas"]
    assert hps["toml"] == hps["flags"]
    assert losses["toml"] == losses["flags"] and len(losses["flags"]) == 20  # bit-identical run on CPU


# ---------------------------------------------------------------------------------------------- numerical faults

def nan_run(tmp_path, monkeypatch, poisoned, extra=()):
    """A small demo run whose training forwards number `poisoned` (1-based) return a NaN loss."""
    import torch

    from capkit.data.shapes import write_split
    from model import PrefixCaptioner
    for split, n, seed in (("train", 32, 1), ("val", 4, 2)):
        write_split(tmp_path / "data" / split, n, seed)
    real_forward, calls = PrefixCaptioner.forward, [0]

    def forward(self, *a, **k):
        logits, loss = real_forward(self, *a, **k)
        if torch.is_grad_enabled():  # training steps only, not evaluation
            calls[0] += 1
            if poisoned(calls[0]):
                loss = loss * math.nan
        return logits, loss
    monkeypatch.setattr(PrefixCaptioner, "forward", forward)
    out = tmp_path / "out"
    argv = ["--preset=demo", "--dataset=folder", f"--train_dir={tmp_path / 'data/train'}",
            f"--val_dir={tmp_path / 'data/val'}", "--num_epochs=2", "--batch_size=16",
            "--test_evaluation_enabled=False", "--evaluation_enabled=False", f"--output_dir={out}",
            f"--feature_cache_dir={tmp_path / 'cache'}", "--log_with=None", *extra]
    return out, argv


def test_a_nan_loss_skips_its_step_and_is_counted(tmp_path, monkeypatch, capsys):
    out, argv = nan_run(tmp_path, monkeypatch, lambda n: n in (2, 5))
    meta = train.train(train.resolve_hparams(argv))
    steps = [json.loads(x) for x in next(out.glob("train_log_*.jsonl")).read_text().splitlines()]
    assert len(steps) == 2 * 10 - 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert meta["nonfinite_steps_skipped"] == 2 and math.isfinite(meta["train_loss"])
    assert capsys.readouterr().out.count("skipped: non-finite loss") == 2
    import torch
    state = torch.load(out / meta["checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())  # no NaN reached the weights


def test_repeated_nans_stop_the_run_naming_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out, argv = nan_run(tmp_path, monkeypatch, lambda n: n > 12, ["--max_bad_steps=3"])  # epoch 2 goes bad
    assert train.main(argv) == 3
    err = capsys.readouterr().err
    (meta_path,) = out.glob("training_metadata_*-1.json")  # epoch 1 was saved; epoch 2 never completed
    assert "3 non-finite losses or gradients in a row" in err and str(meta_path) in err
    assert not list(out.glob("training_metadata_*-2.json"))
    with pytest.raises(train.ConfigError, match="max_bad_steps"):
        train.resolve_hparams(["--max_bad_steps=0"])


def test_captions_per_image_draws_afresh_each_epoch_and_replays_from_the_same_generator():
    import torch

    from capkit.data.batching import CaptionDraw
    image_of = [i for i in range(10) for _ in range(5)]                  # 10 images x 5 captions
    lengths = [3 + (j % 7) for j in range(50)]
    for lens in (None, lengths):
        draw = CaptionDraw(image_of, 2, 4, torch.Generator().manual_seed(0), lens)
        epochs = [[j for batch in draw for j in batch] for _ in range(3)]
        assert len(draw) == 5 and all(len(e) == 20 for e in epochs)
        for e in epochs:                                                   # every image, twice, each epoch
            assert sorted(image_of[j] for j in e) == sorted(list(range(10)) * 2) and len(set(e)) == 20
        assert set(epochs[0]) != set(epochs[1]) != set(epochs[2])         # a fresh draw each epoch
        again = CaptionDraw(image_of, 2, 4, torch.Generator().manual_seed(0), lens)
        assert [j for batch in again for j in batch] == epochs[0]          # the same generator state: the same epoch
