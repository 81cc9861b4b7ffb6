"""
Reading and checking train.py's hyperparameters, before anything loads: the `hyperparameters` dict
(train.py) <- --preset NAME <- --config FILE.toml <- --KEY=VALUE; unknown keys, wrong types, values out
of range, a device this machine lacks, optimizer / scheduler arguments torch would refuse and an
output_dir that can't be written are all refused here with a ConfigError naming the key. Also: what the
hyperparameters mean for the model (model_config_from_hparams), the optimizer and the LR scheduler.

    import train
    from capkit.training import config
    hp = config.resolve_hparams(["--preset", "demo", "--batch_size=32"], train.hyperparameters, train.PRESETS)
"""
from __future__ import annotations

import ast
import difflib
import math
import tempfile
import tomllib
from dataclasses import fields
from pathlib import Path

import torch

from capkit.checkpoints import read_metadata
from capkit.data.shapes import STYLE_OF
from capkit.errors import ConfigError
from capkit.files import plain_name, read_text
from capkit.models.captioner import (
    CONFIG_BOUNDS,
    FRACTIONS,
    GENERATION_LIMITS,
    MODEL_TYPES,
    SHAPING_FIELDS,
    CaptionerConfig,
)
from capkit.models.decoders import LM_DTYPES
from capkit.models.encoders import ENCODER_TYPES, FEATURE_KINDS
from capkit.models.hf_captioner import ADAPTER_BOUNDS, PEFT_MODULES, QUANTIZATION_BITS
from capkit.models.mappers import MAPPER_TYPES
from capkit.models.retrieval import RETRIEVAL_TEMPLATES
from capkit.names import KEY_ALIASES, current_names, current_value
from capkit.runtime import pick_device
from capkit.training.implied import PATH_KEYS, Notes, read_as_meant
from capkit.training.resume import load_state, merge_resume_hparams, resume_target, same, state_path_for
from capkit.training.scst import SCST_BASELINES, SCST_BOUNDS

# their flags that capkit answers another way: what to do instead (docs/seeds.md)
NOT_KEYS = {
    "interactive": "--interactive (a hook that changes a run while it trains) is not in capkit: a run changed by a "
                   "file not saved with it can't be resumed or reproduced. Stop it (Ctrl-C saves a resumable "
                   "checkpoint) and continue with the safe changes: python train.py --resume --num_epochs=N ... "
                   "(docs/seeds.md \"Changing a run while it trains\")",
    "model_config": "--model_config has no capkit key: each model setting is a key of its own (dropout: "
                    "mapper_dropout or lora_dropout; placement: device); python train.py --help lists them",
    "eval": "evaluation is its own script: python eval.py --checkpoint CKPT (with no arguments: the newest checkpoint)",
    "inference": "captioning is its own script: python inference.py --checkpoint CKPT IMAGES_OR_FOLDERS",
    "test_image": "captioning is its own script: python inference.py --checkpoint CKPT IMAGE",
}
MODE_FLAGS = ("train",)  # seed 001's `--train`: train.py always trains (said once)

# keys that may be None: the type a value must have when it is not None
NONE_DEFAULT_TYPES = {"data_dir": (str, list), "train_dir": (str, list), "val_dir": (str, list),  # lists: webdataset
                      "test_dir": (str, list), "captions_file": str,
                      "training_size_limit": int, "captions_per_image": int, "encoder_pretrained": str,
                      "image_size": int, "tokenizer_name": str,
                      "num_workers": int, "max_grad_norm": float, "feature_cache_dir": str, "hf_model_name": str,
                      "target_modules": list, "training_name": str, "log_with": str, "lr_scheduler": str,
                      "save_every_n_steps": int, "keep_last_n": int, "hf_dataset": str, "image_column": str,
                      "caption_column": (str, list), "init_from": str, "scst_from_epoch": int}
SCHEDULERS = ("StepLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR")
# the choices of the model's keys are declared by the part that implements them (models/), train.py's own here
CHOICES = {"model_type": MODEL_TYPES, "mapper_type": MAPPER_TYPES, "encoder_features": FEATURE_KINDS,
           "encoder_type": ENCODER_TYPES, "quantization_bits": QUANTIZATION_BITS, "peft_module": PEFT_MODULES,
           "lm_dtype": tuple(LM_DTYPES), "retrieval_template": tuple(RETRIEVAL_TEMPLATES),
           "scst_baseline": SCST_BASELINES, "optimizer": ("AdamW", "Prodigy"), "lr_scheduler": SCHEDULERS + (None,),
           "log_with": ("tensorboard", "wandb", None),
           "dataset": ("flickr30k", "folder", "karpathy", "hf", "webdataset", *STYLE_OF)}
# the model config's fields whose hyperparameter has another name
HPARAM_OF_FIELD = {"encoder_image_size": "image_size", "lm_tokenizer_name": "tokenizer_name"}
# the values each number may take, checked before anything loads: a string interval for train.py's own keys ("["
# includes the bound, "(" excludes it), the (lowest, highest) tuple (both included) where a part declares the bound;
# None values are checked only where None is not allowed
RANGES = {
    "batch_size": "[1, inf)", "num_epochs": "[1, inf)", "eval_batch_size": "[1, inf)",
    **{k: GENERATION_LIMITS[k] for k in ("max_new_tokens", "num_beams", *SHAPING_FIELDS)},  # as serve.py
    "max_caption_length": "[2, inf)", "lora_alpha": "(0, inf)",
    "learning_rate": "(0, inf)", "weight_decay": "[0, inf)", "learning_rate_decay": "(0, inf)",
    "learning_rate_decay_step": "[1, inf)", "warmup_steps": "[0, inf)", "gradient_accumulation_steps": "[1, inf)",
    "max_grad_norm": "(0, inf)", "max_bad_steps": "[1, inf)", "training_size_limit": "[1, inf)",
    "captions_per_image": "[1, inf)", "scst_from_epoch": "[1, inf)", **SCST_BOUNDS,
    "frozen_parts": "[0, inf)", "save_every_n_epochs": "[1, inf)", "save_every_n_steps": "[1, inf)",
    "keep_last_n": "[1, inf)", "num_workers": "[0, 256]", "seed": "[0, 4294967295]", "split_ratio": "(0, 1]",
    "val_ratio": "[0, 1)", "shuffle_buffer": "[1, 10000000]", "caption_dropout": "[0, 1)",
    **{key: "[0, 1)" for key in FRACTIONS},  # the dropouts CaptionerConfig checks the same way
    **{HPARAM_OF_FIELD.get(k, k): b for k, b in {**CONFIG_BOUNDS, **ADAPTER_BOUNDS}.items()},  # the model's own
}


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_type(key, value, defaults: dict):
    default = defaults[key]
    want = NONE_DEFAULT_TYPES.get(key) if default is None else type(default)
    if value is None:
        if default is None or key in NONE_DEFAULT_TYPES:
            return value
        raise ConfigError(f"hyperparameter {key!r} can't be None (default {default!r})")
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
        name = " or ".join(t.__name__ for t in want) if isinstance(want, tuple) else want.__name__
        raise ConfigError(f"hyperparameter {key!r} must be {name}, got {value!r} ({type(value).__name__})")
    return value


def check_keys(d: dict, where: str, defaults: dict):
    unknown = [k for k in d if k not in defaults]
    for k in unknown:
        if k in NOT_KEYS:
            raise ConfigError(NOT_KEYS[k])
    if unknown:
        hints = [f"{k!r} (did you mean {m!r}?)" if (m := suggest(k, defaults)) else repr(k) for k in unknown]
        raise ConfigError(f"unknown hyperparameter {', '.join(hints)} in {where}.\n"
                          f"Valid keys: {', '.join(sorted(defaults))}")


def suggest(key: str, defaults: dict) -> str | None:
    """The key a typo most likely meant: a near spelling only (--bach_size -> batch_size), never a key of another
    meaning that merely looks alike (--block_size is not batch_size: it is an alias of max_caption_length)."""
    m = difflib.get_close_matches(key, [*defaults, *(a for a, k in KEY_ALIASES.items() if k in defaults)], 1,
                                  cutoff=0.8)
    return KEY_ALIASES.get(m[0], m[0]) if m else None


def canonical(key: str, say, dash: str = "--", defaults: dict | None = None) -> str:
    """A key as given -> capkit's name for it (an alias is said once: "--lr is learning_rate"). An old name of a
    model-config field that was never a hyperparameter (clip_image_size) is no alias here: it stays unknown."""
    if key in KEY_ALIASES and (defaults is None or KEY_ALIASES[key] in defaults or KEY_ALIASES[key] == "config"):
        say(f"{dash}{key} is {KEY_ALIASES[key]}")
        return KEY_ALIASES[key]
    return key


def current_keys(d: dict, where: str, say) -> dict:
    """A dict written with capkit's old key names (names.py) read with today's, each old name said once."""
    try:
        out, renamed = current_names(d, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for old in renamed:
        say(f"{where}: {old} is {KEY_ALIASES[old]}")
    return out


def read_toml(path, defaults: dict, say=print) -> dict:
    """A --config file: the same keys as `hyperparameters` (tables for optimizer_args / scheduler_args)."""
    text = read_text(path, "config file")  # a folder, a FIFO or non-UTF-8 bytes: one sentence naming the file
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    read = {}
    for k, v in cfg.items():
        key = canonical(k, say, dash="", defaults=defaults)
        v = current_value(key, v)  # model_type = "clip_mlp"
        if key in read and read[key] != v:  # lr = 1e-3 and learning_rate = 2e-3: which one is meant?
            raise ConfigError(f"config file {path} gives {key} twice, under two names, with different values "
                              f"({read[key]!r} and {v!r}); keep one")
        read[key] = v
    check_keys(read, f"config file {path}", defaults)
    return read


def parse_argv(argv: list[str], defaults: dict, presets: dict, say=print) -> tuple[str | None, str | None, dict]:
    """--preset NAME, --config FILE.toml and --KEY=VALUE (or --KEY VALUE) -> (preset, config file, overrides).
    A boolean key given bare means True (--augment_images), --no-KEY False; the seeds' names are aliases."""
    overrides, preset, config_file = {}, None, None
    args = list(argv)
    while args:
        a = args.pop(0)
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}; use --KEY=VALUE, --preset NAME or --config FILE.toml")
        key, eq, val = a[2:].partition("=")
        if key in MODE_FLAGS and not eq:
            say(f"--{key}: train.py always trains (the flag is not needed)")
            continue
        negated = not eq and key[:3] in ("no-", "no_") and _is_bool(KEY_ALIASES.get(key[3:], key[3:]), defaults)
        key = canonical(key[3:] if negated else key, say, defaults=defaults)
        if key not in ("preset", "config"):
            check_keys({key: None}, "the command line", defaults)  # an unknown bare flag: unknown, not "needs a value"
        if negated:
            val = "false"
        elif not eq and _is_bool(key, defaults) and not (args and args[0].lower() in ("true", "false")):
            val = "true"  # a bare switch
        elif not eq:
            if not args:
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
            val = args.pop(0)
        if key == "preset":
            if val not in presets:
                raise ConfigError(f"unknown preset {val!r}; presets: {', '.join(presets)}")
            preset = val
        elif key == "config":
            config_file = val
        else:
            value = current_value(key, _check_type(key, _parse_value(val), defaults))  # --model_type=clip_mlp
            if key in overrides and overrides[key] != value:  # --lr 1e-3 ... --learning_rate 2e-3
                say(f"{key} given twice ({overrides[key]!r}, then {value!r}): the last one, {value!r}, is used")
            overrides[key] = value
    return preset, config_file, overrides


def _is_bool(key: str, defaults: dict) -> bool:
    return isinstance(defaults.get(key), bool)


def resolve_hparams(argv: list[str], defaults: dict, presets: dict, say=None) -> dict:
    """defaults <- --preset NAME <- --config FILE.toml <- --KEY=VALUE (in that order of precedence), read as
    meant (implied.py: what a data path, an alias or a seed's TOML implies is said once through `say`)."""
    say = say or Notes()
    defaults = current_keys(defaults, "train.py's hyperparameters", say)  # a dict edited with an old key name
    for table in (NONE_DEFAULT_TYPES, CHOICES, RANGES):  # catches typos after editing a table here
        check_keys(table, "config.py's tables", defaults)
    preset, config_file, overrides = parse_argv(argv, defaults, presets, say)
    chosen = current_keys(presets[preset], f"preset {preset}", say) if preset else {}
    edited = {k: defaults[k] for k in PATH_KEYS if defaults.get(k) is not None and k not in chosen}  # dict edits
    given = {**edited, **(read_toml(config_file, defaults, say) if config_file else {}), **overrides}  # the user's
    hp = {**defaults, **chosen, **given}
    return validate_hparams(hp, defaults, given, say, set(overrides))


def resolve_resume(argv: list[str], defaults: dict, presets: dict) -> tuple[dict, Path]:
    """[the run's own command] --resume [PATH] -> (the run's hyperparameters with the safe changes, its
    metadata path). --preset / --config / --KEY=VALUE may repeat the interrupted command: values that agree
    with the saved run are fine, safe changes are applied, the others are refused by name."""
    path, rest, args = None, [], list(argv)
    while args:
        a = args.pop(0)
        if a == "--resume":
            if args and not args[0].startswith("--"):
                path = args.pop(0)
        elif a.startswith("--resume="):
            path = a.partition("=")[2]
        else:
            rest.append(a)
    say = Notes()
    defaults = current_keys(defaults, "train.py's hyperparameters", say)
    preset, config_file, flags = parse_argv(rest, defaults, presets, say)
    toml = read_toml(config_file, defaults, say) if config_file else {}
    chosen = current_keys(presets[preset], f"preset {preset}", say) if preset else {}
    given = as_meant({**chosen, **toml, **flags}, {**toml, **flags}, set(flags),
                     defaults, say)
    meta_path = resume_target(path, given.get("output_dir", defaults["output_dir"]), given.get("training_name"))
    saved = read_metadata(meta_path)["hyperparameters"]
    load_state(state_path_for(meta_path))  # a damaged or code-carrying training state is refused before any loading
    given.pop("output_dir", None)  # the run continues where it saved
    hp = merge_resume_hparams(saved, given, defaults)
    hp["output_dir"] = str(meta_path.parent)
    return validate_hparams(hp, defaults), meta_path


def as_meant(given: dict, users: dict, flags: set, defaults: dict, say) -> dict:
    """--resume's given keys (a preset's, the TOML's, the flags') read as a new run reads them (implied.py), so
    that repeating the run's own command agrees with what it saved: the given keys, and every key a reading changed."""
    base = {k: _check_type(k, v, defaults) for k, v in {**defaults, **given}.items()}
    meant = read_as_meant(base, users, say, SCHEDULERS, flags)
    return {k: v for k, v in meant.items() if k in given or not same(v, base[k])}


def _in_range(value, interval: str | tuple) -> bool:
    """(Python compares a 400-digit int with a float exactly: no overflow here.)"""
    if isinstance(interval, tuple):
        return interval[0] <= value <= interval[1]
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return ((lo < value) if interval[0] == "(" else (lo <= value)) and \
        ((value < hi) if interval[-1] == ")" else (value <= hi))


def describe_range(interval: str | tuple) -> str:
    """"[1, inf)" -> ">= 1"; "(0, 1]" -> "in (0, 1]"; (1, 256) -> "in [1, 256]"."""
    if isinstance(interval, tuple):
        return f"in [{interval[0]}, {interval[1]}]"
    lo, hi = interval[1:-1].split(", ")
    return f"{'>' if interval[0] == '(' else '>='} {lo}" if hi == "inf" else f"in {interval}"


def validate_hparams(hp: dict, defaults: dict, given: dict | None = None, say=print, flags=frozenset()) -> dict:
    """Types, then what the user's keys (`given`) imply (implied.py), then choices and ranges of every
    hyperparameter, then what torch must accept (device, optimizer and scheduler arguments): all before
    any data or model loads. flags: the keys given on the command line (they win over a TOML file's table)."""
    hp = {k: _check_type(k, v, defaults) for k, v in hp.items()}
    hp["model_type"] = current_value("model_type", hp["model_type"])
    if given is not None:
        hp = read_as_meant(hp, given, say, SCHEDULERS, flags)
    for k, allowed in CHOICES.items():
        if hp[k] not in allowed:
            folder = " or an existing folder of your images" if k == "dataset" else ""
            raise ConfigError(f"hyperparameter {k!r} must be one of {', '.join(map(repr, allowed))}{folder}; "
                              f"got {hp[k]!r}")
    for k, interval in RANGES.items():
        v = hp[k]
        if v is not None and ((isinstance(v, float) and not math.isfinite(v)) or not _in_range(v, interval)
                              or abs(v) > 2**53):
            shown = repr(v) if len(repr(v)) < 40 else f"a {len(repr(v))}-digit number"
            raise ConfigError(f"hyperparameter {k!r} must be {describe_range(interval)} (and below 2**53); got {shown}")
    if hp["split_ratio"] < 0.5:  # the seeds' --split_ratio is the held-out share: 0.1 there is 0.9 here
        raise ConfigError(f"split_ratio={hp['split_ratio']} would train on {hp['split_ratio']:.0%} of the images: "
                          "it is the training share (0.9 = 90 % train, 10 % test). For a held-out share of "
                          f"{hp['split_ratio']:g} give split_ratio={1 - hp['split_ratio']:g}")
    if hp["warmup_steps"] and hp["lr_scheduler"] in ("CyclicLR", "OneCycleLR") and hp["learning_rate_scheduler_enabled"]:
        raise ConfigError(f"{hp['lr_scheduler']} ramps the learning rate up by itself; set warmup_steps=0")
    if hp["target_modules"] is not None and (not hp["target_modules"] or
                                             not all(isinstance(m, str) and m for m in hp["target_modules"])):
        raise ConfigError(f"target_modules must be a non-empty list of layer names; got {hp['target_modules']!r}")
    if hp["training_name"] is not None:
        plain_name(hp["training_name"], "training_name", ConfigError)  # it becomes part of file names
    for k in ("optimizer_args", "scheduler_args"):
        if not all(isinstance(a, str) for a in hp[k]):
            raise ConfigError(f"{k} keys must be argument names (strings); got {hp[k]!r}")
    # torch takes these without a word, and a negative eta_min / base_lr / gamma makes the learning rate
    # negative: the run would climb the loss. No scheduler argument here means anything below 0.
    negative = {k: v for k, v in hp["scheduler_args"].items() if k != "last_epoch" and _has_negative(v)}
    if negative:
        raise ConfigError(f"scheduler_args {negative!r}: below 0, which would make the learning rate (or the "
                          "schedule's length) negative; give values >= 0")
    try:  # combinations the model config refuses (a resampler on pooled features, ...)
        model_config_from_hparams(hp)
    except ValueError as e:
        raise ConfigError(f"model hyperparameters: {e}") from None
    pick_device(hp["device"])
    check_optimizer_args(hp)
    return hp


def _has_negative(value) -> bool:
    """A number below 0, or a list holding one (CyclicLR's base_lr may be one value per parameter group)."""
    if isinstance(value, (list, tuple)):
        return any(map(_has_negative, value))
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0


def check_optimizer_args(hp: dict) -> None:
    """Build the optimizer and scheduler once on a dummy parameter: optimizer_args / scheduler_args that
    torch (or Prodigy) would refuse are refused now, by name, not after the models have loaded."""
    param = torch.nn.Parameter(torch.zeros(1))
    try:
        opt = make_optimizer([param], hp)
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise ConfigError(f"optimizer_args {hp['optimizer_args']!r} for {hp['optimizer']}: {e}") from None
    try:
        sched = make_scheduler(opt, hp, steps_per_epoch=1)
    except ConfigError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as e:
        raise ConfigError(f"scheduler_args {hp['scheduler_args']!r} for {hp['lr_scheduler']}: {e}") from None
    try:  # one step of each: some values (a one-element betas, a step_size of 0) only fail when used
        param.grad = torch.zeros(1)
        opt.step()
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise ConfigError(f"optimizer_args {hp['optimizer_args']!r} for {hp['optimizer']}: {e}") from None
    try:
        if sched is not None:
            sched.step()
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as e:
        raise ConfigError(f"scheduler_args {hp['scheduler_args']!r} for {hp['lr_scheduler']}: {e}") from None


def check_output_dir(path) -> Path:
    """output_dir must be a folder capkit can create and write to: said now, not at the first save."""
    if not str(path).strip():
        raise ConfigError("output_dir is empty; name a folder (e.g. saved_models)")
    out = Path(path)
    try:
        is_file = out.exists() and not out.is_dir()
    except OSError as e:  # a name too long for the file system
        raise ConfigError(f"output_dir {out} can't be used: {e.strerror or e}") from None
    if is_file:
        raise ConfigError(f"output_dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir {out} can't be created: {e.strerror or e}") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir {out} is not writable: {e.strerror or e}") from None
    return out


# the model-config fields whose hyperparameter has another name; every other field is filled from the hyperparameter
# of its own name (the fields the loaded backbones fill in, encoder_embed_dim etc., have none)
def model_config_from_hparams(hp: dict) -> CaptionerConfig:
    """The model config a run's hyperparameters describe (old key names read as today's: names.py)."""
    hp = current_keys(hp, "the hyperparameters", lambda _: None)
    keys = {f.name: HPARAM_OF_FIELD.get(f.name, f.name) for f in fields(CaptionerConfig)}
    return CaptionerConfig(**{name: hp[key] for name, key in keys.items() if key in hp})


def make_optimizer(params, hp: dict):
    if hp["optimizer"] == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer='Prodigy' needs the prodigyopt package: pip install prodigyopt") from None
        return Prodigy(params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"], **hp["optimizer_args"])
    return torch.optim.AdamW(params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"], **hp["optimizer_args"])


def make_scheduler(opt, hp: dict, steps_per_epoch: int):
    """Stepped once per optimizer step. Defaults follow the run's length; scheduler_args override
    them. StepLR: x learning_rate_decay every learning_rate_decay_step epochs."""
    S = torch.optim.lr_scheduler
    if not hp["learning_rate_scheduler_enabled"] or hp["lr_scheduler"] is None:
        main = None
    else:
        total = max(1, steps_per_epoch * hp["num_epochs"] - hp["warmup_steps"])
        lr = hp["learning_rate"]
        defaults = {
            "StepLR": {"step_size": max(1, hp["learning_rate_decay_step"] * steps_per_epoch),
                       "gamma": hp["learning_rate_decay"]},
            "CosineAnnealingLR": {"T_max": total},
            "CosineAnnealingWarmRestarts": {"T_0": max(1, steps_per_epoch)},
            "CyclicLR": {"base_lr": lr / 10, "max_lr": lr, "step_size_up": max(1, steps_per_epoch // 2),
                         "cycle_momentum": False},
            "OneCycleLR": {"max_lr": lr, "total_steps": total, "cycle_momentum": False},
        }[hp["lr_scheduler"]]
        try:
            main = getattr(S, hp["lr_scheduler"])(opt, **{**defaults, **hp["scheduler_args"]})
        except TypeError as e:
            raise ConfigError(f"scheduler_args for {hp['lr_scheduler']}: {e}") from None
    if not hp["warmup_steps"]:
        return main
    warm = S.LinearLR(opt, start_factor=1.0 / (hp["warmup_steps"] + 1), total_iters=hp["warmup_steps"])
    return warm if main is None else S.SequentialLR(opt, [warm, main], milestones=[hp["warmup_steps"]])
