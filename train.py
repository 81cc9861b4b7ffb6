"""
Train capkit's captioner: only the mapper learns; the image encoder and the decoder stay frozen.

    python train.py                                  # Flickr30K + ViT-B-32 + Qwen3-0.6B-Base (use a GPU)
    python train.py --preset demo                    # offline demo: synthetic shapes, tiny backbones, CPU
    python train.py --batch_size=16 --num_epochs=5   # any key of `hyperparameters` below
    python train.py --help                           # every key below with its default and comment
    python train.py --train_dir=photos/ --test_dir=heldout/ --training_size_limit=None  # your folders (dataset="folder")
    accelerate launch --multi_gpu --num_processes 4 train.py --batch_size=64    # several GPUs (DDP)
    python train.py --model_type=git --quantization_bits=4 --dataset=folder --data_dir=my_photos/   # QLoRA GIT
    python train.py --preset git_demo                # offline: 4-bit QLoRA on a tiny GIT, CPU, minutes
    python train.py --preset scenes_resampler        # offline: two-shape scenes, patch tokens + a resampler (also
                                                     #   scenes_transformer, scenes_mlp: docs/models.md "Which mapper")
    python train.py --preset smollm2_demo            # a real frozen decoder (after: python -m tools.demo_assets --real-decoder)
    python train.py --config my_run.toml             # the same keys in a TOML file ([optimizer_args] etc. as tables)
    python train.py --resume                         # continue the newest resumable checkpoint exactly (or --resume PATH)
    python train.py --merge_weights --checkpoint saved_models/adapter_<run>-<epoch> [--merged_dir DIR] [--wise_alpha 0.5]

Edit `hyperparameters` here, or override keys on the command line (--KEY=VALUE; values are Python
literals, anything else is a string; a boolean given bare is True, --no-KEY False; the seed projects'
names such as --lr and --epochs are read as their keys, said once). Unknown keys and wrong types are refused. After each epoch:
saved_models/model_state_dict_<run>-<epoch>.pth (the mapper + the model config) and
saved_models/training_metadata_<run>-<epoch>.json (everything about the run).

Reading order: `hyperparameters` and PRESETS (what you edit), then train(): its stages in the order
they run, each taking what the ones before made. One optimizer step is train_epoch -> micro_step
(model.py's forward) -> optimizer_step -> record_step; save_checkpoint writes resume.LoopState.
How the hyperparameters are parsed and checked is config.py's job; file names are checkpoints.py's.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader
from tqdm import tqdm

from capkit.checkpoints import (
    checkpoint_name,
    datastore_name,
    metadata_name,
    read_checkpoint,
    read_metadata,
    skip_list_name,
    state_name,
    step_log_name,
)
from capkit.data.batching import CaptionDraw, LengthGroupedBatches
from capkit.data.features import encoder_fingerprint, image_features
from capkit.data.folders import CaptionSet
from capkit.data.images import SkipLog
from capkit.data.shard_features import count_pairs, extract_shard_features
from capkit.data.streams import DecodePair, ShardStream, embeds_pair
from capkit.errors import ConfigError, DataError, NonFiniteError, SaveError, run_cli
from capkit.evaluation.bootstrap import with_interval
from capkit.evaluation.evaluator import evaluate, knn_line, spread_line
from capkit.evaluation.metrics import CIDER_NOTE, ROUGE_L_NOTE, CiderD, caption_metrics, print_metrics
from capkit.files import atomic_torch_save, atomic_write, atomic_write_json
from capkit.hub import load_all
from capkit.models.captioner import SHAPING_FIELDS, Generation
from capkit.models.hf_captioner import merge_adapter
from capkit.models.retrieval import Datastore
from capkit.runtime import compile_step, library_versions, pick_device
from capkit.training import config
from capkit.training.config import check_output_dir, make_optimizer, make_scheduler, model_config_from_hparams
from capkit.training.resume import (
    LoopState,
    StopSignals,
    prune_checkpoints,
    restore_rng,
    restore_training_state,
    state_path_for,
    training_state,
)
from capkit.training.scst import scst_loss
from capkit.training.usage import help_text
from dataset import (
    PairDataset,
    ShardSource,
    caption_augment,
    image_transform,
    load_splits,
    loader_workers,
    training_loader,
)
from model import build_model, merge_decoder_lora

hyperparameters = {
    # --- data ---
    "dataset": "flickr30k",          # "flickr30k" (Karpathy split) | "folder" (your images; a folder's path works too) |
                                     #   "karpathy" (a Karpathy dataset_*.json: captions_file; its images: data_dir) |
                                     #   "hf" (🤗 datasets) | "webdataset" (tar shards) | "shapes" | "shapes_b" | "scenes" (demos)
    "data_dir": None,                # flickr30k: folder with the csv + images (None: download); folder: all your data
    "train_dir": None,               # folder datasets: separate train / val / test folders instead of data_dir
    "val_dir": None,                 #   None: val_ratio of the training images are held out for validation
    "test_dir": None,                #   None: split_ratio splits data_dir into train and test
    "captions_file": None,           # a captions CSV elsewhere than <folder>/captions.csv; karpathy: the dataset_*.json
    "karpathy_restval": True,        # karpathy: its "restval" images (COCO's) join train, as is customary
    "split_ratio": 0.9,              # folder datasets: the share of images for TRAINING (rest: test); >= 0.5
    "val_ratio": 0.05,               # folder datasets without val_dir: fraction of training images for validation
    "training_size_limit": 500,      # max (image, caption) training pairs; None = the full dataset
    "captions_per_image": None,      # per epoch, a fresh draw of this many of each image's captions (None: all)
    # hf / webdataset: data kept in shards, streamed (README "Your own data"; webdataset: data_dir / train_dir / ...
    #   take tar shard patterns, "shards/{00000..00099}.tar", several joined by "::")
    "hf_dataset": None,              # dataset="hf": a hub id or a local folder (parquet files, save_to_disk, imagefolder)
    "hf_splits": {"train": "train", "val": "validation", "test": "test"},  # dataset="hf": the split names; a missing
                                     #   val / test split is carved out of train (val_ratio / split_ratio; streamed: whole files)
    "image_column": None,            # dataset="hf": the image column (None: the first of image, jpg, png, file_name, ...)
    "caption_column": None,          # dataset="hf": the caption column, or a list of them (None: caption, text, ...)
    "streaming": False,              # dataset="hf": read the training split as it downloads (no full copy first)
    "shuffle_buffer": 1000,          # hf / webdataset: (image, caption) pairs each reader shuffles among
    "data_cache_dir": "cache/data",  # hf / webdataset: the evaluation splits, written once as image files
    # --- model (see model.CaptionerConfig) ---
    "model_type": "prefix",          # "prefix" (frozen encoder -> mapper -> prefix of a frozen LM) | "git" | "blip" (adapters)
    "encoder_type": "open_clip",     # image encoder library: "open_clip" | "timm" | "hf" (transformers vision models)
    "encoder_name": "ViT-B-32",      # the encoder: open_clip name / "hf-hub:org/repo" / local folder; a timm name or
                                     #   folder; a transformers hub id or folder (CLIPVisionModel, SiglipVisionModel, ...)
    "encoder_pretrained": "openai",  # open_clip pretrained tag or local weights file; timm: a weights file (None for folders)
    "encoder_layer": -1,             # tokens from this block: -1 the final features, -2 the one before (as LLaVA)
    "image_size": None,              # encoder input size; None = the encoder's own (224 for ViT-B-32; don't change)
    "lm_name": "Qwen/Qwen3-0.6B-Base",        # decoder: hub id or local save_pretrained folder
    "tokenizer_name": None,          # tokenizer: hub id or local folder (None = lm_name)
    "lm_dtype": "auto",              # decoder weights: auto (bf16 on a bf16 GPU device, else fp32) | float32 | bfloat16 | float16
    "lm_lora_r": 0,                  # > 0: LoRA of this rank on the decoder's attention, trained with the mapper (its
                                     #   base weights stay frozen; lora_alpha, lora_dropout, target_modules apply)
    "encoder_features": "pooled",    # "pooled" (one embedding per image) | "tokens" (the ViT's patch tokens)
    "mapper_type": "mlp",            # mapper: "mlp" | "linear" (pooled) | "transformer" (either) | "resampler"
                                     #   (tokens); docs/models.md: "Which mapper"
    "mapper_prefix_length": 10,      # prefix tokens the image becomes (each of the decoder's hidden size)
    "mapper_hidden_dim": 2048,       # mlp: hidden width; transformer / resampler: feed-forward width
    "mapper_dropout": 0.0,           # dropout inside the mapper
    "mapper_num_layers": 8,          # transformer / resampler: blocks (ClipCap's mapper has 8)
    "mapper_num_heads": 8,           # transformer / resampler: attention heads (divide the decoder's hidden size)
    "retrieval_k": 0,                # > 0: the captions of the k nearest training images (by the frozen encoder's
                                     #   features) are a text prompt before the image prefix (SmallCap's idea); 0: off
    "retrieval_pool": 0,             # retrieval in training: the k are drawn among this many nearest, a random caption
                                     #   of each (0: the k nearest, first captions, as when evaluating)
    "retrieval_template": "capkit",  # the prompt's words: "capkit" (one line) | "smallcap" (SmallCap's template)
    # --- git / blip (model_type "git" | "blip"): the whole captioner fine-tuned through PEFT adapters ---
    "hf_model_name": None,           # None: microsoft/git-base | Salesforce/blip-image-captioning-base; or a local folder
    "quantization_bits": 4,          # 4 = QLoRA (nf4, double quantization, bf16 compute) | 8 | 16 (not quantized)
    "peft_module": "LoRA",           # "LoRA" | "IA3"
    "lora_r": 16,                    # LoRA rank
    "lora_alpha": 32,                # LoRA scaling (the update is multiplied by alpha / r)
    "lora_dropout": 0.05,            # dropout on the LoRA path
    "target_modules": None,          # layers that get adapters; None: the text side's query/key/value/dense
    "gradient_checkpointing": False, # recompute activations in the backward pass (less memory, ~30% slower)
    # --- fine-tuning on the metric (prefix model): self-critical sequence training, after cross-entropy ---
    "scst_from_epoch": None,         # epochs from this one on train on the CIDEr-D reward of sampled captions against
                                     #   the greedy caption (capkit/training/scst.py); None: cross-entropy throughout
    "scst_samples": 5,               # sampled captions per image per SCST step
    "scst_baseline": "greedy",       # a sample's reward is measured against: "greedy" (the model's greedy caption) |
                                     #   "mean" (the mean of the image's other samples; scst_samples >= 2)
    "init_from": None,               # a model_state_dict_*.pth whose trained weights start this run (same model
                                     #   config), e.g. SCST on a cross-entropy run: --init_from=... --scst_from_epoch=1
    # --- optimisation ---
    "batch_size": 8,                 # (image, caption) pairs per step (global, split across processes); raise it if memory allows
    "num_epochs": 1,                 # passes over the training pairs
    "learning_rate": 0.0001,         # peak learning rate (Prodigy: use 1.0, it adapts the step itself)
    "weight_decay": 0.0,             # decoupled weight decay
    "optimizer": "AdamW",            # "AdamW" | "Prodigy" (pip install prodigyopt)
    "optimizer_args": {},            # extra optimizer keyword arguments, e.g. {"betas": (0.9, 0.99)}
    "learning_rate_scheduler_enabled": True,  # False: constant learning rate (after warm-up)
    "lr_scheduler": "StepLR",        # StepLR | CosineAnnealingLR | CosineAnnealingWarmRestarts | CyclicLR | OneCycleLR
    "learning_rate_decay": 0.9,      # StepLR factor ...
    "learning_rate_decay_step": 2,   # ... applied every this many epochs
    "scheduler_args": {},            # keyword arguments that override the scheduler's defaults (see make_scheduler)
    "warmup_steps": 0,               # linear warm-up over this many optimizer steps (not with CyclicLR / OneCycleLR)
    "gradient_accumulation_steps": 1,  # micro-batches per optimizer step (effective batch = batch_size x this)
    "max_grad_norm": 1.0,            # gradient-norm clipping (None: off)
    "max_bad_steps": 10,             # NaN/inf losses or gradients in a row before the run stops (each such step is skipped)
    "max_caption_length": 128,       # max tokens per caption, EOS included (longer ones are truncated; so are any past the decoder)
    "group_by_length": True,         # batches of similar caption length (less padding), random batch order
    "shuffle_captions": False,       # shuffle a caption's comma-separated parts (tag-style captions) ...
    "frozen_parts": 0,               # ... keeping this many leading parts in place
    "caption_dropout": 0.0,          # probability of dropping each non-frozen part (at least one part stays)
    "augment_images": False,         # random resized crops + brightness/contrast jitter (no flips: captions say left/right);
                                     #   bypasses the feature cache
    "compile": False,                # torch.compile the training step (static shapes + CUDA graphs; each new batch shape
                                     #   compiles first, ~1 min on a GPU for Qwen3-0.6B: worth it for long runs)
    "feature_cache_dir": "cache/features",  # frozen-encoder features computed once, reused across epochs and runs (None: off)
    "seed": 42,                      # Python / NumPy / torch seeds and the data order
    # --- evaluation and output ---
    "evaluation_enabled": True,      # ROUGE-L on the validation split after each epoch (val loss is always computed)
    "test_evaluation_enabled": False,  # after training: ROUGE-L + loss on the held-out test split, stored in metadata
    "evaluate_before_training": False,  # also score the test split before training (the "before" figure)
    "ablate_image": False,           # with test evaluation: also score with images shuffled across the set
    "coco_metrics": False,           # with test evaluation: also the COCO toolkit's BLEU-1..4, METEOR, ROUGE_L, CIDEr
                                     #   (pycocoevalcap; Java for PTB tokens and METEOR), each with its 95 % interval
    "eval_batch_size": 32,           # images per batch when generating
    "max_new_tokens": Generation.max_new_tokens,  # generation length limit for evaluation (40)
    "num_beams": Generation.num_beams,            # 1 = greedy decoding for evaluation
    "min_new_tokens": Generation.min_new_tokens,  # evaluation: no end of text before this many tokens (0: none)
    "no_repeat_ngram_size": Generation.no_repeat_ngram_size,  # evaluation: no n-gram of this size twice (0: off)
    "repetition_penalty": Generation.repetition_penalty,  # evaluation: > 1 makes repeated tokens less likely
    "length_penalty": Generation.length_penalty,  # evaluation with beams: score / length ** this (> 1: longer)
    "output_dir": "saved_models",    # checkpoints, metadata and the skipped-input list go here
    "training_name": None,           # prefix of the run name in file names and logs (None: the timestamp alone)
    "save_every_n_epochs": 1,        # checkpoint every n epochs (the last epoch is always saved)
    "save_every_n_steps": None,      # also a (resumable) checkpoint every n optimizer steps inside epochs
    "keep_last_n": None,             # keep only this run's newest n checkpoints (None: keep all)
    "log_with": "tensorboard",       # "tensorboard" (<output_dir>/logs) | "wandb" (if installed) | None
    "device": "auto",                # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    "num_workers": None,             # DataLoader workers; None = 4 on GPU, 0 on CPU
}

PRESETS = {
    # the offline demo: synthetic shapes, the committed tiny backbones, CPU in a few minutes
    "demo": {
        "dataset": "shapes", "data_dir": "data/shapes", "training_size_limit": None,
        "encoder_name": "demo/clip-tiny", "encoder_pretrained": None,
        "lm_name": "demo/qwen3-tiny", "tokenizer_name": "demo/qwen3-tiny", "lm_dtype": "float32",
        "mapper_prefix_length": 8, "mapper_hidden_dim": 512,
        "batch_size": 64, "num_epochs": 3, "learning_rate": 0.002, "weight_decay": 0.01,
        "learning_rate_decay": 0.5, "learning_rate_decay_step": 1,
        "max_caption_length": 32, "max_new_tokens": 24, "eval_batch_size": 128,
        "test_evaluation_enabled": True, "ablate_image": True, "device": "cpu",
    },
    # the alternative path offline: 4-bit QLoRA adapters teach the tiny GIT (pretrained on style-A
    # captions) the style-B phrasing of the same kind of images; ROUGE-L against style B before / after
    "git_demo": {
        "dataset": "shapes_b", "data_dir": "data/shapes_b", "training_size_limit": None,
        "model_type": "git", "hf_model_name": "demo/git-tiny", "quantization_bits": 4, "peft_module": "LoRA",
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lm_dtype": "float32",
        "batch_size": 16, "num_epochs": 3, "learning_rate": 0.005, "lr_scheduler": "CosineAnnealingLR",
        "warmup_steps": 10, "max_caption_length": 32, "max_new_tokens": 24, "eval_batch_size": 64,
        "evaluate_before_training": True, "test_evaluation_enabled": True, "device": "cpu",
    },
}
PRESETS["blip_demo"] = {**PRESETS["git_demo"], "model_type": "blip", "hf_model_name": "demo/blip-tiny"}
# the harder demo: two shapes and a relation (shapes.py "scenes"), one preset per mapper, all with the
# same budget (docs/models.md "Which mapper": the measured table; tools/targets.py measures it)
# num_beams 3: greedy decoding commits to a phrasing at its first word ("a little ..." names the right-hand object
# first) and then keeps the relation of the other order; beams keep both orders open (docs/log.md)
_SCENES = {**PRESETS["demo"], "dataset": "scenes", "data_dir": "data/scenes", "encoder_name": "demo/clip-scenes",
           "lm_name": "demo/qwen3-scenes", "tokenizer_name": "demo/qwen3-scenes", "mapper_prefix_length": 8,
           "batch_size": 64, "num_epochs": 3, "learning_rate": 0.001, "lr_scheduler": "CosineAnnealingLR",
           "warmup_steps": 100, "max_caption_length": 40, "max_new_tokens": 32, "num_beams": 3}
PRESETS["scenes_mlp"] = {**_SCENES, "mapper_type": "mlp", "encoder_features": "pooled", "mapper_hidden_dim": 512}
PRESETS["scenes_transformer"] = {**_SCENES, "mapper_type": "transformer", "encoder_features": "tokens",
                                 "mapper_num_layers": 4, "mapper_num_heads": 4, "mapper_hidden_dim": 512}
PRESETS["scenes_resampler"] = {**PRESETS["scenes_transformer"], "mapper_type": "resampler"}
# a real pretrained decoder, frozen: SmolLM2-135M (python -m tools.demo_assets --real-decoder) on the one-shape demo.
# What it needs over `--preset demo --lm_name=...` (docs/log.md, 2026-11-24): many more, smaller steps
PRESETS["smollm2_demo"] = {**PRESETS["demo"], "lm_name": "demo/smollm2-135m", "tokenizer_name": "demo/smollm2-135m",
                           "training_size_limit": 9600, "batch_size": 16, "num_epochs": 1, "learning_rate": 0.001,
                           "lr_scheduler": "CosineAnnealingLR", "warmup_steps": 30, "eval_batch_size": 100}

# real photographs (README "Results"): ImageNet EfficientNet-Lite0 (python -m tools.demo_assets
# --real-encoder) -> MLP -> SmolLM2-135M (--real-decoder), both frozen: --train_dir=PHOTOS --test_dir=HELDOUT.
# 3 epochs, chosen on the validation split (val_ratio of the 612 Flickr8k training photos): the validation loss is
# lowest after epoch 2 of 3 and rises after; 6 epochs with mapper_dropout 0.2 and weight_decay 0.05 never got it lower.
# num_beams 3: validation CIDEr-D 0.407 against greedy's 0.368 (61 photos)
PRESETS["real_photos"] = {
    "dataset": "folder", "training_size_limit": None, "val_ratio": 0.1,
    "encoder_type": "timm", "encoder_name": "demo/efficientnet-lite0", "encoder_pretrained": None,
    "lm_name": "demo/smollm2-135m", "tokenizer_name": "demo/smollm2-135m", "lm_dtype": "float32",
    "mapper_type": "mlp", "encoder_features": "pooled", "mapper_prefix_length": 10, "mapper_hidden_dim": 2048,
    "batch_size": 16, "num_epochs": 3, "learning_rate": 0.001, "weight_decay": 0.01, "lr_scheduler": "CosineAnnealingLR",
    "warmup_steps": 50, "max_caption_length": 40, "max_new_tokens": 30, "eval_batch_size": 64, "num_beams": 3,
    "test_evaluation_enabled": True, "ablate_image": True,
}
# the Flickr8k benchmark (README "Results"): the official train split -> the dev split, on a CPU within 90 minutes:
#   python train.py --preset flickr8k --train_dir=../shared/flickr8k/train --test_dir=../shared/flickr8k/dev
# real_photos' backbones and mapper, with LoRA (rank 8) on the decoder's attention; each epoch a fresh draw of one of
# each photo's 5 captions (captions_per_image=1: every photo once per epoch at a fifth of the cost); the COCO toolkit's
# metrics with intervals at the end. The levers, measured on dev at 2 epochs (python -m tools.targets --only
# flickr8k; docs/log.md 2026-12-06): LoRA lowered the validation loss most (2.603 vs 2.749) at +26 % per step.
# 4 epochs: dev CIDEr-D 0.381 in 52 minutes start to scores; 6 epochs: 0.378 (validation CIDEr-D rose on, dev's not)
PRESETS["flickr8k"] = {**PRESETS["real_photos"], "val_ratio": 0.05, "captions_per_image": 1, "num_epochs": 4,
                       "lm_lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "coco_metrics": True}

DEMO_TARGETS = {"shapes": {"test_rouge_l_min": 0.9, "ablation_drop_min": 0.2},  # per demo dataset
                "shapes_b": {"test_rouge_l_min": 0.8}}


def resolve_hparams(argv: list[str]) -> dict:
    """The hyperparameters above <- --preset NAME <- --config FILE.toml <- --KEY=VALUE, checked (config.py)."""
    return config.resolve_hparams(argv, hyperparameters, PRESETS)


def resolve_resume(argv: list[str]) -> tuple[dict, Path]:
    """[the run's own command] --resume [PATH] -> (the run's hyperparameters, its checkpoint's metadata path)."""
    return config.resolve_resume(argv, hyperparameters, PRESETS)


# ----------------------------------------------------------------------------------------------
# one training run, as a table of contents: each stage below takes what the previous ones made

def train(hp: dict, resume_from=None) -> dict:
    """One training run -> the last checkpoint's metadata. resume_from: the metadata JSON of a resumable
    checkpoint of this run (see resume.py); the run then continues exactly where that checkpoint was saved."""
    run = start_run(hp, resume_from)                    # output folder, run id, seeds, accelerator, device
    splits, model = load_all(partial(load_splits, hp, run.skips),  # data first: a wrong path fails before a big
                             partial(build_model, model_config_from_hparams(hp), run.device))  # model loads
    model.generation(decoding(hp))                      # a max_new_tokens the decoder can't hold: said now
    if hp["init_from"] is not None and resume_from is None:  # another run's trained weights start this one
        start_from(run, model, hp["init_from"])
    data = build_training_data(run, splits["train"], model)   # the pairs, cached encoder features, the loader
    data.reward = scst_reward(run, data, model) if hp["scst_from_epoch"] is not None else None  # SCST's CIDEr-D
    store = build_datastore(run, model, data)           # the training captions retrieval reads and kNN copies
    describe_run(run, splits, data, model)
    optim = build_step(run, model, data)                # optimizer, scheduler, DDP / torch.compile
    before = evaluate_before(run, model, splits["test"], data) if hp["evaluate_before_training"] else None
    loop = resume_loop(run, resume_from, data, optim) if resume_from is not None else LoopState()
    with StopSignals(run.log) as stop:                  # SIGINT / SIGTERM: finish the step, save, exit 0
        for epoch in range(loop.first_epoch(len(data.loader)), hp["num_epochs"] + 1):
            if not train_epoch(run, model, data, optim, loop, epoch, stop):
                return interrupted(run, loop)           # (a resumable checkpoint was saved mid-epoch)
            stop_now = stop_agreed(run, stop)
            val, saved = end_epoch(run, model, splits["val"], data, optim, loop, stop_now)
            if stop_now and epoch < hp["num_epochs"]:
                return interrupted(run, loop)
            if saved:
                announce_checkpoint(run, loop, val)
    return finish(run, model, splits["test"], data, loop, before, store)


@dataclass
class Run:
    """What every stage of one run shares, set once by start_run."""
    hp: dict
    out_dir: Path
    run_id: str
    acc: Accelerator        # one process, or one of several under `accelerate launch`
    device: torch.device
    skips: SkipLog          # every input skipped in this run, and why (saved with each checkpoint)
    stream_readers: int | None = None  # hf / webdataset: processes x workers, which the stream's order depends on

    @property
    def main(self) -> bool:  # only the main process saves and prints
        return self.acc.is_main_process

    def log(self, *args, **kw) -> None:
        if self.main:
            print(*args, **kw)

    @property
    def step_log(self) -> Path:  # one line per optimizer step
        return self.out_dir / step_log_name(self.run_id)

    @property
    def skip_list(self) -> Path:  # the skipped inputs, rewritten with every metadata save
        return self.out_dir / skip_list_name(self.run_id)


@dataclass
class TrainingData:
    """The training pairs and how they are batched."""
    images: CaptionSet | None        # the training images that are used (and readable); None: streamed
    pairs: list | None               # (image index, caption); None: streamed
    feats: torch.Tensor | None       # (N, E) frozen-encoder features on the device, or None: per batch
    cache_dir: str | None            # where encoder features are cached (None: no cache)
    loader: DataLoader
    order: torch.Generator           # the data order: saved, so a resume replays the same batches
    worker_seeds: torch.Generator    # DataLoader worker seeds
    workers: int
    stream: ShardStream | None = None  # hf / webdataset: the shards' stream (its position is the loop's)
    num_pairs: int = 0
    available_pairs: int = 0         # before training_size_limit: what `None` would train on
    reward: CiderD | None = None     # SCST epochs (scst_from_epoch): CIDEr-D with the training captions' IDF
    scst_stats: list = None          # this epoch's SCST steps: (samples' mean reward, greedy baseline's)

    def order_state(self) -> torch.Tensor:
        return torch.stack([self.order.get_state(), self.worker_seeds.get_state()])


@dataclass
class Optimization:
    """What one training step uses."""
    model: torch.nn.Module           # what the step calls: the captioner, DDP-wrapped / compiled as asked
    opt: torch.optim.Optimizer
    sched: object | None             # an LR scheduler, stepped once per optimizer step
    trainable: list                  # the parameters that learn
    accum: int                       # micro-batches per optimizer step


def start_run(hp: dict, resume_from) -> Run:
    if hp["log_with"] == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log_with='wandb' needs the wandb package: pip install wandb (or log_with='tensorboard')")
    out_dir = check_output_dir(hp["output_dir"])  # a file, or a folder that can't be written: said before any loading
    random.seed(hp["seed"]); np.random.seed(hp["seed"]); torch.manual_seed(hp["seed"])
    run_id = (f"{hp['training_name']}_" if hp["training_name"] else "") + datetime.now().strftime("%Y%m%d_%H%M%S")
    if resume_from is not None:  # same run, same file names (a run_id that could leave out_dir is refused)
        run_id = read_metadata(Path(resume_from))["run_id"]
    # under `accelerate launch` (DDP) each process takes its share of every global batch of
    # batch_size pairs (split_batches), so the run sees the same batches as a single process would
    acc = Accelerator(cpu=hp["device"] == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True),
                      log_with=hp["log_with"], project_dir=str(out_dir / "logs"))
    if hp["batch_size"] % acc.num_processes:
        raise ConfigError(f"batch_size {hp['batch_size']} must be divisible by the {acc.num_processes} processes")
    device = acc.device if acc.num_processes > 1 else pick_device(hp["device"])
    run = Run(hp, out_dir, run_id, acc, device, SkipLog())
    run.log(f"run {run_id} on {device}" + (f" x {acc.num_processes} processes" if acc.num_processes > 1 else ""))
    return run


def build_training_data(run: Run, train_set: CaptionSet, model) -> TrainingData:
    """The (image, caption) pairs to train on, their encoder features (computed once, cached) when the image
    side is frozen, and a DataLoader over them in a seeded, resumable order."""
    hp = run.hp
    if isinstance(train_set, ShardSource):
        return build_stream_data(run, train_set, model)
    pairs = train_set.pairs()
    available = len(pairs)
    if hp["training_size_limit"] is not None and len(pairs) > hp["training_size_limit"]:
        pairs = random.Random(hp["seed"]).sample(pairs, hp["training_size_limit"])
        train_set, pairs = keep_images(train_set, pairs, sorted({i for i, _ in pairs}))  # only these need features
    feats, cache_dir = None, hp["feature_cache_dir"] if model.supports_feature_cache else None
    if hp["augment_images"] and cache_dir is not None:
        run.log("augment_images: the feature cache is bypassed for training (every epoch sees new crops)")
    elif cache_dir is not None:  # the encoder runs once per image, never inside the epoch loop
        feats, ok = image_features(model, train_set.images, cache_dir, hp["eval_batch_size"], 0, run.skips,
                                   acc=run.acc)  # under accelerate: each process encodes a share, the main one writes
        feats = feats.to(run.device)                                                   # (N, E)
        train_set, pairs = keep_images(train_set, pairs, ok)
    if not pairs:
        raise DataError(f"none of the training images could be read ({run.skips.summary()})")
    workers = loader_workers(hp, run.device)
    order = torch.Generator().manual_seed(hp["seed"])
    worker_seeds = torch.Generator().manual_seed(hp["seed"] + 1)
    transform = None if feats is not None else image_transform(hp, model.preprocess)  # None: features, no images
    lengths = [len(x) for x in model.tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]] \
        if hp["group_by_length"] else None
    # the loader's own generator seeds its workers: creating an epoch's iterator then draws nothing
    # from the global torch RNG, which a resumed run restores to the exact pre-interruption state
    if hp["captions_per_image"] is not None:  # a fresh draw of each image's captions every epoch
        batching = {"batch_sampler": CaptionDraw([i for i, _ in pairs], hp["captions_per_image"], hp["batch_size"],
                                                 order, lengths), "generator": worker_seeds}
    elif lengths is not None:
        batching = {"batch_sampler": LengthGroupedBatches(lengths, hp["batch_size"], order), "generator": worker_seeds}
    else:
        batching = {"batch_size": hp["batch_size"], "shuffle": True, "generator": order}
    loader = training_loader(PairDataset(train_set, transform, pairs, caption_augment(hp)), model, hp, run.device,
                             workers, **batching)
    return TrainingData(train_set, pairs, feats, cache_dir, loader, order, worker_seeds, workers, num_pairs=len(pairs),
                        available_pairs=available)


# init_from: the model-config keys that may differ from the checkpoint's (how the weights train or are held, not
# what they are); the backbones' names must match
INIT_FREE = ("lm_dtype", "mapper_dropout", "retrieval_pool", "lm_lora_r", "lora_r", "lora_alpha", "lora_dropout",
             "target_modules", "quantization_bits", "peft_module", "gradient_checkpointing")


def start_from(run: Run, model, path) -> None:
    """init_from: the trainable weights of another run's checkpoint (its model config must match this run's)."""
    ckpt = read_checkpoint(path)
    if model.config.model_type != "prefix":
        raise ConfigError("init_from takes a prefix model's model_state_dict_*.pth; git / blip start from their "
                          "hf_model_name")
    theirs = {k: v for k, v in ckpt["model_config"].items() if k not in INIT_FREE}
    ours = {k: v for k, v in model.config.__dict__.items() if k in theirs}
    if ours != theirs:
        diff = sorted(k for k in theirs if theirs[k] != ours.get(k))
        raise ConfigError(f"init_from={path}: its model config differs from this run's in {diff}; give the same keys")
    # a mapper trained without decoder LoRA may start a run with it (the adapters start at zero: the same model)
    model.load_trainable(ckpt["state_dict"], path, fresh_adapters=not ckpt["model_config"].get("lm_lora_r"))
    run.log(f"starting from the trained weights of {path}")


def scst_reward(run: Run, data: TrainingData, model) -> CiderD:
    """SCST's reward: CIDEr-D with document frequencies from every training image's captions."""
    if model.config.model_type != "prefix" or data.feats is None or run.acc.num_processes > 1:
        raise ConfigError("scst_from_epoch is built for the prefix model on one process, with cached features "
                          "(feature_cache_dir set, augment_images=False, not streamed data)")
    data.scst_stats = []
    return CiderD(data.images.captions)


def build_stream_data(run: Run, source: ShardSource, model) -> TrainingData:
    """Shards, streamed: their features extracted once into feature shards when the image side is frozen (else
    images decoded per step), read by a ShardStream per process in a seeded order that a resume replays."""
    hp, acc = run.hp, run.acc
    if hp["retrieval_k"]:
        raise ConfigError("retrieval_k needs every training image's features in memory, which streamed data "
                          "(dataset hf / webdataset) never holds: set retrieval_k=0")
    if hp["captions_per_image"] is not None:
        raise ConfigError("captions_per_image draws from every image's captions each epoch, which streamed data "
                          "(dataset hf / webdataset: one caption per sample) doesn't group: set captions_per_image=None")
    workers = loader_workers(hp, run.device)
    cache_dir = hp["feature_cache_dir"] if model.supports_feature_cache else None
    if cache_dir is not None and not hp["augment_images"]:
        shards = extract_shard_features(model, source.shards, cache_dir, run.skips, hp["eval_batch_size"], workers, acc)
        counts, make = [s.pairs for s in shards], embeds_pair                     # items: (E,) / (N, W) features
    else:
        shards, counts = source.shards, count_pairs(source.shards, run.skips, acc)
        make = DecodePair(image_transform(hp, model.preprocess))
    if not sum(counts):
        raise DataError(f"none of the training samples could be used ({run.skips.summary()})")
    limit = hp["training_size_limit"]
    stream = ShardStream(shards, counts, rank=acc.process_index, processes=acc.num_processes, workers=workers,
                         local_batch=hp["batch_size"] // acc.num_processes, seed=hp["seed"], make_item=make,
                         buffer=hp["shuffle_buffer"], caption_transform=caption_augment(hp),
                         max_batches=None if limit is None else max(1, limit // hp["batch_size"]))
    run.stream_readers = stream.slots
    if len(stream) == 0:
        raise DataError(f"{sum(counts)} pairs in {len(shards)} shards fill no batch of {stream.local_batch} on each "
                        f"of the {stream.slots} readers (processes x workers): lower batch_size or num_workers")
    if acc.num_processes > 1:  # what each process reads (on any machine): its own shards, no other's
        ids = sorted(i for w in range(stream.workers) for i in stream.slot_shards(1, acc.process_index, w))
        print(f"process {acc.process_index} of {acc.num_processes}: {len(stream)} batches per epoch; epoch 1 reads "
              f"{len(ids)} shards" + (f" {ids}" if len(ids) <= 64 else ""), flush=True)
    worker_seeds = torch.Generator().manual_seed(hp["seed"] + 1)
    loader = training_loader(stream, model, hp, run.device, workers, batch_size=None, generator=worker_seeds)
    return TrainingData(None, None, None, cache_dir, loader, torch.Generator().manual_seed(hp["seed"]), worker_seeds,
                        workers, stream, sum(counts), sum(counts))


def build_datastore(run: Run, model, data: TrainingData):
    """The training images' retrieval keys and captions (retrieval.py), attached to the model (retrieval_k reads
    it) and saved beside the checkpoints, which name it. None for models whose image side trains (git / blip)."""
    if not model.supports_feature_cache:
        return None
    if data.stream is not None:  # (build_stream_data refuses retrieval_k for streams)
        run.log("note: no kNN baseline or retrieval datastore for streamed data (they need every training feature)")
        return None
    feats, images = data.feats, data.images
    if feats is None:  # augment_images: the plain images' features, once (cached: the same as without augmenting)
        feats, ok = image_features(model, images.images, run.hp["feature_cache_dir"], run.hp["eval_batch_size"], 0,
                                   SkipLog(), acc=run.acc)
        images = images.subset(ok)
    store = Datastore.build(feats, images.images, images.captions, encoder_fingerprint(model))
    model.attach_datastore(store)
    model.datastore_file = datastore_name(run.run_id)
    if run.main:
        try:
            store.save(run.out_dir / model.datastore_file)
        except OSError as e:
            raise SaveError(f"could not save the datastore in {run.out_dir}: {e}") from e
    return store


def build_step(run: Run, model, data: TrainingData) -> Optimization:
    """Optimizer and LR scheduler over the trainable parameters; the model, optimizer and loader prepared
    by accelerate (DDP on several processes) and the step compiled if asked. data.loader is replaced."""
    hp, accum, trainable = run.hp, run.hp["gradient_accumulation_steps"], model.trainable_parameters()
    opt = make_optimizer(trainable, hp)
    sched = make_scheduler(opt, hp, steps_per_epoch=-(-len(data.loader) // accum))
    if data.stream is None:
        step_model, opt, data.loader = run.acc.prepare(model, opt, data.loader)  # DDP-wrapped on several processes
    else:  # the stream splits its shards among processes itself: accelerate must not re-split its batches
        step_model, opt = run.acc.prepare(model, opt)
    if hp["compile"]:  # here, not through accelerate's dynamo plugin: that one is process-wide state and
        # would stick to the first run in a notebook
        step_model = compile_step(step_model, run.device)
    if hp["log_with"]:
        run.acc.init_trackers(run.run_id, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                  for k, v in hp.items()})
    return Optimization(step_model, opt, sched, trainable, accum)


def describe_run(run: Run, splits: dict, data: TrainingData, model) -> None:
    hf = " (dataset hf: a split named in hf_splits)" if run.hp["dataset"] == "hf" else ""
    more = "images" if data.stream is None else "shards (a stream holds out whole shards)"
    for name, why, also in (("val", "validation", f", or more {more} to hold out (val_ratio)"),
                            ("test", "test evaluation", "")):
        if splits[name].num_images == 0:
            run.log(f"note: the {name} split has no images: {why} is skipped; give {name}_dir{hf}{also}")
    n_params = sum(p.numel() for p in model.trainable_parameters())
    train = f"{data.num_pairs} training pairs from {data.images.num_images} images" if data.stream is None else \
        (f"{data.num_pairs} training pairs in {len(data.stream.shards)} shards, streamed: {len(data.stream)} batches "
         f"per epoch on each of {run.acc.num_processes} process(es)")
    run.log(f"data: {train}; "
            f"val {splits['val'].num_images} images; test {splits['test'].num_images} images; {run.skips.summary()}")
    limit = run.hp["training_size_limit"]
    if limit is not None and data.available_pairs > limit:  # (the default, 500, is a smoke run's size)
        used = f"{len(data.stream) * run.hp['batch_size']:,} pairs per epoch" if data.stream is not None else \
            f"{data.num_pairs:,} pairs"
        run.log(f"note: training_size_limit={limit} trains on {used} of the {data.available_pairs:,} there are: "
                "--training_size_limit=None for all of them")
    c = model.config
    feats = f"{c.encoder_embed_dim}-d pooled" if c.encoder_features == "pooled" else \
        f"{'x'.join(map(str, model.feature_shape))} tokens"
    retrieval = f"retrieval prompt ({c.retrieval_k} captions of similar training images) + " if c.retrieval_k else ""
    run.log(f"model: {c.encoder_type} {c.encoder_name} ({feats}) -> {c.mapper_type} mapper ({n_params:,} trainable) -> "
            f"{retrieval}{c.mapper_prefix_length} x {c.lm_hidden_size} prefix -> {c.lm_name}" if c.model_type == "prefix" else
            f"model: {c.model_type} {c.hf_model_name or 'default'} ({c.quantization_bits}-bit) + {c.peft_module} "
            f"adapters ({n_params:,} trainable)")


def eval_settings(run: Run, data: TrainingData) -> dict:
    """evaluate()'s keyword arguments for every evaluation in the run (before, each epoch's validation, test)."""
    hp = run.hp
    return dict(batch_size=hp["eval_batch_size"], max_caption_length=hp["max_caption_length"],
                gen_kwargs=decoding(hp), num_workers=data.workers, cache_dir=data.cache_dir)


def decoding(hp: dict) -> dict:
    """How the run's evaluations decode captions (model.generate's keyword arguments)."""
    return {"max_new_tokens": hp["max_new_tokens"], "num_beams": hp["num_beams"], **{k: hp[k] for k in SHAPING_FIELDS}}


def evaluate_before(run: Run, model, test_split, data: TrainingData) -> dict:
    """The test split scored by the untrained model (on a resume too: before the checkpoint's weights load)."""
    before = evaluate(model, test_split, skips=SkipLog(), acc=run.acc, **eval_settings(run, data))
    run.log(f"🧪 Before training, held-out test: ROUGE-L {fmt(before.get('rouge_l'))}, CIDEr {fmt(before.get('cider'))}, loss {fmt(before['loss'])}")
    return before


def resume_loop(run: Run, resume_from, data: TrainingData, optim: Optimization) -> LoopState:
    """Put a resumable checkpoint back: weights, optimizer, scheduler, data order, RNGs and the loop's state.
    The step log loses the steps after the checkpoint (they are redone), and temp files of an interrupted
    save of this run go."""
    meta_path, n_batches = Path(resume_from), len(data.loader)
    loop = restore_training_state(state_path_for(meta_path), optim.opt, optim.sched, optim.trainable,
                                  (data.order, data.worker_seeds))
    loop.meta_path, loop.meta = meta_path, read_metadata(meta_path)
    readers = loop.meta.get("stream_readers")
    if data.stream is not None and readers is not None and readers != data.stream.slots:
        raise ConfigError(f"this run read its shards with {readers} readers (processes x DataLoader workers), now "
                          f"{data.stream.slots}: the stream's order depends on them, so resume with the same "
                          "num_workers and number of processes")
    if loop.batches_done >= n_batches:  # saved at an epoch's end: the next epoch starts afresh, RNGs as they were
        restore_rng(loop.rng_at_epoch_start)
        loop.rng_at_epoch_start = None
    step_log = run.step_log
    if run.main and step_log.exists():  # steps after the checkpoint were never saved: they will be redone
        kept = [ln for ln in step_log.read_text(errors="replace").splitlines() if logged_step(ln) <= loop.step]
        # atomically: a symlink planted in the run folder is replaced, its target never written
        atomic_write(step_log, lambda f: f.write("".join(ln + "\n" for ln in kept).encode()))
    if run.main:  # temp files of saves that a kill interrupted (this run's names only: other runs may share the folder)
        for tmp in run.out_dir.glob(f".*{run.run_id}-*.tmp"):  # (run_id is a plain name: no glob characters, no '/')
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else \
                tmp.unlink(missing_ok=True)
    first = loop.first_epoch(n_batches)
    run.log(f"⏯️ resumed from {resume_from}: epoch {first}, batch {loop.batches_done if first == loop.epoch else 0}"
            f"/{n_batches}, step {loop.step}")
    return loop


# ----------------------------------------------------------------------------------------------
# the epoch: micro-batches -> optimizer steps -> (mid-epoch) checkpoints

def train_epoch(run: Run, model, data: TrainingData, optim: Optimization, loop: LoopState, epoch: int, stop) -> bool:
    """One pass over the training batches (the rest of one, after a resume). False: a stop was asked for
    (SIGINT / SIGTERM) and a resumable checkpoint was saved."""
    model.train()
    n_batches = len(data.loader)
    order = data.order_state()  # this epoch's data order, drawn from when the loader is iterated
    first = loop.start_epoch(epoch, n_batches)  # only the epoch a resume lands in starts part-way
    if data.stream is not None:  # the stream replays its records up to `first` without decoding them
        data.stream.set_position(epoch, first)
        it = iter(data.loader)
    else:
        it = iter(run.acc.skip_first_batches(data.loader, first) if first else data.loader)
    loop.start_clock()  # (after iter(): the seconds don't include starting the loader's workers)
    if loop.rng_at_epoch_start is not None:  # a mid-epoch resume: the RNGs as they were at that step
        restore_rng(loop.rng_at_epoch_start)
        loop.rng_at_epoch_start = None
    bar = tqdm(it, desc=f"Training Epoch {epoch}/{run.hp['num_epochs']}", dynamic_ncols=True, disable=not run.main,
               total=n_batches, initial=first)
    micro_losses, bad = [], False  # the current optimizer step's micro-batch losses; a non-finite one among them
    for i, batch in enumerate(bar, start=first):
        loop.batches_done = i + 1
        for path, reason in batch["skipped"]:
            run.skips.add(path, reason)
        # gradient accumulation: an optimizer step after every `accum` micro-batches (and at the epoch's end)
        group = min(optim.accum, n_batches - (i - i % optim.accum))
        last_micro = (i + 1) % optim.accum == 0 or i + 1 == n_batches
        scst = data.reward is not None and epoch >= run.hp["scst_from_epoch"]
        loss = micro_step(run, data, optim, batch, group, last_micro, scst)  # None: no usable image; nan: non-finite
        if loss is not None and math.isnan(loss):
            bad = True
        elif loss is not None:
            micro_losses.append(loss)
        if not last_micro or not (micro_losses or bad):
            continue
        stepped = optimizer_step(run, optim, loop, micro_losses, bad)
        micro_losses, bad = [], False
        if stepped is None:  # skipped: non-finite
            continue
        bar.set_postfix({"Loss": f"{stepped[0]:.4f}", "Avg Loss": f"{loop.train_loss:.4f}"})
        record_step(run, loop, *stepped)
        if i + 1 < n_batches and not mid_epoch_checkpoint(run, model, optim, loop, order, stop):
            return False  # (an epoch's last step is saved with the epoch, after validation)
    loop.batches_done = n_batches
    if loop.epoch_sums[1] == 0 and loop.bad_in_a_row == 0:  # not one batch had a readable image (they went bad)
        raise DataError(f"epoch {epoch}: no training batch could be used ({run.skips.summary()}); "
                        f"the last checkpoint is {loop.meta_path or 'none'}")
    return True


def micro_step(run: Run, data: TrainingData, optim: Optimization, batch: dict, group: int, last_micro: bool,
               scst: bool = False):
    """Forward + backward of one micro-batch (loss / group, so a group's gradients average). -> its loss
    (averaged over processes), nan if non-finite (no backward then), None if no image in it could be used.
    scst: the self-critical loss over the batch's images (each once) instead of the captions' cross-entropy."""
    acc = run.acc
    usable = "input_ids" in batch
    if acc.num_processes > 1 and data.feats is None:  # images load per step here: a share can come up empty,
        # and a DDP step needs every process, so all skip it together
        usable = bool(acc.gather(torch.tensor([usable], device=run.device)).all())
    if not usable:
        return None
    if "image_embeds" in batch:  # streamed feature shards
        image_inputs = {"image_embeds": batch["image_embeds"].to(run.device, non_blocking=True)}  # (B, E)
    elif data.feats is not None:
        image_inputs = {"image_embeds": data.feats[batch["image_idx"]]}                    # (B, E)
    else:
        image_inputs = {"pixel_values": batch["pixel_values"].to(run.device, non_blocking=True)}  # (B, 3, S, S)
    # only the last micro-batch of a group synchronises gradients across processes
    sync = contextlib.nullcontext() if last_micro or acc.num_processes == 1 else acc.no_sync(optim.model)
    with sync:
        if scst:
            idx = batch["image_idx"].unique()
            loss, stats = scst_loss(run.acc.unwrap_model(optim.model), data.feats[idx],
                                    [data.images.captions[i] for i in idx.tolist()], data.reward,
                                    run.hp["scst_samples"], run.hp["max_new_tokens"], run.hp["scst_baseline"])
            data.scst_stats.append((stats["reward"], stats["baseline"]))
        else:
            _, loss = optim.model(batch["input_ids"], batch["attention_mask"], **image_inputs)
        finite = torch.isfinite(loss.detach()).reshape(1)
        if acc.num_processes > 1:  # every process skips the backward together, or none does
            finite = acc.gather(finite).all()
        if finite:
            acc.backward(loss / group)
    return acc.reduce(loss.detach(), "mean").item() if finite else math.nan  # the global batch's loss


def optimizer_step(run: Run, optim: Optimization, loop: LoopState, micro_losses: list, bad: bool):
    """Clip, step the optimizer and scheduler -> (the step's loss, its learning rate); None when the step
    is skipped because a loss or gradient is not finite (after max_bad_steps in a row, the run stops)."""
    if not bad:  # the norm also catches a finite loss whose gradients overflowed (inf: measure, don't clip)
        norm = run.acc.clip_grad_norm_(optim.trainable, run.hp["max_grad_norm"] or float("inf"))
        bad = norm is not None and not torch.isfinite(torch.as_tensor(norm))
    if bad:  # skip the whole optimizer step: no update, no scheduler step
        optim.opt.zero_grad(set_to_none=True)
        loop.bad_steps, loop.bad_in_a_row = loop.bad_steps + 1, loop.bad_in_a_row + 1
        run.log(f"⚠️ step {loop.step + 1} skipped: non-finite loss or gradient ({loop.bad_in_a_row} in a row, "
                f"{loop.bad_steps} in all)")
        if loop.bad_in_a_row >= run.hp["max_bad_steps"]:
            raise NonFiniteError(
                f"{loop.bad_in_a_row} non-finite losses or gradients in a row (epoch {loop.epoch}, after step "
                f"{loop.step}): the run stopped. Last good checkpoint: {loop.meta_path or 'none saved yet'}. "
                "Try a lower learning_rate, or check the data (max_bad_steps sets the limit).")
        return None
    loop.bad_in_a_row = 0
    optim.opt.step()
    optim.opt.zero_grad(set_to_none=True)
    lr = optim.opt.param_groups[0]["lr"]
    if optim.sched is not None:
        optim.sched.step()
    loss = sum(micro_losses) / len(micro_losses)
    loop.add_step(loss)
    return loss, lr


def record_step(run: Run, loop: LoopState, loss: float, lr: float) -> None:
    """One line per optimizer step in train_log_<run>.jsonl (and the tracker)."""
    if run.main:
        try:
            append_line(run.step_log, json.dumps({"step": loop.step, "epoch": loop.epoch, "loss": loss, "lr": lr}))
        except OSError as e:  # disk full mid-epoch: stop like a failed save, naming what is intact
            raise SaveError(f"could not append to {run.step_log}: {e.strerror or e}. The run stopped; the "
                            f"last complete checkpoint is {loop.meta_path or 'none'}; free space, then "
                            "resume from it.") from e
    if run.hp["log_with"]:
        run.acc.log({"train/loss": loss, "train/lr": lr}, step=loop.step)


def mid_epoch_checkpoint(run: Run, model, optim: Optimization, loop: LoopState, order, stop) -> bool:
    """A resumable checkpoint inside the epoch, every save_every_n_steps steps or when a stop is asked for.
    -> False when the run must stop now."""
    want_stop, every = stop_agreed(run, stop), run.hp["save_every_n_steps"]
    if (want_stop or (every and loop.step % every == 0)) and run.main:
        save_checkpoint(run, model, optim, loop, f"{run.run_id}-{loop.epoch}-step{loop.step}", order,
                        {"train_loss_so_far": loop.train_loss})
    return not want_stop


def stop_agreed(run: Run, stop) -> bool:
    """Was a stop asked for? Under DDP: by any process, so all stop at the same step."""
    if run.acc.num_processes == 1:
        return stop.requested
    return bool(run.acc.gather(torch.tensor([stop.requested], device=run.device)).any())


def interrupted(run: Run, loop: LoopState) -> dict:
    run.acc.end_training()  # trackers closed and, under DDP, the process group destroyed (a live gloo thread at exit
    # aborts the process: "terminate called without an active exception", seen on the two-machine test)
    if not run.main:
        return {}
    print(f"⏸️ stopped after step {loop.step}; saved {loop.meta_path}\nresume with:\n"
          f"    python train.py --resume {loop.meta_path}")
    return {"interrupted": True, "resume_from": str(loop.meta_path)}


# ----------------------------------------------------------------------------------------------
# after each epoch: validation, the checkpoint; after the last: the test split

def end_epoch(run: Run, model, val_split, data: TrainingData, optim: Optimization, loop: LoopState,
              stop_now: bool) -> tuple[dict, bool]:
    """Validation loss (+ ROUGE-L), the epoch's summary in the history and the log, and the checkpoint
    when one is due -> (validation scores, whether a checkpoint was saved)."""
    hp, epoch, train_loss = run.hp, loop.epoch, loop.train_loss
    save_now = epoch % hp["save_every_n_epochs"] == 0 or epoch == hp["num_epochs"] or stop_now
    # every process evaluates its share of the images; only the main process saves and prints
    val = evaluate(model, val_split, skips=run.skips, generate=hp["evaluation_enabled"], acc=run.acc,
                   **eval_settings(run, data))
    summary = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "rouge_l": val.get("rouge_l"),
               "cider": val.get("cider"), "seconds": round(time.time() - loop.epoch_started, 1)}
    if run.device.type == "cuda":  # this process's high-water mark so far (weights + activations + optimizer)
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    loop.history.append(summary)
    if hp["log_with"]:
        run.acc.log({"train/epoch_loss": train_loss, **{f"val/{k}": val[k] for k in ("loss", "rouge_l", "cider")
                                                        if val.get(k) is not None}}, step=loop.step)
    run.log(f"📊 Epoch {epoch}: training loss {train_loss:.4f}, validation loss {fmt(val['loss'])}"
            + (f", ROUGE-L {val['rouge_l']:.4f}, CIDEr {val['cider']:.4f}" if val.get("rouge_l") is not None else "")
            + f" ({summary['seconds']:.0f} s" + (f", peak GPU memory {summary['peak_gpu_memory_gib']} GiB)"
                                                 if "peak_gpu_memory_gib" in summary else ")"))
    if val.get("distinct_captions") is not None:
        summary["distinct_captions"] = val["distinct_captions"]
        run.log("   " + spread_line(val))
    if data.scst_stats:  # this epoch's SCST steps: the reward of the samples and of the greedy baseline
        summary["scst_reward"], summary["scst_baseline"] = (round(float(np.mean(x)), 4) for x in zip(*data.scst_stats))
        run.log(f"   SCST: sampled captions' CIDEr-D {summary['scst_reward']:.4f}, greedy captions' "
                f"{summary['scst_baseline']:.4f} (training images, training IDF; the loss is SCST's, not cross-entropy)")
        data.scst_stats.clear()
    if run.main and save_now:  # the generators' state now = the next epoch's data order
        save_checkpoint(run, model, optim, loop, f"{run.run_id}-{epoch}", data.order_state(),
                        {"train_loss": train_loss, "val_loss": val["loss"], "rouge_l": val.get("rouge_l"),
                         "cider": val.get("cider")})
    return val, run.main and save_now


def save_checkpoint(run: Run, model, optim: Optimization, loop: LoopState, stem: str, data_order, fields: dict):
    """The trainable weights, then the training state, then the metadata: the commit marker, so a
    checkpoint without it (a crash mid-save) is never loaded. Each file is written atomically."""
    out = run.out_dir
    paths = (out / checkpoint_name(stem, model.config.model_type), out / state_name(stem), out / metadata_name(stem))
    try:
        model.save_checkpoint(paths[0])
        atomic_torch_save(training_state(run.run_id, loop, optim.opt, optim.sched, optim.trainable, data_order),
                          paths[1])
        info = {"checkpoint": paths[0].name, "train_state": paths[1].name, "run_id": run.run_id,
                "epoch": loop.epoch, "step": loop.step, "batches_done": loop.batches_done,
                "batches_per_epoch": loop.batches_per_epoch, **fields,
                **({"stream_readers": run.stream_readers} if run.stream_readers else {}),
                "metric_notes": {"rouge_l": ROUGE_L_NOTE, "cider": CIDER_NOTE},
                "nonfinite_steps_skipped": loop.bad_steps, "history": loop.history, "hyperparameters": run.hp,
                "model_config": model.config.__dict__, "trainable_parameters": sum(p.numel() for p in optim.trainable),
                "skipped_inputs": dict(run.skips.counts), "library_versions": library_versions(),
                "device": str(run.device), "saved_at": datetime.now().isoformat(timespec="seconds")}
        atomic_write_json(info, paths[2])
    except OSError as e:  # disk full, permissions: stop with the last complete checkpoint named
        raise SaveError(f"could not save checkpoint {stem} in {out}: {e}. The last complete checkpoint is "
                        f"{loop.meta_path or 'none'}; free space (or fix permissions), then resume from it.") from e
    loop.meta_path, loop.meta = paths[2], info
    write_skip_list(run)  # the list and the metadata's counts come from the same SkipLog
    if run.hp["keep_last_n"]:
        prune_checkpoints(out, run.run_id, run.hp["keep_last_n"], run.log)


def announce_checkpoint(run: Run, loop: LoopState, val: dict) -> None:
    ckpt_path = run.out_dir / loop.meta["checkpoint"]
    print("✅ Model saved successfully!")
    print(f"📁 Model {'state dict' if ckpt_path.suffix == '.pth' else 'adapter'}: {ckpt_path}")
    print(f"📁 Metadata: {loop.meta_path}")
    print(f"📊 Training loss: {loop.meta['train_loss']:.4f}")
    print(f"📈 Validation loss: {fmt(val['loss'])}")
    if val.get("rouge_l") is not None:
        print(f"🎯 ROUGE-L score: {val['rouge_l']:.4f}, CIDEr: {val['cider']:.4f}")


def finish(run: Run, model, test_split, data: TrainingData, loop: LoopState, before: dict | None, store) -> dict:
    """The held-out test split (with the image ablation and the demo's targets), recorded in the last
    checkpoint's metadata -> that metadata."""
    hp = run.hp
    test = None
    if hp["test_evaluation_enabled"] and test_split.num_images > 0:
        test = evaluate(model, test_split, skips=run.skips, ablate_image=hp["ablate_image"], seed=hp["seed"],
                        acc=run.acc, datastore=store, **eval_settings(run, data))
        test = test if test["num_images"] > 0 else None  # (none of its images could be read: evaluate said so)
    if test is not None and hp["coco_metrics"] and run.main:
        test["caption_metrics"] = caption_metrics({p["image"]: p["references"] for p in test["predictions"]},
                                                  {p["image"]: p["caption"] for p in test["predictions"]})
    if hp["log_with"] and test is not None:
        run.acc.log({"test/loss": test["loss"], "test/rouge_l": test["rouge_l"], "test/cider": test["cider"]},
                    step=loop.step)
    run.acc.end_training()  # (as in interrupted(): the process group too)
    if not run.main:
        return {}
    meta = loop.meta
    if test is not None:
        meta["test"] = {k: v for k, v in test.items() if k != "predictions"}
        if before is not None:
            meta["test_before_training"] = {k: v for k, v in before.items() if k != "predictions"}
        iv = test["intervals"]  # 95 %, bootstrap over the test images
        print(f"🧪 Held-out test ({test['num_images']} images): ROUGE-L {with_interval(test['rouge_l'], iv['rouge_l'])}, "
              f"CIDEr {with_interval(test['cider'], iv['cider'])}, loss {test['loss']:.4f} ([95 % bootstrap interval])")
        print("   " + spread_line(test))
        if "knn_baseline" in test:
            print("   " + knn_line(test))
        if "caption_metrics" in test:
            print_metrics(test["caption_metrics"])
        if "ablated" in test:
            print(f"🔀 Images shuffled across the set: ROUGE-L {test['ablated']['rouge_l']:.4f}, "
                  f"CIDEr {test['ablated']['cider']:.4f}, loss {test['ablated']['loss']:.4f} "
                  f"(ROUGE-L drop {test['rouge_l'] - test['ablated']['rouge_l']:.4f})")
        check_demo_targets(hp, test, meta)
    if loop.meta_path is not None:  # test evaluation (or the last epoch's) may have skipped more inputs
        meta["skipped_inputs"] = dict(run.skips.counts)
        atomic_write_json(meta, loop.meta_path)
        write_skip_list(run)
    if run.skips.items:
        print(f"{run.skips.summary()}; list: {run.skip_list}")
    return meta


def check_demo_targets(hp: dict, test: dict, meta: dict) -> None:
    """The demo datasets' promised figures (DEMO_TARGETS): met or not, said and recorded."""
    targets = DEMO_TARGETS.get(hp["dataset"])
    if not targets:
        return
    met = test["rouge_l"] >= targets["test_rouge_l_min"] and (
        targets.get("ablation_drop_min") is None or
        ("ablated" in test and test["rouge_l"] - test["ablated"]["rouge_l"] >= targets["ablation_drop_min"]))
    meta["demo_targets"] = {**targets, "met": met}
    print(f"demo targets ({', '.join(f'{k} {v}' for k, v in targets.items())}): {'met' if met else 'NOT met'}")


# ----------------------------------------------------------------------------------------------
# small helpers of the stages above

def keep_images(data, pairs, keep):
    """Restrict a CaptionSet to the images at indices `keep` and renumber the (image, caption) pairs
    (pairs of dropped images go)."""
    remap = {old: new for new, old in enumerate(keep)}
    return data.subset(keep), [(remap[i], c) for i, c in pairs if i in remap]


def fmt(x) -> str:
    """A metric for the log: 4 decimals, or n/a where a split had no images."""
    return "n/a" if x is None else f"{x:.4f}"


def logged_step(line: str) -> float:
    """The step of a train_log JSONL line; inf for a line a kill cut short (dropped when resuming)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def append_line(path: Path, line: str) -> None:
    """Append one line to a log in the run folder, never through a symlink (O_NOFOLLOW: ELOOP instead)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def write_skip_list(run: Run) -> None:
    """skipped_inputs_<run>.tsv, rewritten with every metadata save so it always matches the saved counts."""
    if run.skips.items:
        run.skips.write(run.skip_list)
    else:
        run.skip_list.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# the command line

def merge_main(argv: list[str]) -> int:
    """python train.py --merge_weights --checkpoint ADAPTER_DIR [--merged_dir DIR] [--wise_alpha A]"""
    ap = argparse.ArgumentParser(prog="train.py --merge_weights", description=
                                 "Merge a git/blip adapter into its base model, or a prefix checkpoint's decoder LoRA "
                                 "(lm_lora_r) into its decoder: a folder that eval.py, inference.py and "
                                 "load_model_example.py load with no adapter.")
    ap.add_argument("--merge_weights", action="store_true", required=True)
    ap.add_argument("--checkpoint", required=True, help="an adapter_<run>-<epoch> folder, or a prefix model's "
                    "model_state_dict_<run>-<epoch>.pth trained with lm_lora_r")
    ap.add_argument("--merged_dir", help="default: merged_<run>-<epoch>[_wise<A>] next to the adapter")
    ap.add_argument("--wise_alpha", type=float, default=1.0,
                    help="WiSE-FT: weights = base + A x (fine-tuned - base); 1 = the fine-tuned model, 0 = the base")
    args = ap.parse_args(argv)
    if not 0.0 <= args.wise_alpha <= 1.0:
        ap.error("--wise_alpha must be between 0 and 1")
    merge = merge_decoder_lora if Path(args.checkpoint).is_file() else merge_adapter  # a prefix .pth: its decoder's LoRA
    out = merge(args.checkpoint, args.merged_dir, args.wise_alpha)
    print(f"merged {args.checkpoint} (wise_alpha {args.wise_alpha}) -> {out}")
    return 0


def run(argv: list[str]) -> int:
    if "--merge_weights" in argv:
        return merge_main(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(__doc__, Path(__file__), hyperparameters, PRESETS))
        return 0
    if any(a == "--resume" or a.startswith("--resume=") for a in argv):
        hp, resume_from = resolve_resume(argv)
    else:
        hp, resume_from = resolve_hparams(argv), None
    train(hp, resume_from)
    return 0


def main(argv=None) -> int:
    """The command line: expected failures end in one paragraph and their exit code (errors.py)."""
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
