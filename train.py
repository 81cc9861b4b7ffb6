"""
Train capkit's captioner: only the MLP projector learns; CLIP and the decoder stay frozen.

    python train.py                                  # Flickr30K + ViT-B-32 + Qwen3-0.6B-Base (use a GPU)
    python train.py --preset demo                    # offline demo: synthetic shapes, tiny backbones, CPU
    python train.py --batch_size=16 --num_epochs=5   # any key of `hyperparameters` below
    python train.py --dataset=folder --data_dir=my_photos/ --training_size_limit=None
    accelerate launch --multi_gpu --num_processes 4 train.py --batch_size=64    # several GPUs (DDP)

Edit `hyperparameters` here, or override keys on the command line (--KEY=VALUE; values are Python
literals, anything else is a string). Unknown keys and wrong types are refused. After each epoch:
saved_models/model_state_dict_<run>-<epoch>.pth (the MLP + the model config) and
saved_models/training_metadata_<run>-<epoch>.json (everything about the run).
"""
from __future__ import annotations

import ast
import difflib
import json
import os
import platform
import random
import sys
import time
from datetime import datetime
from pathlib import Path

hyperparameters = {
    # --- data ---
    "dataset": "flickr30k",          # "flickr30k" (Karpathy split) | "folder" (your images) | "shapes" (demo)
    "data_dir": None,                # flickr30k: folder with the csv + images (None: download); folder: all your data
    "train_dir": None,               # folder datasets: separate train / val / test folders instead of data_dir
    "val_dir": None,                 #   None: val_ratio of the training images are held out for validation
    "test_dir": None,                #   None: split_ratio splits data_dir into train and test
    "captions_file": None,           # a captions CSV elsewhere than <folder>/captions.csv
    "split_ratio": 0.9,              # folder datasets: fraction of images for training (rest: test)
    "val_ratio": 0.05,               # folder datasets without val_dir: fraction of training images for validation
    "training_size_limit": 500,      # max (image, caption) training pairs; None = the full dataset
    # --- model (see model.CaptionerConfig) ---
    "clip_model_name": "ViT-B-32",   # open_clip name, "hf-hub:org/repo", or a local open_clip folder
    "clip_pretrained": "openai",     # open_clip pretrained tag or local weights file (None for local folders)
    "image_size": None,              # CLIP input size; None = the encoder's own (224 for ViT-B-32; don't change)
    "lm_name": "Qwen/Qwen3-0.6B-Base",        # decoder: hub id or local save_pretrained folder
    "tokenizer_name": "Qwen/Qwen3-0.6B-Base", # tokenizer: hub id or local folder (None = lm_name)
    "lm_dtype": "auto",              # decoder weights: auto (bf16 on CUDA, else fp32) | float32 | bfloat16 | float16
    "proj_type": "mlp",              # projector: "mlp" (Linear-GELU-Linear) or "linear"
    "proj_prefix_length": 10,        # prefix tokens the image becomes (each of the decoder's hidden size)
    "proj_hidden_dim": 2048,         # MLP hidden width
    "proj_dropout": 0.0,             # dropout inside the MLP
    # --- optimisation ---
    "batch_size": 8,                 # (image, caption) pairs per step (global, split across processes); raise it if memory allows
    "num_epochs": 1,                 # passes over the training pairs
    "learning_rate": 0.0001,         # AdamW learning rate of the MLP
    "weight_decay": 0.0,             # AdamW weight decay
    "learning_rate_decay": 0.9,      # StepLR factor ...
    "learning_rate_decay_step": 2,   # ... applied every this many epochs
    "learning_rate_scheduler_enabled": True,  # False: constant learning rate
    "max_grad_norm": 1.0,            # gradient-norm clipping (None: off)
    "max_caption_length": 128,       # max tokens per caption, EOS included (longer ones are truncated)
    "group_by_length": True,         # batches of similar caption length (less padding), random batch order
    "compile": False,                # torch.compile the training step (inductor; the first batches are slow while it compiles)
    "feature_cache_dir": "cache/features",  # frozen-CLIP features computed once, reused across epochs and runs (None: off)
    "seed": 42,                      # Python / NumPy / torch seeds and the data order
    # --- evaluation and output ---
    "evaluation_enabled": True,      # ROUGE-L on the validation split after each epoch (val loss is always computed)
    "test_evaluation_enabled": False,  # after training: ROUGE-L + loss on the held-out test split, stored in metadata
    "ablate_image": False,           # with test evaluation: also score with images shuffled across the set
    "eval_batch_size": 32,           # images per batch when generating
    "max_new_tokens": 40,            # generation length limit for evaluation
    "num_beams": 1,                  # 1 = greedy decoding for evaluation
    "output_dir": "saved_models",    # checkpoints, metadata and the skipped-input list go here
    "device": "auto",                # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    "num_workers": None,             # DataLoader workers; None = 4 on GPU, 0 on CPU
}

# keys that may be None: the type a value must have when it is not None
NONE_DEFAULT_TYPES = {"data_dir": str, "train_dir": str, "val_dir": str, "test_dir": str, "captions_file": str,
                      "training_size_limit": int, "clip_pretrained": str, "image_size": int, "tokenizer_name": str,
                      "num_workers": int, "max_grad_norm": float, "feature_cache_dir": str}

PRESETS = {
    # the offline demo: synthetic shapes, the committed tiny backbones, CPU in a few minutes
    "demo": {
        "dataset": "shapes", "data_dir": "data/shapes", "training_size_limit": None,
        "clip_model_name": "demo/clip-tiny", "clip_pretrained": None,
        "lm_name": "demo/qwen3-tiny", "tokenizer_name": "demo/qwen3-tiny", "lm_dtype": "float32",
        "proj_prefix_length": 8, "proj_hidden_dim": 512,
        "batch_size": 64, "num_epochs": 3, "learning_rate": 0.002, "weight_decay": 0.01,
        "learning_rate_decay": 0.5, "learning_rate_decay_step": 1,
        "max_caption_length": 32, "max_new_tokens": 24, "eval_batch_size": 128,
        "test_evaluation_enabled": True, "ablate_image": True, "device": "cpu",
    },
}

DEMO_TARGETS = {"test_rouge_l_min": 0.9, "ablation_drop_min": 0.2}


class ConfigError(ValueError):
    pass


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


def _check_type(key, value):
    default = hyperparameters[key]
    want = NONE_DEFAULT_TYPES.get(key) if default is None else type(default)
    if value is None:
        if default is None or key in NONE_DEFAULT_TYPES:
            return value
        raise ConfigError(f"hyperparameter {key!r} can't be None (default {default!r})")
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
        raise ConfigError(f"hyperparameter {key!r} must be {want.__name__}, got {value!r} ({type(value).__name__})")
    return value


def check_keys(d: dict, where: str):
    unknown = [k for k in d if k not in hyperparameters]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, hyperparameters, 1)) else repr(k)
                 for k in unknown]
        raise ConfigError(f"unknown hyperparameter {', '.join(hints)} in {where}.\n"
                          f"Valid keys: {', '.join(sorted(hyperparameters))}")


def resolve_hparams(argv: list[str]) -> dict:
    """Defaults <- --preset NAME <- --KEY=VALUE (in that order of precedence)."""
    check_keys(hyperparameters, "the hyperparameters dict")  # catches typos after editing NONE_DEFAULT_TYPES etc.
    hp = dict(hyperparameters)
    overrides, preset = {}, None
    args = list(argv)
    while args:
        a = args.pop(0)
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}; use --KEY=VALUE or --preset NAME")
        key, eq, val = a[2:].partition("=")
        if not eq:
            if not args:
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
            val = args.pop(0)
        if key == "preset":
            if val not in PRESETS:
                raise ConfigError(f"unknown preset {val!r}; presets: {', '.join(PRESETS)}")
            preset = val
        else:
            check_keys({key: None}, "the command line")
            overrides[key] = _parse_value(val)
    if preset:
        hp.update(PRESETS[preset])
    hp.update(overrides)
    return {k: _check_type(k, v) for k, v in hp.items()}


def model_config_from_hparams(hp: dict):
    from model import CaptionerConfig
    return CaptionerConfig(
        clip_model_name=hp["clip_model_name"], clip_pretrained=hp["clip_pretrained"], clip_image_size=hp["image_size"],
        proj_type=hp["proj_type"], proj_prefix_length=hp["proj_prefix_length"], proj_hidden_dim=hp["proj_hidden_dim"],
        proj_dropout=hp["proj_dropout"], lm_name=hp["lm_name"], lm_tokenizer_name=hp["tokenizer_name"],
        lm_dtype=hp["lm_dtype"])


def pick_device(name: str):
    import torch
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def library_versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "open_clip_torch", "transformers", "tokenizers", "rouge_score"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def keep_images(data, pairs, keep):
    """Restrict a CaptionSet to the images at indices `keep` and renumber the (image, caption) pairs
    (pairs of dropped images go)."""
    remap = {old: new for new, old in enumerate(keep)}
    return data.subset(keep), [(remap[i], c) for i, c in pairs if i in remap]


def train(hp: dict) -> dict:
    import numpy as np
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from dataset import Collate, LengthGroupedBatches, PairDataset, SkipLog, load_splits
    from eval import evaluate
    from features import image_features
    from model import ClipCaptioner, HubUnavailableError, atomic_write_json

    random.seed(hp["seed"]); np.random.seed(hp["seed"]); torch.manual_seed(hp["seed"])
    # under `accelerate launch` (DDP) each process takes its share of every global batch of
    # batch_size pairs (split_batches), so the run sees the same batches as a single process would
    acc = Accelerator(cpu=hp["device"] == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True))
    main = acc.is_main_process
    log = print if main else (lambda *a, **k: None)
    if hp["batch_size"] % acc.num_processes:
        raise ValueError(f"batch_size {hp['batch_size']} must be divisible by the {acc.num_processes} processes")
    device = acc.device if acc.num_processes > 1 else pick_device(hp["device"])
    run_id = datetime.now().strftime("%Y%m%d_%H%M%S")
    out_dir = Path(hp["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"device: {device}" + (f" x {acc.num_processes} processes" if acc.num_processes > 1 else ""))

    # data first (a wrong path fails before a big model loads); hub problems are reported together
    skips, problems = SkipLog(), []
    try:
        splits = load_splits(hp, skips)
    except HubUnavailableError as e:
        problems.append(str(e))
    try:
        model = ClipCaptioner.from_config(model_config_from_hparams(hp)).to(device)
    except HubUnavailableError as e:
        problems.append(str(e))
    if problems:
        raise HubUnavailableError("\n".join(problems))
    train_set = splits["train"]
    pairs = train_set.pairs()
    if hp["training_size_limit"] is not None and len(pairs) > hp["training_size_limit"]:
        pairs = random.Random(hp["seed"]).sample(pairs, hp["training_size_limit"])
        train_set, pairs = keep_images(train_set, pairs, sorted({i for i, _ in pairs}))  # only these need features
    feats = None
    if hp["feature_cache_dir"] is not None:  # CLIP runs once per image, never inside the epoch loop
        feats, ok = image_features(model, train_set.images, hp["feature_cache_dir"], hp["eval_batch_size"], 0, skips,
                                   acc=acc)  # under accelerate: each process encodes a share, the main one writes
        feats = feats.to(device)
        train_set, pairs = keep_images(train_set, pairs, ok)
    n_params = sum(p.numel() for p in model.projector.parameters())
    log(f"data: {len(pairs)} training pairs from {train_set.num_images} images; "
        f"val {splits['val'].num_images} images; test {splits['test'].num_images} images; {skips.summary()}")
    log(f"model: {model.config.clip_model_name} ({model.config.clip_embed_dim}-d) -> MLP ({n_params:,} trainable) "
        f"-> {model.config.proj_prefix_length} x {model.config.lm_hidden_size} prefix -> {model.config.lm_name}")

    workers = hp["num_workers"] if hp["num_workers"] is not None else (4 if device.type == "cuda" else 0)
    g = torch.Generator().manual_seed(hp["seed"])
    transform = None if feats is not None else model.preprocess
    if hp["group_by_length"]:
        lengths = [len(x) for x in model.tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]]
        batching = {"batch_sampler": LengthGroupedBatches(lengths, hp["batch_size"], g)}
    else:
        batching = {"batch_size": hp["batch_size"], "shuffle": True, "generator": g}
    loader = DataLoader(PairDataset(train_set, transform, pairs), **batching, num_workers=workers,
                        pin_memory=device.type == "cuda", collate_fn=Collate(model.tokenizer, hp["max_caption_length"]))
    opt = torch.optim.AdamW(model.projector.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    sched = (torch.optim.lr_scheduler.StepLR(opt, hp["learning_rate_decay_step"], hp["learning_rate_decay"])
             if hp["learning_rate_scheduler_enabled"] else None)
    eval_kw = dict(batch_size=hp["eval_batch_size"], max_caption_length=hp["max_caption_length"],
                   gen_kwargs={"max_new_tokens": hp["max_new_tokens"], "num_beams": hp["num_beams"]},
                   num_workers=workers, cache_dir=hp["feature_cache_dir"])
    step_model, opt, loader = acc.prepare(model, opt, loader)  # DDP-wrapped on several processes
    if hp["compile"]:  # here, not through accelerate's dynamo plugin: that one is process-wide state and
        # would stick to the first run in a notebook; dynamic shapes because each batch has its own length
        step_model = torch.compile(step_model, dynamic=True)
    step_log = out_dir / f"train_log_{run_id}.jsonl"
    history, meta, meta_path, step = [], {}, None, 0
    for epoch in range(1, hp["num_epochs"] + 1):
        model.train()
        total, count, t0 = 0.0, 0, time.time()
        bar = tqdm(loader, desc=f"Training Epoch {epoch}/{hp['num_epochs']}", dynamic_ncols=True, disable=not main)
        for batch in bar:
            for path, reason in batch["skipped"]:
                skips.add(path, reason)
            usable = "input_ids" in batch
            if acc.num_processes > 1 and feats is None:  # images load per step here: a share can come up empty,
                # and a DDP step needs every process, so all skip it together
                usable = bool(acc.gather(torch.tensor([usable], device=device)).all())
            if not usable:
                continue
            if feats is not None:
                image_inputs = {"image_embeds": feats[batch["image_idx"]]}                    # (B, E)
            else:
                image_inputs = {"pixel_values": batch["pixel_values"].to(device, non_blocking=True)}
            _, loss = step_model(batch["input_ids"], batch["attention_mask"], **image_inputs)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            if hp["max_grad_norm"]:
                acc.clip_grad_norm_(model.projector.parameters(), hp["max_grad_norm"])
            opt.step()
            loss_value = acc.reduce(loss.detach(), "mean").item()  # the global batch's loss
            total, count, step = total + loss_value, count + 1, step + 1
            bar.set_postfix({"Loss": f"{loss_value:.4f}", "Avg Loss": f"{total / count:.4f}"})
            if main:
                with open(step_log, "a") as f:
                    f.write(json.dumps({"step": step, "epoch": epoch, "loss": loss_value,
                                        "lr": opt.param_groups[0]["lr"]}) + "\n")
        if sched:
            sched.step()
        train_loss = total / max(count, 1)
        # every process evaluates its share of the images; only the main process saves and prints
        val = evaluate(model, splits["val"], skips=skips, generate=hp["evaluation_enabled"], acc=acc, **eval_kw)
        if not main:
            continue
        stem = f"{run_id}-{epoch}"
        ckpt_path = out_dir / f"model_state_dict_{stem}.pth"
        meta_path = out_dir / f"training_metadata_{stem}.json"
        model.save_checkpoint(ckpt_path)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "rouge_l": val.get("rouge_l"),
                        "seconds": round(time.time() - t0, 1)})
        meta = {"checkpoint": ckpt_path.name, "run_id": run_id, "epoch": epoch, "train_loss": train_loss,
                "val_loss": val["loss"], "rouge_l": val.get("rouge_l"), "history": history,
                "hyperparameters": hp, "model_config": model.config.__dict__, "trainable_parameters": n_params,
                "skipped_inputs": dict(skips.counts), "library_versions": library_versions(),
                "device": str(device), "saved_at": datetime.now().isoformat(timespec="seconds")}
        atomic_write_json(meta, meta_path)  # written after the .pth: a metadata file means a complete checkpoint
        if skips.items:
            skips.write(out_dir / f"skipped_inputs_{run_id}.tsv")
        print("✅ Model saved successfully!")
        print(f"📁 Model state dict: {ckpt_path}")
        print(f"📁 Metadata: {meta_path}")
        print(f"📊 Training loss: {train_loss:.4f}")
        print(f"📈 Validation loss: {val['loss']:.4f}")
        if val.get("rouge_l") is not None:
            print(f"🎯 ROUGE-L score: {val['rouge_l']:.4f}")
    if hp["test_evaluation_enabled"]:
        test = evaluate(model, splits["test"], skips=skips, ablate_image=hp["ablate_image"], seed=hp["seed"], acc=acc,
                        **eval_kw)
    if not main:
        return {}
    if hp["test_evaluation_enabled"]:
        meta["test"] = {k: v for k, v in test.items() if k != "predictions"}
        print(f"🧪 Held-out test ({splits['test'].num_images} images): ROUGE-L {test['rouge_l']:.4f}, loss {test['loss']:.4f}")
        if "ablated" in test:
            print(f"🔀 Images shuffled across the set: ROUGE-L {test['ablated']['rouge_l']:.4f}, "
                  f"loss {test['ablated']['loss']:.4f} (drop {test['rouge_l'] - test['ablated']['rouge_l']:.4f})")
        if hp["dataset"] == "shapes":
            meta["demo_targets"] = {**DEMO_TARGETS, "met": test["rouge_l"] >= DEMO_TARGETS["test_rouge_l_min"] and (
                "ablated" in test and test["rouge_l"] - test["ablated"]["rouge_l"] >= DEMO_TARGETS["ablation_drop_min"])}
            print(f"demo targets (ROUGE-L >= {DEMO_TARGETS['test_rouge_l_min']}, shuffle drop >= "
                  f"{DEMO_TARGETS['ablation_drop_min']}): {'met' if meta['demo_targets']['met'] else 'NOT met'}")
        meta["skipped_inputs"] = dict(skips.counts)
        atomic_write_json(meta, meta_path)
    if skips.items:
        print(f"{skips.summary()}; list: {out_dir / f'skipped_inputs_{run_id}.tsv'}")
    return meta


def main(argv=None) -> int:
    try:
        hp = resolve_hparams(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from model import HubUnavailableError
    try:
        train(hp)
    except HubUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:  # bad paths / bad data files: say what, not where in the code
        if os.environ.get("CAPKIT_DEBUG"):
            raise
        print(f"error: {e}\n(set CAPKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
