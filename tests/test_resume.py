"""Runs that survive: exact resume (MLP and LoRA), SIGTERM, SIGKILL at random points, keep_last_n."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, copy_run_before_the_grouping

import train
from capkit.data.shapes import write_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    for split, n, seed in (("train", 32, 1), ("val", 4, 2)):
        write_split(root / split, n, seed)
    return root


def argv_for(data, out, *extra):
    return ["--preset=demo", "--dataset=folder", f"--train_dir={data / 'train'}", f"--val_dir={data / 'val'}",
            "--num_epochs=2", "--batch_size=16", "--test_evaluation_enabled=False", "--evaluation_enabled=False",
            f"--output_dir={out}", f"--feature_cache_dir={data / 'cache'}", "--log_with=None", *extra]


def losses(out):
    (log,) = out.glob("train_log_*.jsonl")
    return [(r["step"], r["loss"]) for r in map(json.loads, log.read_text().splitlines())]


def final_weights(out):
    metas = [json.loads(m.read_text()) for m in out.glob("training_metadata_*.json")]
    last = max(metas, key=lambda m: m["step"])
    return torch.load(out / last["checkpoint"], weights_only=True)["state_dict"], last


def interrupt_at(monkeypatch, cls, n):
    """SIGTERM to this process during the n-th training forward: the run must finish that step and stop."""
    real, calls = cls.forward, [0]

    def forward(self, *a, **k):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)
    monkeypatch.setattr(cls, "forward", forward)


MAPPER_ARGS = {"mlp": [], "transformer-tokens": ["--mapper_type=transformer", "--encoder_features=tokens",
                                                "--mapper_num_layers=2", "--mapper_num_heads=4"],
               "resampler": ["--mapper_type=resampler", "--encoder_features=tokens", "--mapper_num_layers=2",
                             "--mapper_num_heads=4", "--mapper_dropout=0.1"],  # dropout: its RNG must resume too
               "mlp+retrieval": ["--retrieval_k=2"],  # the datastore is rebuilt on resume: the same prompts
               "mlp+captions_per_image": ["--captions_per_image=2"]}  # the epoch's draw of captions replays


@pytest.mark.parametrize("mapper", list(MAPPER_ARGS))
def test_sigterm_then_resume_continues_the_exact_loss_sequence(data, tmp_path, monkeypatch, capsys, mapper):
    from model import PrefixCaptioner
    ref = tmp_path / "ref"
    train.train(train.resolve_hparams(argv_for(data, ref, *MAPPER_ARGS[mapper])))
    interrupt_at(monkeypatch, PrefixCaptioner, 7)
    out = tmp_path / "run"
    res = train.train(train.resolve_hparams(argv_for(data, out, *MAPPER_ARGS[mapper])))
    assert res["interrupted"] and "train_state_" not in res["resume_from"]
    printed = capsys.readouterr().out
    assert "SIGTERM" in printed and f"python train.py --resume {res['resume_from']}" in printed
    assert [s for s, _ in losses(out)] == list(range(1, 8))           # step 7 finished, then it stopped
    monkeypatch.undo()
    assert train.main(["--resume", f"--output_dir={out}"]) == 0      # the newest resumable checkpoint
    assert losses(out) == losses(ref)                                # bit for bit, not approximately
    (w_ref, m_ref), (w_run, m_run) = final_weights(ref), final_weights(out)
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref) and m_run["history"][-1]["train_loss"] == \
        m_ref["history"][-1]["train_loss"]


def test_resume_refuses_model_changes_and_logs_safe_ones(data, tmp_path, capsys):
    out = tmp_path / "run"
    train.train(train.resolve_hparams(argv_for(data, out, "--num_epochs=1")))
    with pytest.raises(train.ConfigError, match="mapper_hidden_dim"):
        train.resolve_resume(["--resume", f"--output_dir={out}", "--mapper_hidden_dim=64"])
    hp, meta = train.resolve_resume(["--resume", f"--output_dir={out}", "--num_epochs=2"])
    assert hp["num_epochs"] == 2 and "num_epochs changed from 1 to 2" in capsys.readouterr().out
    assert train.main(["--resume", f"--output_dir={out}", "--num_epochs=2"]) == 0
    assert [s for s, _ in losses(out)] == list(range(1, 21))         # epoch 2 added to the finished run
    (out / meta.name).unlink()                                       # a checkpoint without its metadata ...
    assert train.main(["--resume", str(out / meta.name.replace("training_metadata_", "model_state_dict_")
                                       .replace(".json", ".pth"))]) == 2  # ... is never loaded


def test_lora_adapter_resume_continues_the_exact_loss_sequence(data, tmp_path, monkeypatch):
    from capkit.models.hf_captioner import HFCaptioner
    args = ["--model_type=git", "--hf_model_name=demo/git-tiny", "--quantization_bits=16", "--batch_size=8",
            "--learning_rate=0.003", "--max_caption_length=32", "--num_epochs=1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    train.train(train.resolve_hparams(argv_for(data, ref, *args)))
    interrupt_at(monkeypatch, HFCaptioner, 9)
    assert train.train(train.resolve_hparams(argv_for(data, out, *args)))["interrupted"]
    monkeypatch.undo()
    assert train.main(["--resume", f"--output_dir={out}"]) == 0
    assert len(losses(ref)) == 20 and losses(out) == losses(ref)


@pytest.mark.slow
def test_sigkill_at_random_points_never_loads_a_corrupt_checkpoint(data, tmp_path):
    """6 SIGKILLs (3 while a file is being written), a resume after each: same final MLP as an uninterrupted run."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    base = [sys.executable, "train.py", *argv_for(data, ref, "--save_every_n_steps=1")]
    subprocess.run(base, cwd=REPO, check=True, capture_output=True)
    rng, kills, during_save = random.Random(0), 0, 0
    cmd = [sys.executable, "train.py", *argv_for(data, out, "--save_every_n_steps=1")]
    while True:
        done_before = len(losses(out)) if list(out.glob("train_log_*.jsonl")) else 0
        stale = set(out.glob(".*.tmp*"))  # left by a kill inside a save (the resumed run removes them)
        log = open(tmp_path / f"launch_{kills}.log", "w")  # a file, not a pipe: a full pipe would block the run
        p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        want_save = kills % 2 == 1  # every other kill: the moment a temp file shows up, i.e. inside a save
        target = done_before + rng.randint(1, 2)
        while p.poll() is None and kills < 6:
            steps = len(losses(out)) if list(out.glob("train_log_*.jsonl")) else 0
            if steps >= target and (not want_save or set(out.glob(".*.tmp*")) - stale):
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                during_save += want_save
                break
            time.sleep(0.005)
        p.wait(timeout=600)  # after the 6th kill: the last launch runs to the end
        log.close()
        if p.returncode == 0:
            break
        assert p.returncode == -signal.SIGKILL, (tmp_path / f"launch_{kills}.log").read_text()[-3000:]
        cmd = [sys.executable, "train.py", "--resume", f"--output_dir={out}"]
    assert kills == 6 and during_save == 3
    w_ref, _ = final_weights(ref)
    w_run, _ = final_weights(out)
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    assert losses(out) == losses(ref)
    assert not list(out.glob(".*.tmp*"))  # half-written files of killed saves were cleaned up
    for meta in out.glob("training_metadata_*.json"):  # every committed checkpoint loads
        torch.load(out / json.loads(meta.read_text())["checkpoint"], weights_only=True)


def test_keep_last_n_bounds_the_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    train.train(train.resolve_hparams(argv_for(data, out, "--save_every_n_steps=2", "--keep_last_n=2")))
    metas = sorted(out.glob("training_metadata_*.json"))
    assert len(metas) == 2 and len(list(out.glob("train_state_*.pt"))) == 2 and len(list(out.glob("*.pth"))) == 2
    assert any(m.name.endswith("-2.json") for m in metas)  # the final epoch's checkpoint is among them


def wait_for_steps(out, n, p, timeout=120):
    t = time.time()
    while time.time() - t < timeout and p.poll() is None:
        if list(out.glob("train_log_*.jsonl")) and len(losses(out)) >= n:
            return
        time.sleep(0.01)


def test_sigterm_to_the_script_saves_a_resumable_checkpoint_and_exits_0(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *argv_for(data, out)]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(out, 3, p)
    p.send_signal(signal.SIGTERM)
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 0, text[-2000:]
    assert "python train.py --resume " in text and "SIGTERM" in text
    meta = text.split("python train.py --resume ")[1].split()[0]
    assert json.loads(open(meta).read())["train_state"]          # a resumable checkpoint, named in the output


def test_a_second_interrupt_quits_at_once_and_handlers_come_back():
    from capkit.training.resume import StopSignals
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(log=lambda *a: None) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested                                     # the first: finish the step, then save
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert e.value.code == 130                                # the second: out now
    assert signal.getsignal(signal.SIGINT) is before              # a notebook's Ctrl-C works as before


def test_a_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    import errno

    import model
    out, real, calls = tmp_path / "run", model.atomic_torch_save, [0]

    def full_disk(obj, path):
        calls[0] += 1
        if calls[0] > 2:  # epoch 1's weights + train_state are written; epoch 2's are not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)
    monkeypatch.setattr(model, "atomic_torch_save", full_disk)   # the weights
    monkeypatch.setattr(train, "atomic_torch_save", full_disk)   # the training state
    assert train.main(argv_for(data, out)) == 3
    err = capsys.readouterr().err
    (meta,) = out.glob("training_metadata_*.json")
    assert "No space left on device" in err and str(meta) in err
    assert torch.load(out / json.loads(meta.read_text())["checkpoint"], weights_only=True)["state_dict"]
    assert not list(out.glob(".*.tmp"))                          # nothing half-written left behind


def test_a_run_started_before_the_grouping_resumes_where_it_stopped(tmp_path, monkeypatch):
    """tests/data/run_before_the_grouping: a tiny run (transformer mapper on patch tokens, dropout 0.1) written by
    capkit as of 406ec5b (2026-12-06: flat capkit/, clip_* and proj_* keys), stopped by SIGTERM after step 7 of 20,
    with the losses of the same run left uninterrupted. Today's code resumes it from its relative paths and must
    continue that loss sequence: to float rounding on any CPU, and bit for bit on one whose kernels round as the
    machine that wrote it did (then the first 7 steps, run afresh here, equal the saved ones exactly too)."""
    expected = json.loads((REPO / "tests" / "data" / "run_before_the_grouping" / "expected.json").read_text())
    monkeypatch.chdir(tmp_path)
    copy_run_before_the_grouping(tmp_path)
    # the same run afresh with today's code, given as it was then (the old key names): one epoch is enough. It
    # also fills the feature cache: a run that extracts features draws from torch's global RNG (a DataLoader's seed),
    # so a cold cache changes the dropout masks that follow (noted in docs/log.md)
    train.train(train.resolve_hparams([
        "--preset=demo", "--dataset=folder", "--train_dir=train", "--val_dir=val", "--num_epochs=1",
        "--batch_size=16", "--test_evaluation_enabled=False", "--evaluation_enabled=False", "--output_dir=afresh",
        "--feature_cache_dir=cache", "--log_with=None", "--proj_type=transformer", "--clip_features=tokens",
        "--proj_num_layers=1", "--proj_num_heads=4", "--proj_dropout=0.1", "--proj_hidden_dim=32",
        "--proj_prefix_length=4", "--training_name=before_grouping"]))
    assert train.main(["--resume", "--output_dir=run"]) == 0
    ref = [tuple(s) for s in expected["reference_losses"]]
    resumed = losses(tmp_path / "run")
    assert [s for s, _ in resumed] == [s for s, _ in ref] == list(range(1, 21))
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in ref], rel=1e-5)
    if losses(tmp_path / "afresh")[:7] == ref[:7]:
        assert resumed == ref
