"""
What a configuration means but doesn't say, read the way its user meant it (config.py calls this before the
choices and ranges are checked). Each reading is said once as a note; where the user's own words contradict
it, the configuration is refused with the fix instead. Never silent:

- a data path (train_dir, test_dir, captions_file, ...) that the dataset in use doesn't read means your own
  folder: dataset="folder" (the default "flickr30k" would otherwise train on Flickr30K and ignore the path);
- dataset=PATH, an existing folder, means dataset="folder" with data_dir=PATH;
- hf_model_name (the seeds' --model_name) names a GIT or BLIP model: model_type="git" / "blip";
- weight_decay inside optimizer_args is the key of that name (seed 004's TOML): the table's value wins;
- scheduler_args that only another scheduler takes (base_lr, max_lr: CyclicLR's) choose that scheduler;
- a key that does nothing for the model type in use (LoRA keys on a prefix model, ...) is named.

    from capkit.training.implied import Notes, read_as_meant
    hp = read_as_meant(hp, given={"train_dir": "photos/"}, say=Notes())   # -> dataset "folder", said once
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

from capkit.data.shapes import STYLE_OF
from capkit.errors import ConfigError
from capkit.models.hf_captioner import hf_family

# the path keys each dataset reads (every other path key given with it would be ignored); the demo datasets
# (shapes, shapes_b, scenes) read data_dir: where the demo data is written
PATHS_READ = {"flickr30k": ("data_dir",), "folder": ("data_dir", "train_dir", "val_dir", "test_dir", "captions_file"),
              "webdataset": ("data_dir", "train_dir", "val_dir", "test_dir"), "hf": (),
              "karpathy": ("data_dir", "captions_file"),
              **{demo: ("data_dir",) for demo in STYLE_OF}}
PATH_KEYS = PATHS_READ["folder"]  # every data path key (the folder dataset reads them all)
# what makes data_dir a Flickr30K folder (dataset.py reads the CSV and the images)
FLICKR30K_MARKS = ("flickr_annotations_30k.csv", "flickr30k-images", "flickr30k-images.zip")

# keys that shape only some model types; given for another, they do nothing
ADAPTER_KEYS = ("hf_model_name", "quantization_bits", "peft_module", "lora_r", "lora_alpha", "lora_dropout",
                "target_modules", "gradient_checkpointing")
PREFIX_KEYS = ("encoder_type", "encoder_name", "encoder_pretrained", "encoder_layer", "image_size", "lm_name",
               "tokenizer_name", "encoder_features", "mapper_type", "mapper_prefix_length", "mapper_hidden_dim",
               "mapper_dropout", "mapper_num_layers", "mapper_num_heads", "retrieval_k", "retrieval_pool",
               "retrieval_template", "lm_lora_r")
# the adapter keys that also shape the prefix model's decoder LoRA (lm_lora_r > 0)
DECODER_LORA_KEYS = ("lora_alpha", "lora_dropout", "target_modules")
# optimizer arguments that are hyperparameters of the same name (lr, learning_rate's, stays refused: another name)
OPTIMIZER_KEYS = {"weight_decay": "weight_decay"}


class Notes:
    """say(text): print "note: text" once (the same note from the TOML file and the command line is one note);
    under `accelerate launch` only the first process (RANK 0) says it."""

    def __init__(self, out=print):
        self.out, self.said = out if os.environ.get("RANK", "0") == "0" else (lambda _text: None), []

    def __call__(self, text: str) -> None:
        if text not in self.said:
            self.said.append(text)
            self.out(f"note: {text}")


def read_as_meant(hp: dict, given: dict, say, schedulers=(), flags=frozenset()) -> dict:
    """hp (typed, not yet checked against choices) -> hp as its user meant it. given: the keys the user wrote
    (TOML file and command line, and the data paths set in train.py's dict; not a preset's values); flags: those
    of them given on the command line."""
    hp = data_as_meant(hp, given, say)
    model_type_from_name(hp, given, say)
    optimizer_args_as_keys(hp, say, flags)
    scheduler_from_args(hp, given, say, schedulers)
    keys_without_effect(hp, given, say)
    levers_as_meant(hp, given, say)
    return hp


def data_as_meant(hp: dict, given: dict, say, whose: str | None = None) -> dict:
    """Only the data keys' readings (eval.py's --test_dir / --dataset over a checkpoint's run: whose="the run's")."""
    hp = dict(hp)
    dataset_from_path(hp, given, say)
    folder_for_paths(hp, given, say, whose)
    return hp


def dataset_from_path(hp: dict, given: dict, say) -> None:
    """dataset=PATH (seed 002's --dataset /path/to/dataset), an existing folder -> dataset="folder", data_dir=PATH."""
    d = hp.get("dataset")
    if not isinstance(d, str) or d in PATHS_READ or not Path(d).is_dir():
        return
    other = [k for k in PATH_KEYS if given.get(k) is not None and k != "captions_file"]
    if other:
        raise ConfigError(f"dataset={d!r} is a folder, and {other[0]} names another: give dataset='folder' with "
                          f"data_dir (one folder) or train_dir / test_dir")
    say(f"dataset={d!r} is a folder: dataset='folder', data_dir={d!r}")
    hp["dataset"], hp["data_dir"] = "folder", d


def folder_for_paths(hp: dict, given: dict, say, whose: str | None = None) -> None:
    """A data path the user gave that the dataset in use doesn't read: dataset="folder" when the dataset was not
    the user's own choice (the default, or a preset's), refused when it was. (A preset's own paths are its own.)"""
    d = hp.get("dataset")
    reads = PATHS_READ.get(d)
    if reads is None:
        return  # an unknown dataset: the choices check names it
    chosen = "dataset" in given
    unread = [k for k in PATH_KEYS if given.get(k) is not None and
              (k not in reads or (not chosen and _not_flickr30k(hp, k)))]
    if not unread:
        return
    k = unread[0]
    if chosen:
        raise ConfigError(f"{k}={hp[k]!r} is not read by dataset={d!r}"
                          + (f" (it reads {', '.join(reads)})" if reads else "")
                          + ": for your own folder of images and captions give dataset='folder'")
    whose = whose or ("a preset's" if d != "flickr30k" else "the default")
    # a captions_file that is JSON is a Karpathy split file (dataset_coco.json, ...), read with its image folder
    target = "karpathy" if str(given.get("captions_file") or "").endswith(".json") and \
        set(unread) <= set(PATHS_READ["karpathy"]) else "folder"
    say(f"{k}={hp[k]!r} names your own data: dataset={target!r} (not {whose} {d!r}, which would ignore it)")
    hp["dataset"] = target


def _not_flickr30k(hp: dict, key: str) -> bool:
    """data_dir with dataset="flickr30k" must hold Flickr30K's files (its CSV, or its image folder / zip, whose
    missing CSV the Flickr30K loader then names); any other folder is the user's own."""
    folder = Path(hp[key])
    return key == "data_dir" and hp["dataset"] == "flickr30k" and not any(
        (folder / name).exists() for name in FLICKR30K_MARKS)


def model_type_from_name(hp: dict, given: dict, say) -> None:
    """hf_model_name given: the GIT / BLIP family it names is the model type (seeds 000-002's --model_name
    microsoft/git-base) unless the user chose another model type, which is refused as a contradiction."""
    name = given.get("hf_model_name")
    if name is None:
        return
    family = hf_family(name)
    if family is None and hp["model_type"] == "prefix" and "model_type" not in given:
        raise ConfigError(f"hf_model_name={name!r} names a GIT or BLIP captioning model (model_type 'git' or "
                          "'blip'), and neither its name nor its config.json says which: add --model_type=git or "
                          "--model_type=blip. For the prefix model's decoder, use lm_name")
    if family is None or family == hp["model_type"]:
        return
    if "model_type" in given:
        raise ConfigError(f"hf_model_name={name!r} is a {family.upper()} model, but model_type={hp['model_type']!r}: "
                          f"give model_type={family!r}, or a {hp['model_type']} model")
    say(f"hf_model_name={name!r} is a {family.upper()} model: model_type={family!r}")
    hp["model_type"] = family


def optimizer_args_as_keys(hp: dict, say, flags=frozenset()) -> None:
    """optimizer_args' weight_decay (seed 004's [optimizer_args] table) -> the key weight_decay, which would
    otherwise reach the optimizer twice. The table's value wins, unless the key alone was given on the command
    line (the command line beats a TOML file)."""
    args = hp.get("optimizer_args")
    if not isinstance(args, dict):
        return
    for arg, key in OPTIMIZER_KEYS.items():
        if arg not in args:
            continue
        value = args[arg]
        hp["optimizer_args"] = args = {k: v for k, v in args.items() if k != arg}
        if key in flags and "optimizer_args" not in flags:
            say(f"optimizer_args {arg}={value!r} (the config file's) gives way to --{key}={hp[key]!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"optimizer_args {arg}={value!r}: must be a number (it is the key {key})")
        if value != hp[key]:
            say(f"optimizer_args {arg}={value!r} is the key {key}: {key}={value!r} (not {hp[key]!r})")
        hp[key] = float(value)


def scheduler_from_args(hp: dict, given: dict, say, schedulers) -> None:
    """scheduler_args that the scheduler in use doesn't take but exactly one other does (seed 004's base_lr /
    max_lr: CyclicLR's) choose that one, unless the user chose lr_scheduler: then torch's refusal stands."""
    args = hp.get("scheduler_args")
    if not args or not isinstance(args, dict) or "lr_scheduler" in given or not hp["learning_rate_scheduler_enabled"]:
        return
    takes = [s for s in schedulers if _takes(s, args)]
    if hp["lr_scheduler"] in takes or len(takes) != 1:
        return
    rates = {k: v for k, v in args.items() if k in ("base_lr", "max_lr")}
    follows = (f"; the learning rate follows {', '.join(f'{k}={v!r}' for k, v in rates.items())}, not "
               f"learning_rate={hp['learning_rate']!r}" if rates else "")
    large = any(isinstance(v, (int, float)) and v >= 0.1 for v in rates.values()) and hp["optimizer"] == "AdamW"
    say(f"scheduler_args {', '.join(args)} are {takes[0]}'s arguments: lr_scheduler={takes[0]!r} "
        f"(not {hp['lr_scheduler']!r}){follows}" + (" (large for AdamW; rates near 1 suit --optimizer=Prodigy)"
                                                    if large else ""))
    hp["lr_scheduler"] = takes[0]


def _takes(scheduler: str, args: dict) -> bool:
    params = inspect.signature(getattr(torch.optim.lr_scheduler, scheduler)).parameters
    return all(a in params for a in args)


def keys_without_effect(hp: dict, given: dict, say) -> None:
    """Name each key the user gave that the model type in use never reads."""
    adapters = hp["model_type"] in ("git", "blip")
    read = () if adapters or not hp.get("lm_lora_r") else DECODER_LORA_KEYS  # (the decoder's LoRA reads these)
    idle = [k for k in (PREFIX_KEYS if adapters else ADAPTER_KEYS) if k in given and given[k] != _off(k)
            and k not in read]
    for k in idle:
        what = "the prefix model's (the frozen encoder, the mapper, the decoder)" if adapters else \
            "for the git / blip adapters (model_type='git' or 'blip'); the prefix model's decoder is frozen " \
            "unless lm_lora_r > 0 (LoRA of that rank on it, shaped by lora_alpha, lora_dropout, target_modules)"
        say(f"{k} has no effect on model_type={hp['model_type']!r}: it is {what}")


def levers_as_meant(hp: dict, given: dict, say) -> None:
    """The retrieval, SCST and evaluation keys that only act together: said when idle, refused when they contradict."""
    k, pool = hp.get("retrieval_k", 0), hp.get("retrieval_pool", 0)
    if pool and not k:
        say("retrieval_pool has no effect with retrieval_k=0 (no retrieval prompt)")
    elif pool and pool <= k:
        raise ConfigError(f"retrieval_pool={pool} must be more than retrieval_k={k}: training draws the k among the "
                          f"pool nearest (e.g. retrieval_pool={2 * k}); 0 takes the k nearest")
    if "retrieval_template" in given and not k:
        say("retrieval_template has no effect with retrieval_k=0 (no retrieval prompt)")
    scst = hp.get("scst_from_epoch")
    if scst is None:
        for key in ("scst_samples", "scst_baseline"):
            if key in given:
                say(f"{key} has no effect without scst_from_epoch (SCST is off)")
    elif scst > hp["num_epochs"]:
        raise ConfigError(f"scst_from_epoch={scst} is after the last epoch (num_epochs={hp['num_epochs']}): no SCST "
                          "step would run")
    elif hp.get("scst_baseline") == "mean" and hp.get("scst_samples", 0) < 2:
        raise ConfigError("scst_baseline='mean' measures each sample against the image's other samples: give "
                          "scst_samples=2 or more (or scst_baseline='greedy')")
    if hp.get("coco_metrics") and not hp.get("test_evaluation_enabled"):
        say("coco_metrics has no effect with test_evaluation_enabled=False (they score the test split)")


def _off(key: str):
    """The value of a key that asks for nothing (gradient_checkpointing=False on a prefix model is no request)."""
    return False if key == "gradient_checkpointing" else object()
