"""
What every capkit captioner is: its config (CaptionerConfig, saved in each checkpoint), the decoding settings
every script shares (Generation, GENERATION_LIMITS), the interface the scripts rely on (Captioner: tokenize,
forward -> (logits, loss), generate, save_checkpoint) and its loss (masked_cross_entropy). The models that fill
it in: model.PrefixCaptioner (the main path) and capkit.models.hf_captioner.HFCaptioner (GIT / BLIP).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from capkit.cli import float_in, int_at_least
from capkit.errors import ConfigError
from capkit.models.decoders import DECODER_BOUNDS
from capkit.models.encoders import ENCODER_BOUNDS, ENCODER_TYPES, FEATURE_KINDS
from capkit.models.mappers import MAPPER_BOUNDS, MAPPER_INPUTS, MAPPER_TYPES
from capkit.models.retrieval import RETRIEVAL_BOUNDS, RETRIEVAL_TEMPLATES
from capkit.names import current_names, current_value

# model_type "prefix": the main path (frozen encoder -> trainable mapper -> prefix of a frozen decoder, any of the
# four mappers); "git" / "blip": the adapter path. Older names of keys and values ("clip_mlp") are read through
# capkit/names.py
MODEL_TYPES = ("prefix", "git", "blip")


# the sizes a config may ask for (inclusive), each declared by the part it sizes: a hand-edited or hostile config
# can't ask for terabytes of weights. train.py's hyperparameters are checked against the same bounds (config.py)
CONFIG_BOUNDS = {**ENCODER_BOUNDS, **MAPPER_BOUNDS, **RETRIEVAL_BOUNDS, **DECODER_BOUNDS}
FRACTIONS = ("mapper_dropout", "lora_dropout")  # dropout probabilities: in [0, 1)


# ----------------------------------------------------------------------------------------------
# config

@dataclass
class CaptionerConfig:
    model_type: str = "prefix"
    # image encoder (encoders.py): encoder_type "open_clip" (a built-in name + pretrained tag or weights file,
    # "hf-hub:org/repo", or "local-dir:/path"), "timm" (a timm name + weights file, or a timm folder) or "hf"
    # (a transformers vision model: hub id or save_pretrained folder)
    encoder_type: str = "open_clip"
    encoder_name: str = "ViT-B-32"
    encoder_pretrained: str | None = "openai"
    encoder_image_size: int | None = None      # None: the encoder's native input size
    encoder_normalize: bool = True             # L2-normalise the pooled embedding (contrastive encoders only: CLIP, SigLIP)
    encoder_features: str = "pooled"           # "pooled": one embedding (E) per image | "tokens": a ViT's patch tokens
                                            #   or a CNN's H*W feature map (N x W), for the transformer / resampler
    encoder_layer: int = -1                 # tokens of this block (-1: the final features; -2: the one before)
    retrieval_k: int = 0                    # > 0: the captions of the k nearest datastore images (retrieval.py) are
                                            #   a text prompt before the image prefix (SmallCap's idea)
    retrieval_pool: int = 0                 # training: the k are drawn among this many nearest (0: the k nearest)
    retrieval_template: str = "capkit"      # the prompt's words: "capkit" | "smallcap" (retrieval.RETRIEVAL_TEMPLATES)
    # mapper ("mapper"): image features -> prefix_length x decoder hidden size (P x H)
    mapper_type: str = "mlp"                  # MAPPER_TYPES: "mlp" | "linear" | "transformer" | "resampler"
    mapper_prefix_length: int = 10
    mapper_hidden_dim: int = 2048             # mlp: hidden width; transformer / resampler: feed-forward width
    mapper_dropout: float = 0.0
    mapper_num_layers: int = 8                # transformer / resampler blocks (ClipCap's mapper: 8)
    mapper_num_heads: int = 8                 # attention heads (must divide the decoder's hidden size)
    # decoder (transformers AutoModelForCausalLM): hub id or local save_pretrained folder
    lm_name: str = "Qwen/Qwen3-0.6B-Base"
    lm_tokenizer_name: str | None = None    # None: same as lm_name
    lm_dtype: str = "auto"                  # auto: bfloat16 on CUDA, float32 elsewhere
    lm_lora_r: int = 0                      # > 0: LoRA of this rank on the decoder's attention, trained with the mapper
                                            #   (lora_alpha, lora_dropout, target_modules below); 0: wholly frozen
    # GIT / BLIP: a whole captioning model (the lora_* keys and target_modules also shape the prefix model's
    # decoder LoRA when lm_lora_r > 0) (hub id or local folder; None = the family's default)
    hf_model_name: str | None = None
    quantization_bits: int = 4              # 4 = QLoRA (nf4, double quantization, bf16 compute), 8, or 16 (none)
    peft_module: str | None = "LoRA"        # "LoRA" | "IA3" (None only for a merged, standalone model)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list | None = None      # None: the family's default (HF_FAMILIES)
    gradient_checkpointing: bool = False
    # read from the loaded backbones when the model is built; stored so checkpoints describe themselves
    encoder_embed_dim: int | None = None
    encoder_token_dim: int | None = None       # width W of the patch tokens (encoder_features "tokens")
    lm_hidden_size: int | None = None

    def __post_init__(self):
        self.model_type = current_value("model_type", self.model_type)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {self.model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        for key, allowed in (("encoder_features", FEATURE_KINDS), ("mapper_type", MAPPER_TYPES),
                             ("encoder_type", ENCODER_TYPES), ("retrieval_template", tuple(RETRIEVAL_TEMPLATES))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        if self.model_type == "prefix" and self.encoder_features not in MAPPER_INPUTS[self.mapper_type]:
            raise ValueError(f"mapper_type {self.mapper_type!r} takes encoder_features "
                             f"{' or '.join(map(repr, MAPPER_INPUTS[self.mapper_type]))}, not {self.encoder_features!r} "
                             "(the transformer mapper takes either; the resampler needs 'tokens')")
        # bounds that keep a hand-edited or hostile config from asking for terabytes of mapper weights
        for key, (lo, hi) in CONFIG_BOUNDS.items():
            v = getattr(self, key)
            if isinstance(v, int) and not lo <= v <= hi:
                raise ValueError(f"model config {key}={v} is out of range [{lo}, {hi}]")
        for key in FRACTIONS:
            v = getattr(self, key)
            if isinstance(v, (int, float)) and not 0 <= v < 1:
                raise ValueError(f"model config {key}={v} must be in [0, 1)")

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionerConfig":
        """A config read from a file: old key names read as today's (names.py); unknown keys and values of the
        wrong type are refused (ValueError)."""
        if not isinstance(d, dict):
            raise ValueError(f"the model config must be a JSON object, got {type(d).__name__}")
        d, _ = current_names(d, "the model config")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        for key, value in d.items():
            if not _fits(value, known[key]):
                raise ValueError(f"model config {key}={value!r} is not of type {known[key]}")
        return cls(**d)


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list,)}


def _fits(value, annotation: str) -> bool:
    """Does a JSON value fit a dataclass field annotation such as "int", "str | None" or "list | None"?"""
    names = [a.strip() for a in annotation.split("|")]
    if value is None:
        return "None" in names
    if isinstance(value, bool):
        return "bool" in names
    return isinstance(value, tuple(t for n in names for t in _TYPES.get(n, ())))


# ----------------------------------------------------------------------------------------------
# what every captioner is: the interface train.py, eval.py and inference.py rely on

@dataclass(frozen=True)
class Generation:
    """Decoding settings and their defaults, for every script: train.py's evaluation, eval.py, inference.py
    and load_model_example.py. generate(**kw) checks kw against these names."""
    max_new_tokens: int = 40        # generated tokens at most (EOS ends a caption earlier)
    num_beams: int = 1              # 1 = greedy
    do_sample: bool = False         # sample instead of searching (then temperature / top_p / top_k apply)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0 = no top-k cut
    seed: int | None = None         # torch.manual_seed before decoding (reproducible sampling)
    min_new_tokens: int = 0         # no end of text before this many tokens (0: none)
    no_repeat_ngram_size: int = 0   # > 0: no n-gram of this size twice in a caption (loops like "a dog a dog a dog")
    repetition_penalty: float = 1.0  # > 1: tokens already written are less likely (CTRL's penalty; 1: off)
    length_penalty: float = 1.0     # beams: a finished caption's score is its log-probability / length ** this


# the range each decoding setting accepts, for every script's checks (inference.py's flags, serve.py's fields):
# (lowest, highest), both allowed, except top_p's 0 (it would keep no token)
GENERATION_LIMITS = {"max_new_tokens": (1, 1024), "num_beams": (1, 64), "temperature": (0.01, 100.0),
                     "top_p": (0.0, 1.0), "top_k": (0, 1_000_000), "seed": (0, 2**32 - 1), "min_new_tokens": (0, 1024),
                     "no_repeat_ngram_size": (0, 16), "repetition_penalty": (0.5, 10.0), "length_penalty": (-10.0, 10.0)}


# the settings that shape a caption beyond its length and search (Generation's last four): every script takes them
SHAPING_FIELDS = ("min_new_tokens", "no_repeat_ngram_size", "repetition_penalty", "length_penalty")


def add_shaping_arguments(ap, defaults: dict | None = None) -> None:
    """--min_new_tokens, --no_repeat_ngram_size, --repetition_penalty, --length_penalty on an argparse parser, in
    GENERATION_LIMITS' ranges; defaults: {field: value} (None: Generation's; eval.py passes None values, meaning
    "the run's own")."""
    g = Generation()
    for k in SHAPING_FIELDS:
        lo, hi = GENERATION_LIMITS[k]
        kind = int_at_least(lo, hi) if isinstance(getattr(g, k), int) else float_in(lo, hi)
        ap.add_argument(f"--{k}", type=kind, default=(defaults or {}).get(k, getattr(g, k)))


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions where mask is 1: logits (B, T, V) predict targets (B, T).
    Padding (and any prefix) carries mask 0, which is the same as a label of -100."""
    labels = targets.masked_fill(mask == 0, -100)                                     # (B, T)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class Captioner(nn.Module, ABC):
    """The shape a capkit model fills in. A third model type subclasses this, gets a model_type in
    CaptionerConfig and a branch in build_model; the scripts need nothing else.

    Attributes: config (CaptionerConfig, saved in every checkpoint), tokenizer, preprocess (PIL image ->
    (3, S, S) tensor), supports_feature_cache (True when the image side is frozen, so features.py may
    compute its output once per image and pass image_embeds instead of pixel_values)."""
    supports_feature_cache = False
    config: CaptionerConfig

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates (and what a training state saves)."""

    @abstractmethod
    def tokenize(self, captions, max_length: int) -> dict[str, torch.Tensor]:
        """captions -> {"input_ids", "attention_mask"} (B, T), right-padded, the form forward() takes."""

    @abstractmethod
    def loss_tokens(self, attention_mask: torch.Tensor) -> int:
        """How many tokens forward()'s mean loss is taken over, for a batch of tokenize()'s output."""

    @abstractmethod
    def forward(self, input_ids, attention_mask, pixel_values=None, image_embeds=None):
        """-> (logits, loss): loss = masked_cross_entropy over the caption's tokens (padding excluded)."""

    @abstractmethod
    def generate(self, pixel_values=None, image_embeds=None, stop=None, **generation) -> list[str]:
        """One caption per image; generation: the fields of Generation. stop: a callable; once it returns
        True, decoding ends after the current step (serve.py, when every client of the batch has gone)."""

    @abstractmethod
    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write the trainable weights + the config that rebuilds the rest (load_captioner reads it)."""

    @abstractmethod
    def caption_positions(self) -> int | None:
        """How many tokens a caption can take: the decoder's positions less those its inputs use before the
        caption (None: its config states no limit). Longer captions are truncated by tokenize()."""

    def generation(self, generation: dict) -> Generation:
        """generate()'s keyword arguments as a Generation; ConfigError for a max_new_tokens beyond
        caption_positions() (GPT-2, GIT and BLIP would fail deep in generation, the others drift)."""
        g, limit = Generation(**generation), self.caption_positions()
        if g.min_new_tokens > g.max_new_tokens:
            raise ConfigError(f"min_new_tokens={g.min_new_tokens} is more than max_new_tokens={g.max_new_tokens}")
        if limit is not None and g.max_new_tokens > limit:
            raise ConfigError(f"max_new_tokens={g.max_new_tokens} is more than this model can generate: its decoder "
                              f"has room for captions of at most {limit} tokens (max_position_embeddings, less the "
                              f"positions before the caption). Use max_new_tokens={limit} or less")
        return g

    def caption_length(self, max_length: int) -> int:
        """What tokenize() cuts a caption to: max_length, or fewer when the decoder's positions hold fewer."""
        return min(max_length, self.caption_positions() or max_length)
