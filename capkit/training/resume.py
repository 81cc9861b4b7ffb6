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
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from capkit.checkpoints import (
    checkpoint_files,
    metadata_path_for,
    read_metadata,
    run_metadata_glob,
    state_path_for,
    stem_of,
)
from capkit.errors import ConfigError, MissingInputError, RefusedFileError
from capkit.files import plain_name, torch_load

STATE_FORMAT = 1
# hyperparameters a resumed run may change: they alter neither the model nor the data order
RESUME_SAFE = frozenset({
    "num_epochs", "evaluation_enabled", "test_evaluation_enabled", "evaluate_before_training", "ablate_image",
    "eval_batch_size", "max_new_tokens", "num_beams", "save_every_n_epochs", "save_every_n_steps", "keep_last_n",
    "log_with", "num_workers", "max_bad_steps", "device", "compile", "feature_cache_dir", "coco_metrics",
})


# ----------------------------------------------------------------------------------------------
# the training loop's state: what a checkpoint saves and what --resume restores, side by side

LOCAL = {"saved": False}  # field metadata: this process's bookkeeping, never written to a training state


@dataclass
class LoopState:
    """Where train.py's loop is. Every field without LOCAL is saved in train_state_<stem>.pt (saved()) and
    restored by --resume (from_state()), and load_state() checks its type: a new resumable field is one
    line here."""
    epoch: int = 1                      # the epoch being trained (finished, once batches_done reaches its length)
    batches_done: int = 0               # micro-batches of `epoch` consumed so far
    step: int = 0                       # optimizer steps taken in the whole run
    epoch_sums: list = field(default_factory=lambda: [0.0, 0, 0.0])  # this epoch: summed step losses, steps, seconds
    history: list = field(default_factory=list)                      # one summary per finished epoch
    bad_steps: int = 0                  # optimizer steps skipped for a non-finite loss or gradient, in all ...
    bad_in_a_row: int = 0               # ... and consecutively (max_bad_steps stops the run)
    meta_path: Path | None = field(default=None, metadata=LOCAL)     # the last complete checkpoint's metadata
    meta: dict = field(default_factory=dict, metadata=LOCAL)         # ... and its contents
    rng_at_epoch_start: dict | None = field(default=None, metadata=LOCAL)  # a mid-epoch resume's RNG states
    epoch_started: float = field(default=0.0, metadata=LOCAL)        # time.time() when this epoch (re)started
    batches_per_epoch: int = field(default=0, metadata=LOCAL)

    @classmethod
    def saved_fields(cls) -> list:
        return [f for f in fields(cls) if f.metadata.get("saved", True)]

    def saved(self) -> dict:
        return {f.name: getattr(self, f.name) for f in self.saved_fields()}

    @classmethod
    def from_state(cls, state: dict) -> "LoopState":
        return cls(**{f.name: state[f.name] for f in cls.saved_fields()})

    def first_epoch(self, n_batches: int) -> int:
        """The epoch to train next: this one if it stopped part-way, else the one after (1 for a new run)."""
        return self.epoch + 1 if self.batches_done >= n_batches else self.epoch

    def start_epoch(self, epoch: int, n_batches: int) -> int:
        """-> how many batches of `epoch` to skip: a resume inside it continues it; otherwise it starts afresh."""
        if not (self.epoch == epoch and 0 < self.batches_done < n_batches):
            self.epoch, self.batches_done, self.epoch_sums = epoch, 0, [0.0, 0, 0.0]
        self.batches_per_epoch = n_batches
        return self.batches_done

    def start_clock(self) -> None:
        """The epoch's seconds run from now, plus those it had already run before a mid-epoch save."""
        self.epoch_started = time.time() - self.epoch_sums[2]

    def add_step(self, loss: float) -> None:
        self.epoch_sums[0], self.epoch_sums[1], self.step = self.epoch_sums[0] + loss, self.epoch_sums[1] + 1, self.step + 1

    @property
    def train_loss(self) -> float:
        """The mean step loss of this epoch so far."""
        return self.epoch_sums[0] / max(self.epoch_sums[1], 1)


def training_state(run_id: str, loop: LoopState, opt, sched, trainable, data_order) -> dict:
    """What train_state_<stem>.pt holds: the loop's state plus everything else a bit-exact resume needs."""
    loop.epoch_sums[2] = time.time() - loop.epoch_started
    return {"format": STATE_FORMAT, "run_id": run_id, **loop.saved(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "trainable": [p.detach().cpu().clone() for p in trainable], "data_order": data_order, "rng": capture_rng()}


def restore_training_state(path: Path, opt, sched, trainable, generators) -> LoopState:
    """train_state_<stem>.pt back into the optimizer, scheduler, trainable weights and data-order generators
    -> the loop's state. RNG states are restored now (saved at an epoch's end) or when the epoch restarts."""
    st = load_state(path)
    if [tuple(getattr(t, "shape", ())) for t in st["trainable"]] != [tuple(p.shape) for p in trainable]:
        raise RefusedFileError(f"--resume {path}: its trainable tensors don't fit this model")
    try:
        with torch.no_grad():
            for p, t in zip(trainable, st["trainable"]):
                p.copy_(t)
        opt.load_state_dict(st["optimizer"])
        if sched is not None and st["scheduler"] is not None:
            sched.load_state_dict(st["scheduler"])
        for g, saved in zip(generators, st["data_order"], strict=True):  # the data order of the epoch it
            g.set_state(saved.clone())                                      # stopped in (or of the next one)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise RefusedFileError(f"{path}: its optimizer, scheduler or data-order state doesn't fit this "
                               f"run ({type(e).__name__}); resume from an earlier checkpoint") from None
    loop = LoopState.from_state(st)
    loop.rng_at_epoch_start = st["rng"]
    return loop


def capture_rng() -> dict:
    """Every RNG a training step can draw from (Python, NumPy, torch CPU and CUDA), in a form that
    torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


STATE_KEYS = ("run_id", *(f.name for f in LoopState.saved_fields()), "optimizer", "scheduler", "trainable",
              "data_order", "rng")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_FIELD_CHECKS = {"int": _is_int, "list": lambda v: isinstance(v, list)}  # by LoopState's field annotations


def load_state(path) -> dict:
    """A train_state_*.pt, loaded as data (weights_only=True never runs code from the file) and checked."""
    state = torch_load(path, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RefusedFileError(f"{path}: not a capkit training state (format {STATE_FORMAT} expected)")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise RefusedFileError(f"{path}: an incomplete training state (no {', '.join(missing)}); "
                               "resume from an earlier checkpoint")
    wrong = [f.name for f in LoopState.saved_fields() if not _FIELD_CHECKS[f.type](state[f.name])]
    if "epoch_sums" not in wrong and len(state["epoch_sums"]) != 3:
        wrong.append("epoch_sums")
    wrong += [k for k, ok in (
        ("trainable", isinstance(state["trainable"], list) and all(isinstance(t, torch.Tensor) for t in state["trainable"])),
        ("data_order", isinstance(state["data_order"], torch.Tensor) and state["data_order"].dim() == 2
         and state["data_order"].shape[0] == 2),
        ("rng", isinstance(state["rng"], dict) and {"python", "numpy", "torch"} <= set(state["rng"])),
        ("optimizer", isinstance(state["optimizer"], dict))) if not ok]
    if wrong:
        raise RefusedFileError(f"{path}: a damaged or edited training state ({', '.join(wrong)} of the wrong type); "
                               "resume from an earlier checkpoint")
    return state


def metadata_for(path) -> Path:
    """Whatever names a checkpoint (its metadata JSON, train_state .pt, .pth or adapter folder) -> its metadata path."""
    if not Path(path).name:
        raise MissingInputError(f"--resume {str(path)!r}: name a checkpoint (its metadata JSON, .pth, adapter folder "
                                "or train_state), or give no path for the newest one")
    return metadata_path_for(path)


def resumable(meta_path: Path) -> bool:
    """Complete (its metadata, the commit marker, is readable) and with a training state beside it."""
    try:
        read_metadata(meta_path)
    except RefusedFileError:
        return False
    return state_path_for(meta_path).is_file()


def find_resumable(output_dir, training_name=None) -> Path | None:
    """The newest complete, resumable checkpoint's metadata in output_dir (of runs named training_name, if given)."""
    metas = [m for m in Path(output_dir).glob(run_metadata_glob())
             if (training_name is None or stem_of(m).startswith(f"{training_name}_")) and resumable(m)]
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


def same(a, b) -> bool:
    """Equal as saved: a tuple given now equals the list the metadata JSON holds."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def merge_resume_hparams(saved: dict, given: dict, defaults: dict, log=print) -> dict:
    """The run's saved hyperparameters (old key names already read as today's: checkpoints.read_metadata) + the
    ones given now. A saved key this version doesn't know is refused: it may shape the model or the data, and
    falling back to its default would continue another run. Changes that alter the model or the data order are
    refused; safe ones are applied and logged. Keys added since the run was saved get their defaults."""
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise ConfigError(f"--resume: the run was saved with hyperparameters this capkit doesn't know: "
                          f"{', '.join(unknown)}. They may shape the model or the data, so the run can't continue "
                          "as it was: resume it with the capkit version that wrote it, or start a new run")
    hp = {**defaults, **saved}
    refused = {k: (hp.get(k), v) for k, v in given.items() if not same(hp.get(k), v) and (
        k not in RESUME_SAFE or (k == "max_new_tokens" and hp.get("scst_from_epoch") is not None))}  # (SCST's samples)
    if refused:
        raise ConfigError("--resume can't change " + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
                          + ": these alter the model or the data order. Start a new run instead; only "
                          + ", ".join(sorted(RESUME_SAFE)) + " may change.")
    for k, v in given.items():
        if not same(hp.get(k), v):
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
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in (signal.SIGINT, signal.SIGTERM):
                self.saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)


def prune_checkpoints(out_dir: Path, run_id: str, keep: int, log=print) -> None:
    """Keep this run's newest `keep` checkpoints. The metadata goes first, so an interrupted prune leaves
    at worst an uncommitted (ignored) checkpoint, never a committed one without its files. Only files
    named after the metadata are removed, in out_dir itself: a metadata JSON naming other files (edited,
    or from a stranger) can't make it delete anything else."""
    plain_name(run_id, "run_id")  # no glob characters, no path separators
    metas = sorted(out_dir.glob(run_metadata_glob(run_id)), key=lambda m: m.stat().st_mtime)
    for meta in metas[:-keep] if keep else []:
        meta.unlink(missing_ok=True)
        for p in checkpoint_files(meta):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink(missing_ok=True)  # a symlink goes, never what it points to
        log(f"🧹 removed checkpoint {stem_of(meta)} "
            f"(keep_last_n={keep})")
