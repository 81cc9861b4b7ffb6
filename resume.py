"""
Runs that survive: resumable training state, finding the checkpoint to resume, interrupt handling
and pruning old checkpoints. train.py uses it; you use it through train.py:

    python train.py --resume                        # the newest resumable checkpoint in saved_models/
    python train.py --resume saved_models/training_metadata_<run>-<epoch>.json   # (or its .pth / adapter / train_state)
    python train.py --resume --num_epochs=5         # safe changes are allowed (and logged)

A checkpoint is three files, written in this order, each atomically (temp file, fsync, rename):
the trainable weights (model_state_dict_<stem>.pth or adapter_<stem>/), train_state_<stem>.pt (optimizer,
LR scheduler, position in the epoch, data order, RNG states) and training_metadata_<stem>.json. The
metadata is the commit marker: a checkpoint without it is ignored, because it was never completely written.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import sys
from pathlib import Path

from errors import ConfigError, MissingInputError, RefusedFileError
from safeio import plain_name, read_json, torch_load

STATE_FORMAT = 1
# hyperparameters a resumed run may change: they alter neither the model nor the data order
RESUME_SAFE = frozenset({
    "num_epochs", "evaluation_enabled", "test_evaluation_enabled", "evaluate_before_training", "ablate_image",
    "eval_batch_size", "max_new_tokens", "num_beams", "save_every_n_epochs", "save_every_n_steps", "keep_last_n",
    "log_with", "num_workers", "max_bad_steps", "device", "compile", "feature_cache_dir",
})


def state_path_for(meta_path: Path) -> Path:
    return meta_path.with_name(meta_path.name.replace("training_metadata_", "train_state_", 1).removesuffix(".json") + ".pt")


def capture_rng() -> dict:
    """Every RNG a training step can draw from (Python, NumPy, torch CPU and CUDA), in a form that
    torch.load(weights_only=True) accepts."""
    import numpy as np
    import torch
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(rng: dict) -> None:
    import numpy as np
    import torch
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


STATE_KEYS = ("run_id", "epoch", "batches_done", "step", "epoch_sums", "history", "bad_steps", "bad_in_a_row",
              "optimizer", "scheduler", "trainable", "data_order", "rng")


def load_state(path) -> dict:
    """A train_state_*.pt, loaded as data (weights_only=True never runs code from the file) and checked."""
    state = torch_load(path, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RefusedFileError(f"{path}: not a capkit training state (format {STATE_FORMAT} expected)")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise RefusedFileError(f"{path}: an incomplete training state (no {', '.join(missing)}); "
                               "resume from an earlier checkpoint")
    import torch
    wrong = [k for k, ok in (
        ("epoch", _is_int(state["epoch"])), ("batches_done", _is_int(state["batches_done"])),
        ("step", _is_int(state["step"])), ("bad_steps", _is_int(state["bad_steps"])),
        ("bad_in_a_row", _is_int(state["bad_in_a_row"])), ("history", isinstance(state["history"], list)),
        ("epoch_sums", isinstance(state["epoch_sums"], list) and len(state["epoch_sums"]) == 3),
        ("trainable", isinstance(state["trainable"], list) and all(isinstance(t, torch.Tensor) for t in state["trainable"])),
        ("data_order", isinstance(state["data_order"], torch.Tensor) and state["data_order"].dim() == 2),
        ("rng", isinstance(state["rng"], dict) and {"python", "numpy", "torch"} <= set(state["rng"])),
        ("optimizer", isinstance(state["optimizer"], dict))) if not ok]
    if wrong:
        raise RefusedFileError(f"{path}: a damaged or edited training state ({', '.join(wrong)} of the wrong type); "
                               "resume from an earlier checkpoint")
    return state


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def metadata_for(path) -> Path:
    """Whatever names a checkpoint (its metadata JSON, train_state .pt, .pth or adapter folder) -> its metadata path."""
    from load_model_example import metadata_path_for
    p = Path(path)
    if not p.name:
        raise MissingInputError(f"--resume {str(path)!r}: name a checkpoint (its metadata JSON, .pth, adapter folder "
                                "or train_state), or give no path for the newest one")
    if p.name.startswith("training_metadata_") and p.suffix == ".json":
        return p
    if p.name.startswith("train_state_"):
        return p.with_name(f"training_metadata_{p.name.removeprefix('train_state_').removesuffix('.pt')}.json")
    return metadata_path_for(p)  # a .pth or an adapter folder


def read_metadata(meta_path: Path) -> dict:
    """A checkpoint's metadata JSON (anyone may have edited it): a JSON object whose run_id is a plain
    name matching the file's own name; RefusedFileError naming the file otherwise."""
    meta = read_json(meta_path, "training metadata", RefusedFileError)
    if not isinstance(meta, dict) or not isinstance(meta.get("hyperparameters"), dict):
        raise RefusedFileError(f"{meta_path}: not a capkit training metadata file (no hyperparameters)")
    run_id = plain_name(meta.get("run_id"), f"{meta_path}: run_id")
    if not meta_path.name.startswith(f"training_metadata_{run_id}-"):
        raise RefusedFileError(f"{meta_path}: its run_id {run_id!r} doesn't match its file name")
    return meta


def resumable(meta_path: Path) -> bool:
    """Complete (its metadata, the commit marker, is readable) and with a training state beside it."""
    try:
        read_metadata(meta_path)
    except RefusedFileError:
        return False
    return state_path_for(meta_path).is_file()


def find_resumable(output_dir, training_name=None) -> Path | None:
    """The newest complete, resumable checkpoint's metadata in output_dir (of runs named training_name, if given)."""
    metas = [m for m in Path(output_dir).glob("training_metadata_*.json")
             if (training_name is None or m.name.startswith(f"training_metadata_{training_name}_")) and resumable(m)]
    return max(metas, key=lambda m: (m.stat().st_mtime, m.name)) if metas else None


def resume_target(path, output_dir, training_name=None) -> Path:
    """--resume [PATH] -> the metadata JSON of the checkpoint to resume, or a clear error."""
    if path is None:
        meta = find_resumable(output_dir, training_name)
        if meta is None:
            raise MissingInputError(f"--resume: no resumable checkpoint in {output_dir}/ "
                                    "(give its path, or --output_dir=... where the run saved)")
        return meta
    meta = metadata_for(path)
    if not meta.exists():
        raise MissingInputError(f"--resume {path}: no {meta.name} beside it, so that checkpoint was never completely "
                                "written; resume from an earlier one")
    read_metadata(meta)  # a damaged or edited metadata file is named here
    if not state_path_for(meta).is_file():
        raise MissingInputError(f"--resume {path}: {meta.name} has no training state (train_state_*.pt) to resume from")
    return meta


def _same(a, b) -> bool:
    """Equal as saved: a tuple given now equals the list the metadata JSON holds."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def merge_resume_hparams(saved: dict, given: dict, defaults: dict, log=print) -> dict:
    """The run's saved hyperparameters + the ones given now. Changes that alter the model or the data
    order are refused; safe ones are applied and logged."""
    gone = sorted(set(saved) - set(defaults))
    if gone:  # keys this version of capkit no longer has
        log(f"resume: ignoring hyperparameters this capkit doesn't know: {', '.join(gone)}")
    hp = {**defaults, **{k: v for k, v in saved.items() if k in defaults}}  # new keys get their defaults
    refused = {k: (hp.get(k), v) for k, v in given.items() if k not in RESUME_SAFE and not _same(hp.get(k), v)}
    if refused:
        raise ConfigError("--resume can't change " + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
                          + ": these alter the model or the data order. Start a new run instead; only "
                          + ", ".join(sorted(RESUME_SAFE)) + " may change.")
    for k, v in given.items():
        if not _same(hp.get(k), v):
            log(f"resume: {k} changed from {hp.get(k)!r} to {v!r}")
            hp[k] = v
    return hp


class StopSignals:
    """SIGINT / SIGTERM ask the run to stop: it finishes the current step, saves a resumable
    checkpoint and exits 0. A second signal exits at once. The previous handlers come back on exit
    (so a notebook's Ctrl-C works as before after training)."""

    def __init__(self, log=print):
        self.requested, self.log, self.saved = False, log, {}

    def _handle(self, signum, frame):
        if self.requested:
            print("\nsecond interrupt: stopping now, without saving", file=sys.stderr, flush=True)
            raise SystemExit(130)
        self.requested = True
        self.log(f"\n{signal.Signals(signum).name}: finishing this step, then saving a resumable checkpoint "
                 "(interrupt again to quit at once)")

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in (signal.SIGINT, signal.SIGTERM):
                self.saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)


def checkpoint_files(meta_path: Path) -> list[Path]:
    """The files of one checkpoint, derived from its metadata's own name (never from what the JSON says):
    training_metadata_<stem>.json -> train_state_<stem>.pt, model_state_dict_<stem>.pth, adapter_<stem>/."""
    stem = meta_path.name.removeprefix("training_metadata_").removesuffix(".json")
    return [meta_path.with_name(n) for n in (f"train_state_{stem}.pt", f"model_state_dict_{stem}.pth", f"adapter_{stem}")]


def prune_checkpoints(out_dir: Path, run_id: str, keep: int, log=print) -> None:
    """Keep this run's newest `keep` checkpoints. The metadata goes first, so an interrupted prune leaves
    at worst an uncommitted (ignored) checkpoint, never a committed one without its files. Only files
    named after the metadata are removed, in out_dir itself: a metadata JSON naming other files (edited,
    or from a stranger) can't make it delete anything else."""
    plain_name(run_id, "run_id")  # no glob characters, no path separators
    metas = sorted(out_dir.glob(f"training_metadata_{run_id}-*.json"), key=lambda m: m.stat().st_mtime)
    for meta in metas[:-keep] if keep else []:
        meta.unlink(missing_ok=True)
        for p in checkpoint_files(meta):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink(missing_ok=True)  # a symlink goes, never what it points to
        log(f"🧹 removed checkpoint {meta.name.removeprefix('training_metadata_').removesuffix('.json')} "
            f"(keep_last_n={keep})")
