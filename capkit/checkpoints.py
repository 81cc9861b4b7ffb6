"""
The names of the files a training run writes: the one place that knows them. Every script
(train.py, eval.py, load_model_example.py, resume.py, model.py's merge) derives names from here.

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
This module imports nothing of capkit's.
"""
from __future__ import annotations

from pathlib import Path

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
