"""
A checkpoint, in one place: the names of the files a training run writes, the format tags inside them, and
reading them back checked (read_checkpoint, read_folder_config, read_metadata: the one validator of each). Every
script (train.py, eval.py, load_model_example.py, model.py, hf_captioner.py, resume.py) goes through here.

    saved_models/
      model_state_dict_<run>-<epoch>.pth     model_type prefix: the trained mapper + the model config
      adapter_<run>-<epoch>/                 git / blip: the PEFT adapter folder
      train_state_<run>-<epoch>.pt           optimizer, scheduler, position, RNG states (for --resume)
      training_metadata_<run>-<epoch>.json   everything about the run: written last, the commit marker
      train_log_<run>.jsonl                  one line per optimizer step
      skipped_inputs_<run>.tsv               the inputs that were skipped, and why
      datastore_<run>.safetensors            the training images' retrieval keys + captions (retrieval.py)
      predictions_<split>_<run>-<epoch>.json eval.py's per-image predictions
      merged_<run>-<epoch>[_wise<A>]/        train.py --merge_weights: a standalone model
        training_metadata.json               (a merged folder carries its run's metadata inside)

A checkpoint's "stem" is <run>-<epoch> (or <run>-<epoch>-step<N> for a mid-epoch save). Names are
derived from names, never from what a file says: a metadata JSON can't point capkit at other files.
What is read is data, never code (files.py), and old key names come back as today's (names.py).
Imports nothing of capkit's but the leaves errors.py, files.py and names.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from capkit.errors import RefusedFileError
from capkit.files import plain_name, read_json, torch_load
from capkit.names import current_names, current_weights

CHECKPOINT_FORMAT = "capkit.prefix.v2"  # a .pth: {"format", "model_config", "state_dict"[, "datastore"]}
# the one written, and the older ones read: v1 before the renames of 2026-12 (names.py), clip_mlp.v1 before that
CHECKPOINT_FORMATS_READ = (CHECKPOINT_FORMAT, "capkit.prefix.v1", "capkit.clip_mlp.v1")
HF_CHECKPOINT_FORMAT = "capkit.hf.v2"  # an adapter / merged folder's capkit_config.json
HF_FORMATS_READ = (HF_CHECKPOINT_FORMAT, "capkit.hf.v1")  # v1: before the renames of 2026-12 (names.py)
HF_CONFIG_FILE = "capkit_config.json"  # in an adapter or merged-model folder: what rebuilds it

_CHECKPOINT = {"prefix": ("model_state_dict_", ".pth")}  # every other model type saves an adapter folder
_ADAPTER = ("adapter_", "")
_STATE = ("train_state_", ".pt")
_METADATA = ("training_metadata_", ".json")
MERGED_METADATA = "training_metadata.json"


def checkpoint_name(stem: str, model_type: str) -> str:
    prefix, suffix = _CHECKPOINT.get(model_type, _ADAPTER)
    return f"{prefix}{stem}{suffix}"


def state_name(stem: str) -> str:
    return f"{_STATE[0]}{stem}{_STATE[1]}"


def metadata_name(stem: str) -> str:
    return f"{_METADATA[0]}{stem}{_METADATA[1]}"


def step_log_name(run_id: str) -> str:
    return f"train_log_{run_id}.jsonl"


def datastore_name(run_id: str) -> str:
    return f"datastore_{run_id}.safetensors"


def skip_list_name(run_id: str) -> str:
    return f"skipped_inputs_{run_id}.tsv"


def predictions_name(split: str, checkpoint) -> str:
    return f"predictions_{split}_{stem_of(checkpoint)}.json"


def run_metadata_glob(run_id: str = "") -> str:
    """The metadata files of one run (run_id given) or of every run: a glob pattern for Path.glob."""
    return f"{_METADATA[0]}{run_id}{'-' if run_id else ''}*{_METADATA[1]}"


def checkpoint_globs() -> list[str]:
    return [f"{p}*{s}" for p, s in (*_CHECKPOINT.values(), _ADAPTER)]


def stem_of(path) -> str:
    """Any file of a checkpoint (model_state_dict_<stem>.pth, adapter_<stem>, train_state_<stem>.pt,
    training_metadata_<stem>.json) -> <stem>. Any other name comes back without a .pth suffix."""
    name = Path(path).name
    for prefix, suffix in (*_CHECKPOINT.values(), _STATE, _METADATA, _ADAPTER):
        if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
            return name[len(prefix):len(name) - len(suffix)]
    return name.removesuffix(".pth")


def is_metadata(path) -> bool:
    name = Path(path).name
    return name.startswith(_METADATA[0]) and name.endswith(_METADATA[1])


def metadata_path_for(path) -> Path:
    """Whatever names a checkpoint (its .pth, adapter folder, train_state or metadata itself) -> the
    training_metadata_<stem>.json beside it; a merged folder carries its own training_metadata.json."""
    p = Path(path)
    if p.is_dir() and (p / MERGED_METADATA).exists():
        return p / MERGED_METADATA
    return p if is_metadata(p) else p.with_name(metadata_name(stem_of(p)))


def state_path_for(meta_path) -> Path:
    meta_path = Path(meta_path)
    return meta_path.with_name(state_name(stem_of(meta_path)))


def checkpoint_files(meta_path) -> list[Path]:
    """The other files of one checkpoint, derived from its metadata's own name (never from what the JSON
    says): its training state and its weights, whichever model type saved them."""
    meta_path = Path(meta_path)
    stem = stem_of(meta_path)
    weights = [f"{prefix}{stem}{suffix}" for prefix, suffix in (*_CHECKPOINT.values(), _ADAPTER)]
    return [meta_path.with_name(n) for n in (state_name(stem), *weights)]


def newest_checkpoint(folder="saved_models") -> Path | None:
    """The newest checkpoint (.pth or adapter folder) whose metadata JSON exists (= it was completely written)."""
    ckpts = [p for pattern in checkpoint_globs() for p in Path(folder).glob(pattern)
             if not p.name.startswith(".") and metadata_path_for(p).exists()]
    return max(ckpts, key=lambda p: p.stat().st_mtime) if ckpts else None


def checkpoint_in(path) -> Path:
    """A checkpoint as given, or for a folder of checkpoints (saved_models/, seed 002's --model_path ./checkpoints)
    its newest one. A model folder (adapter, merged: it holds a *config.json) is a checkpoint itself."""
    p = Path(path)
    if p.is_dir() and not any(p.glob("*config.json")):
        found = newest_checkpoint(p)
        if found is not None:
            return found
    return p


# ----------------------------------------------------------------------------------------------
# reading a checkpoint back, checked: anyone may have edited or replaced these files

def read_checkpoint(path) -> dict:
    """A prefix model's .pth, loaded without executing anything (weights_only=True refuses pickled code), with
    its shape checked: a format tag this version reads, a model config and a dict of tensors. Old key and weight
    names come back as today's."""
    ckpt = torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") not in CHECKPOINT_FORMATS_READ:
        raise RefusedFileError(f"{path}: not a capkit checkpoint (format {CHECKPOINT_FORMAT} expected)")
    state = ckpt.get("state_dict")
    if not isinstance(ckpt.get("model_config"), dict) or not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise RefusedFileError(f"{path}: a damaged capkit checkpoint (model_config / state_dict missing or malformed)")
    return {**ckpt, "model_config": _current(ckpt["model_config"], path), "state_dict": current_weights(state)}


def read_folder_config(folder: Path) -> dict:
    """The model config saved in an adapter or merged folder (its capkit_config.json), format checked."""
    saved = read_json(folder / HF_CONFIG_FILE, "model folder config", RefusedFileError)
    if not isinstance(saved, dict) or saved.get("format") not in HF_FORMATS_READ or \
            not isinstance(saved.get("model_config", {}), dict):
        raise RefusedFileError(f"{folder}: not a capkit model folder (format {HF_CHECKPOINT_FORMAT} expected "
                               f"in {HF_CONFIG_FILE})")
    return _current(saved.get("model_config", {}), folder / HF_CONFIG_FILE)


def read_metadata(meta_path, of_run: bool = True) -> dict:
    """A checkpoint's metadata JSON: a JSON object with a `hyperparameters` object (and a `model_config` one, if
    any), their old key names read as today's. of_run: also its run_id, a plain name that matches the file's own
    name (a run's files are named after it; a merged folder's training_metadata.json is not)."""
    meta = read_json(meta_path, "training metadata", RefusedFileError)
    if not isinstance(meta, dict) or not isinstance(meta.get("hyperparameters"), dict) or \
            not isinstance(meta.get("model_config", {}), dict):
        raise RefusedFileError(f"{meta_path}: not a capkit training metadata file (a JSON object with "
                               "'hyperparameters' expected)")
    if of_run:
        run_id = plain_name(meta.get("run_id"), f"{meta_path}: run_id")
        if not (is_metadata(meta_path) and stem_of(meta_path).startswith(f"{run_id}-")):
            raise RefusedFileError(f"{meta_path}: its run_id {run_id!r} doesn't match its file name")
    out = {**meta, "hyperparameters": _current(meta["hyperparameters"], meta_path)}
    if "model_config" in meta:
        out["model_config"] = _current(meta["model_config"], meta_path)
    return out


def _current(d: dict, path) -> dict:
    try:
        return current_names(d, str(path))[0]
    except ValueError as e:
        raise RefusedFileError(str(e)) from None
