"""
capkit's captioners, behind one interface (Captioner: tokenize, forward -> (logits, loss), generate,
save_checkpoint; a third model type fills in the same methods):

- model_type "clip_mlp" (ClipCaptioner): frozen CLIP image encoder -> trainable MLP -> frozen decoder LM.
  The image embedding (B, E) is mapped by the projector to `proj_prefix_length` vectors in the
  decoder's embedding space (B, P, H); those are prepended to the caption's token embeddings and
  the frozen decoder is trained (through the projector only) to continue with the caption + EOS.
- model_type "git" / "blip" (HFCaptioner): microsoft/git-* or Salesforce/blip-image-captioning-*
  fine-tuned through PEFT adapters (LoRA or IA3), optionally on a 4- or 8-bit quantized base (QLoRA).

    from model import CaptionerConfig, build_model, load_captioner
    model = build_model(CaptionerConfig())                          # downloads on first use
    model = build_model(CaptionerConfig(model_type="git", quantization_bits=4))
    model = load_captioner("saved_models/model_state_dict_....pth")  # or an adapter_... folder
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, GenerationConfig

from checkpoints import MERGED_METADATA, metadata_name, stem_of
from common import atomic_folder, atomic_torch_save, atomic_write_json, load_all
from encoders import (ENCODER_TYPES, FEATURE_KINDS, ImageEncoder, ImageProcessorTransform, OpenClipEncoder,
                      build_image_encoder)
from errors import ConfigError, HubUnavailableError, MissingInputError, RefusedFileError
from pretrained import first_line, from_pretrained
from retrieval import PROMPT_HEAD, PROMPT_SEP, PROMPT_TAIL, Datastore, open_datastore
from safeio import check_model_folder, plain_name, read_json, torch_load

CHECKPOINT_FORMAT = "capkit.clip_mlp.v1"
HF_CHECKPOINT_FORMAT = "capkit.hf.v1"
HF_CONFIG_FILE = "capkit_config.json"  # in an adapter or merged-model folder: what rebuilds it
MODEL_TYPES = ("clip_mlp", "git", "blip")
CLIP_FEATURES = FEATURE_KINDS
# each mapping network (build_projector) and the image features it takes (clip_features)
PROJECTOR_INPUTS = {"mlp": ("pooled",), "linear": ("pooled",), "transformer": ("pooled", "tokens"),
                    "resampler": ("tokens",)}
PROJECTOR_TYPES = tuple(PROJECTOR_INPUTS)
RETRIEVAL_K_MAX = 16            # retrieved captions in a prompt at most
RETRIEVAL_CAPTION_TOKENS = 24   # each retrieved caption is cut to this many tokens in the prompt


# ----------------------------------------------------------------------------------------------
# config

@dataclass
class CaptionerConfig:
    model_type: str = "clip_mlp"
    # image encoder (encoders.py): encoder_type "open_clip" (a built-in name + pretrained tag or weights file,
    # "hf-hub:org/repo", or "local-dir:/path"), "timm" (a timm name + weights file, or a timm folder) or "hf"
    # (a transformers vision model: hub id or save_pretrained folder)
    encoder_type: str = "open_clip"
    clip_model_name: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    clip_image_size: int | None = None      # None: the encoder's native input size
    clip_normalize: bool = True             # L2-normalise the pooled embedding (contrastive encoders only: CLIP, SigLIP)
    clip_features: str = "pooled"           # "pooled": one embedding (E) per image | "tokens": a ViT's patch tokens
                                            #   or a CNN's H*W feature map (N x W), for the transformer / resampler
    encoder_layer: int = -1                 # tokens of this block (-1: the final features; -2: the one before)
    retrieval_k: int = 0                    # > 0: the captions of the k nearest datastore images (retrieval.py) are
                                            #   a text prompt before the image prefix (SmallCap's idea)
    # projector ("mapping network"): image features -> prefix_length x decoder hidden size (P x H)
    proj_type: str = "mlp"                  # PROJECTOR_TYPES: "mlp" | "linear" | "transformer" | "resampler"
    proj_prefix_length: int = 10
    proj_hidden_dim: int = 2048             # mlp: hidden width; transformer / resampler: feed-forward width
    proj_dropout: float = 0.0
    proj_num_layers: int = 8                # transformer / resampler blocks (ClipCap's mapper: 8)
    proj_num_heads: int = 8                 # attention heads (must divide the decoder's hidden size)
    # decoder (transformers AutoModelForCausalLM): hub id or local save_pretrained folder
    lm_name: str = "Qwen/Qwen3-0.6B-Base"
    lm_tokenizer_name: str | None = None    # None: same as lm_name
    lm_dtype: str = "auto"                  # auto: bfloat16 on CUDA, float32 elsewhere
    # GIT / BLIP: a whole captioning model (hub id or local folder; None = the family's default)
    hf_model_name: str | None = None
    quantization_bits: int = 4              # 4 = QLoRA (nf4, double quantization, bf16 compute), 8, or 16 (none)
    peft_module: str | None = "LoRA"        # "LoRA" | "IA3" (None only for a merged, standalone model)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list | None = None      # None: the family's default (HF_FAMILIES)
    gradient_checkpointing: bool = False
    # read from the loaded backbones when the model is built; stored so checkpoints describe themselves
    clip_embed_dim: int | None = None
    clip_token_dim: int | None = None       # width W of the patch tokens (clip_features "tokens")
    lm_hidden_size: int | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {self.model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        for key, allowed in (("clip_features", CLIP_FEATURES), ("proj_type", PROJECTOR_TYPES),
                             ("encoder_type", ENCODER_TYPES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        if self.model_type == "clip_mlp" and self.clip_features not in PROJECTOR_INPUTS[self.proj_type]:
            raise ValueError(f"proj_type {self.proj_type!r} takes clip_features "
                             f"{' or '.join(map(repr, PROJECTOR_INPUTS[self.proj_type]))}, not {self.clip_features!r} "
                             "(the transformer mapper takes either; the resampler needs 'tokens')")
        # bounds that keep a hand-edited or hostile config from asking for terabytes of projector weights
        for key, lo, hi in (("proj_prefix_length", 1, 1024), ("proj_hidden_dim", 1, 65536), ("lora_r", 1, 4096),
                            ("retrieval_k", 0, RETRIEVAL_K_MAX), ("encoder_layer", -64, -1),
                            ("proj_num_layers", 1, 64), ("proj_num_heads", 1, 256)):
            v = getattr(self, key)
            if isinstance(v, int) and not lo <= v <= hi:
                raise ValueError(f"model config {key}={v} is out of range [{lo}, {hi}]")
        for key in ("proj_dropout", "lora_dropout"):
            v = getattr(self, key)
            if isinstance(v, (int, float)) and not 0 <= v < 1:
                raise ValueError(f"model config {key}={v} must be in [0, 1)")

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionerConfig":
        """A config read from a file: unknown keys and values of the wrong type are refused (ValueError)."""
        if not isinstance(d, dict):
            raise ValueError(f"the model config must be a JSON object, got {type(d).__name__}")
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


def build_model(config: CaptionerConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The one switch on model_type: ClipCaptioner for "clip_mlp", HFCaptioner for "git" / "blip";
    returned on `device` (quantized models are loaded straight onto it)."""
    if config.model_type == "clip_mlp":
        return ClipCaptioner.from_config(config, device).to(device)
    return HFCaptioner.from_config(config, device)


# ----------------------------------------------------------------------------------------------
# projector

def build_projector(cfg: CaptionerConfig) -> nn.Module:
    """The one factory for mapping networks: image features -> prefix (B, P, H), or (B, P * H) for mlp /
    linear (reshaped by ClipCaptioner.prefix_embeds). Input: the pooled embedding (B, E) or, with
    clip_features="tokens", the patch tokens (B, N, W). Dims come from the loaded backbones."""
    if cfg.clip_embed_dim is None or cfg.lm_hidden_size is None:
        raise ValueError("build_projector needs clip_embed_dim and lm_hidden_size (set when the backbones load)")
    tokens = cfg.clip_features == "tokens"
    if tokens and cfg.clip_token_dim is None:
        raise ValueError("build_projector needs clip_token_dim for clip_features='tokens'")
    d_in, H, P = (cfg.clip_token_dim if tokens else cfg.clip_embed_dim), cfg.lm_hidden_size, cfg.proj_prefix_length
    if cfg.proj_type in ("transformer", "resampler") and H % cfg.proj_num_heads:
        # ConfigError (a ValueError): known only once the decoder has loaded, and train.py must end in one sentence
        raise ConfigError(f"proj_num_heads={cfg.proj_num_heads} must divide the decoder's hidden size {H}")
    if cfg.proj_type == "linear":
        return nn.Linear(d_in, P * H)
    if cfg.proj_type == "mlp":
        return nn.Sequential(
            nn.Linear(d_in, cfg.proj_hidden_dim),
            nn.GELU(),
            nn.Dropout(cfg.proj_dropout),
            nn.Linear(cfg.proj_hidden_dim, P * H),
        )
    if cfg.proj_type == "transformer":
        return TransformerMapper(d_in, H, P, cfg, tokens)
    if cfg.proj_type == "resampler":
        return Resampler(d_in, H, P, cfg)
    raise ValueError(f"unknown proj_type {cfg.proj_type!r}; expected one of {', '.join(PROJECTOR_TYPES)}")


def _encoder(width: int, cfg: CaptionerConfig, cross: bool) -> nn.Module:
    """cfg.proj_num_layers pre-norm blocks of width `width`: self-attention (+ cross-attention to the
    image when `cross`) + a GELU feed-forward of proj_hidden_dim."""
    kw = dict(d_model=width, nhead=cfg.proj_num_heads, dim_feedforward=cfg.proj_hidden_dim, dropout=cfg.proj_dropout,
              activation="gelu", batch_first=True, norm_first=True)
    if cross:
        return nn.TransformerDecoder(nn.TransformerDecoderLayer(**kw), cfg.proj_num_layers, norm=nn.LayerNorm(width))
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), cfg.proj_num_layers, norm=nn.LayerNorm(width),
                                 enable_nested_tensor=False)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapping network (Mokady et al. 2021): the image features become a few
    tokens (the pooled embedding (B, E) -> P tokens through one Linear; or the patch tokens (B, N, W),
    each through a Linear), P learned constant queries are appended, a transformer encoder mixes them,
    and its outputs at the query positions are the prefix (B, P, H). Width: the decoder's H."""

    def __init__(self, d_in: int, H: int, P: int, cfg: CaptionerConfig, tokens: bool):
        super().__init__()
        self.tokens, self.P, self.H = tokens, P, H
        self.inp = nn.Linear(d_in, H if tokens else P * H)
        # unit-scale queries, as ClipCap's: at 0.02 the first block's output swamps them in the residual stream,
        # every query then carries the same content (measured on scenes: the mappers fell below the MLP)
        self.queries = nn.Parameter(torch.randn(P, H))
        self.encoder = _encoder(H, cfg, cross=False)
        self.out = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        img = self.inp(x) if self.tokens else self.inp(x).view(B, self.P, self.H)      # (B, N or P, H)
        h = self.encoder(torch.cat([img, self.queries.expand(B, -1, -1)], dim=1))      # (B, N + P, H)
        return self.out(h[:, -self.P:])                                                 # (B, P, H)


class Resampler(nn.Module):
    """K = P learned queries cross-attending to the image's patch tokens (Flamingo's Perceiver resampler,
    BLIP-2's Q-Former without its text branch): each block is self-attention among the queries,
    cross-attention to the tokens, a feed-forward. (B, N, W) -> (B, P, H), whatever N is."""

    def __init__(self, d_in: int, H: int, P: int, cfg: CaptionerConfig):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, H))
        self.queries = nn.Parameter(torch.randn(P, H))  # unit scale: see TransformerMapper
        self.blocks = _encoder(H, cfg, cross=True)
        self.out = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.inp(x)                                                            # (B, N, H)
        q = self.queries.expand(x.shape[0], -1, -1)                                     # (B, P, H)
        return self.out(self.blocks(q, memory))                                         # (B, P, H)


# ----------------------------------------------------------------------------------------------
# loading backbones (common.hub_or_cache: one clear message when the hub can't be reached)

def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """lm_dtype -> torch dtype. "auto": bf16 where the decoder will run on a GPU that has it, else fp32 (a bf16
    step on a CPU without AMX takes minutes). device=None means "the GPU if there is one"."""
    if name == "auto":
        on_gpu = device is None or torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown lm_dtype {name!r}; expected auto, float32, bfloat16 or float16") from None


def load_decoder(cfg: CaptionerConfig, device: str | torch.device | None = None):
    """transformers causal LM + tokenizer from a hub id or local folder; lm_dtype=auto is resolved for `device`."""
    lm = from_pretrained(AutoModelForCausalLM, cfg.lm_name, "decoder", "lm_name",
                         dtype=resolve_dtype(cfg.lm_dtype, device))
    tok = from_pretrained(AutoTokenizer, cfg.lm_tokenizer_name or cfg.lm_name, "tokenizer",
                          "lm_tokenizer_name" if cfg.lm_tokenizer_name else "lm_name")
    if tok.pad_token_id is None:  # padding is masked out of attention and loss; never a content token
        tok.pad_token = tok.eos_token
    return lm, tok


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


# the range each decoding setting accepts, for every script's checks (inference.py's flags, serve.py's fields):
# (lowest, highest), both allowed, except top_p's 0 (it would keep no token)
GENERATION_LIMITS = {"max_new_tokens": (1, 1024), "num_beams": (1, 64), "temperature": (0.01, 100.0),
                     "top_p": (0.0, 1.0), "top_k": (0, 1_000_000), "seed": (0, 2**32 - 1)}


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
    def generate(self, pixel_values=None, image_embeds=None, **generation) -> list[str]:
        """One caption per image; generation: the fields of Generation."""

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
        if limit is not None and g.max_new_tokens > limit:
            raise ConfigError(f"max_new_tokens={g.max_new_tokens} is more than this model can generate: its decoder "
                              f"has room for captions of at most {limit} tokens (max_position_embeddings, less the "
                              f"positions before the caption). Use max_new_tokens={limit} or less")
        return g

    def caption_length(self, max_length: int) -> int:
        """What tokenize() cuts a caption to: max_length, or fewer when the decoder's positions hold fewer."""
        return min(max_length, self.caption_positions() or max_length)


def max_positions(config) -> int | None:
    """The positions a transformers decoder was built for (GPT-2's n_positions, the others'
    max_position_embeddings; a composite config's text side), or None when it names none."""
    n = getattr(config.get_text_config(), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def never_empty(tokenizer, ends=()) -> dict:
    """generate() settings that rule out an empty caption: at the first step, no end of text and no token that
    decodes to whitespace alone (a frozen LM's likeliest start is often a line break, then <|im_end|>), and no
    special token that does not end a caption anywhere (the decoded caption would drop it). `ends`: the ids that
    end a caption besides the tokenizer's EOS and pad (GIT and BLIP end on [SEP]). Cached per tokenizer."""
    ends = frozenset({tokenizer.eos_token_id, tokenizer.pad_token_id, *ends} - {None})
    cache = tokenizer.__dict__.setdefault("_capkit_never_empty", {})
    if ends not in cache:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        special = sorted(set(tokenizer.all_special_ids) - ends)
        cache[ends] = {"begin_suppress_tokens": sorted(set(blank) | ends | set(special)),
                       "suppress_tokens": special or None}
    return cache[ends]


# ----------------------------------------------------------------------------------------------
# the main path: frozen CLIP -> trainable projector -> frozen decoder

def tokenize_captions(tok, captions, max_length: int) -> dict[str, torch.Tensor]:
    """-> input_ids, attention_mask (B, T): each caption's tokens + EOS, T = longest in batch (no BOS:
    the image prefix leads). Padding uses the tokenizer's pad id and is masked out of attention and loss."""
    ids = tok(list(captions), add_special_tokens=False)["input_ids"]
    ids = [x[: max_length - 1] + [tok.eos_token_id] for x in ids]
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


class ClipCaptioner(Captioner):
    supports_feature_cache = True  # the image side is frozen: features can be computed once (features.py)

    def __init__(self, config: CaptionerConfig, image_encoder: nn.Module, lm: nn.Module, tokenizer,
                 preprocess=None):
        super().__init__()
        self.config = config
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        # frozen towers: no gradients, always in eval mode (see train()), run under no_grad
        self.lm = lm.requires_grad_(False).eval()
        if not isinstance(image_encoder, ImageEncoder):  # a bare open_clip visual tower
            image_encoder = OpenClipEncoder(image_encoder, config.clip_features, config.encoder_layer,
                                            config.clip_model_name)
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        # what encode_images gives per image (the feature cache's row): (E,) pooled or (N, W) tokens
        config.clip_embed_dim, self.feature_shape = image_encoder.feature_dims()
        config.lm_hidden_size = int(lm.get_input_embeddings().embedding_dim)
        if config.clip_features == "tokens":
            config.clip_token_dim = self.feature_shape[-1]
        self.projector = build_projector(config)
        self.datastore: Datastore | None = None   # retrieval_k > 0: attach_datastore() before training or decoding
        self.datastore_file: str | None = None    # its file name beside the checkpoints (train.py saves it)
        if (room := self.caption_positions()) is not None and room < 2:  # not even one word and its EOS
            raise ConfigError(f"proj_prefix_length={config.proj_prefix_length}" + (
                f" and a retrieval prompt of up to {self.prompt_limit()} tokens (retrieval_k={config.retrieval_k})"
                if config.retrieval_k else "") + (" leave" if config.retrieval_k else " leaves") +
                f" no room for a caption: the decoder {config.lm_name!r} has {max_positions(lm.config)} positions")

    @classmethod
    def from_config(cls, config: CaptionerConfig, device: str | torch.device | None = None) -> "ClipCaptioner":
        (encoder, preprocess), (lm, tok) = load_all(partial(build_image_encoder, config),
                                                    partial(load_decoder, config, device))
        return cls(config, encoder, lm, tok, preprocess)

    def train(self, mode: bool = True):
        super().train(mode)
        self.image_encoder.eval()  # frozen towers keep eval behaviour (no dropout) while the MLP trains
        self.lm.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"projector.{k}": v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters())

    def tokenize(self, captions, max_length: int) -> dict[str, torch.Tensor]:
        """-> input_ids, attention_mask (B, T): caption tokens + EOS, right-padded (no BOS: the prefix leads);
        T <= max_length and what the decoder's positions hold after the prefix."""
        return tokenize_captions(self.tokenizer, captions, self.caption_length(max_length))

    def caption_positions(self) -> int | None:
        n = max_positions(self.lm.config)  # the prompt (at most prompt_limit()) and the prefix take the first ones
        return None if n is None else n - self.config.proj_prefix_length - self.prompt_limit()

    def prompt_limit(self) -> int:
        """The most tokens a retrieval prompt takes (0 without retrieval)."""
        k = self.config.retrieval_k
        if not k:
            return 0
        fixed = self.tokenizer(PROMPT_HEAD + PROMPT_SEP * (k - 1) + PROMPT_TAIL, add_special_tokens=False)["input_ids"]
        return len(fixed) + k * RETRIEVAL_CAPTION_TOKENS

    def attach_datastore(self, store: Datastore | None) -> None:
        """The datastore the retrieval prompt is read from (retrieval_k > 0); its keys must come from this encoder."""
        self.datastore = store

    def retrieval_prompt(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """-> (ids, mask) (B, L) of each image's retrieval prompt, left-padded (mask 0) so that every image's
        prefix and caption sit at the same positions; None without retrieval."""
        k = self.config.retrieval_k
        if not k:
            return None
        if self.datastore is None:
            raise ConfigError(f"this model was trained with retrieval_k={k}: it reads the captions of similar images "
                              "from a datastore, and none is attached (load_captioner finds the one saved beside the "
                              "checkpoint; --datastore DIR builds one from a folder of captioned images)")
        tok, rows = self.tokenizer, self.datastore.neighbours(feats, k).tolist()
        head, sep, tail = (tok(t, add_special_tokens=False)["input_ids"] for t in (PROMPT_HEAD, PROMPT_SEP, PROMPT_TAIL))
        caps = tok([self.datastore.captions[j][0] for row in rows for j in row], add_special_tokens=False)["input_ids"]
        seqs = []
        for b, row in enumerate(rows):
            parts = [caps[b * len(row) + i][:RETRIEVAL_CAPTION_TOKENS] for i in range(len(row))]
            seqs.append(head + [t for i, p in enumerate(parts) for t in (sep if i else []) + p] + tail)
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, L - len(s):], mask[b, L - len(s):] = torch.tensor(s), 1
        return ids.to(self.device), mask.to(self.device)

    def loss_tokens(self, attention_mask: torch.Tensor) -> int:
        return int(attention_mask.sum())  # every caption token and its EOS is predicted (from the prefix on)

    # -- pieces ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> float32 image features from the frozen encoder: the pooled embedding (B, E),
        or with clip_features="tokens" its tokens (B, N, W) (encoders.py)."""
        dtype = next(self.image_encoder.parameters()).dtype
        return self.image_encoder(pixel_values.to(self.device, dtype)).float()

    def prefix_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Image features ((B, E) pooled or (B, N, W) tokens) -> (B, P, H) prefix in the decoder's dtype."""
        x = image_embeds.to(self.device, torch.float32)
        if self.config.clip_normalize and self.config.clip_features == "pooled" and self.image_encoder.contrastive:
            x = F.normalize(x, dim=-1)
        prefix = self.projector(x)  # (B, P*H) for mlp / linear, (B, P, H) for the others
        prefix = prefix.reshape(x.shape[0], self.config.proj_prefix_length, self.config.lm_hidden_size)
        return prefix.to(self.lm.get_input_embeddings().weight.dtype)

    def lead_embeds(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder reads before the caption: [retrieval prompt] + image prefix -> embeds (B, L+P, H) and
        their attention mask (B, L+P) (0 on the prompt's left padding)."""
        prefix = self.prefix_embeds(feats)                                              # (B, P, H)
        ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        prompt = self.retrieval_prompt(feats)
        if prompt is None:
            return prefix, ones
        ids, mask = prompt                                                              # (B, L)
        return torch.cat([self.lm.get_input_embeddings()(ids), prefix], 1), torch.cat([mask, ones], 1)

    def _image_embeds(self, pixel_values, image_embeds):
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or image_embeds")
            image_embeds = self.encode_images(pixel_values)
        return image_embeds

    # -- training -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None):
        """input_ids/attention_mask (B, T): caption tokens ending in EOS, right-padded.
        Returns (logits, loss): logits (B, T, V) where logits[:, t] predicts input_ids[:, t]
        (the prefix positions produce no logits), loss = mean CE over real caption tokens + EOS.
        Equivalent to labels of -100 on the prefix and on padding."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        lead, lead_mask = self.lead_embeds(self._image_embeds(pixel_values, image_embeds))  # (B, P, H), or L+P
        tokens = self.lm.get_input_embeddings()(input_ids)                            # (B, T, H)
        inputs_embeds = torch.cat([lead, tokens], dim=1)                              # (B, P+T, H)
        mask = torch.cat([lead_mask, attention_mask], dim=1)
        P, T = lead.shape[1], input_ids.shape[1]
        # a left-padded retrieval prompt: positions count the real tokens only, as generate() counts them
        positions = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if self.config.retrieval_k else {}
        # the last prefix position predicts the first caption token; the last position predicts nothing.
        # Positions as an index tensor, not a slice: the gathered hidden states are contiguous, so the
        # vocabulary projection is one (B*T, H) x (H, V) GEMM instead of a broadcast bmm (7x slower on an H100)
        keep = torch.arange(P - 1, P - 1 + T, device=inputs_embeds.device)
        logits = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, logits_to_keep=keep,
                         use_cache=False, **positions).logits                          # (B, T, V)
        return logits, masked_cross_entropy(logits, input_ids, attention_mask)         # padding ignored

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, pixel_values=None, image_embeds=None, **generation) -> torch.Tensor:
        """Batched decoding with the decoder's KV cache; returns new token ids (B, <=max_new_tokens),
        padded with pad_token_id after EOS. generation: the fields of Generation."""
        g = self.generation(generation)
        lead, mask = self.lead_embeds(self._image_embeds(pixel_values, image_embeds))  # (B, [L+]P, H)
        sampled = {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k} if g.do_sample else \
            {"temperature": None, "top_p": None, "top_k": None}
        gen = GenerationConfig(max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, do_sample=g.do_sample,
                               eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                               bos_token_id=None, **never_empty(self.tokenizer), **sampled)
        if g.seed is not None:
            torch.manual_seed(g.seed)
        return self.lm.generate(inputs_embeds=lead, attention_mask=mask, generation_config=gen)

    def generate(self, pixel_values=None, image_embeds=None, **generation) -> list[str]:
        ids = self.generate_ids(pixel_values, image_embeds, **generation)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Only the trainable tensors + the config that rebuilds everything else."""
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "model_config": asdict(self.config),
                           "state_dict": self.trainable_state_dict(),
                           **({"datastore": self.datastore_file} if self.datastore_file else {})}, path)


# ----------------------------------------------------------------------------------------------
# the alternative path: GIT / BLIP fine-tuned through PEFT adapters (optionally on a quantized base)

HF_FAMILIES = {
    # model_type: (default hub id, transformers class, LoRA targets, IA3 targets, IA3 feed-forward targets).
    # Targets are the text side's linear layers (BERT-style names in both families); the image side
    # keeps its pretrained features, as in the seed trainers.
    "git": ("microsoft/git-base", "GitForCausalLM", ["query", "key", "value", "dense"],
            ["key", "value", "output.dense"], ["output.dense"]),
    "blip": ("Salesforce/blip-image-captioning-base", "BlipForConditionalGeneration",
             ["query", "key", "value", "dense"], ["key", "value", "output.dense"], ["output.dense"]),
}


def quantization_kwargs(bits: int) -> dict:
    """from_pretrained kwargs for bitsandbytes 4-bit (QLoRA: nf4, double quantization, bf16 compute) or 8-bit."""
    if bits == 16:
        return {}
    if bits not in (4, 8):
        raise ValueError(f"quantization_bits must be 4, 8 or 16, got {bits}")
    if bits == 4:
        return {"quantization_config": transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)}
    return {"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True)}


def load_hf_model(cfg: CaptionerConfig, source: str | None = None, device: str | torch.device = "cpu"):
    """(transformers model, processor) for cfg.model_type from a hub id or local folder, quantized as
    cfg.quantization_bits says. Where this platform can't quantize, says so in one line and goes on
    unquantized (cfg.quantization_bits is set to 16 so the checkpoint tells the truth). The model
    comes back on `device` (bitsandbytes models can't be moved after loading)."""
    default, cls_name = HF_FAMILIES[cfg.model_type][:2]
    name = source or cfg.hf_model_name or default
    what, cls = f"{cfg.model_type.upper()} model", getattr(transformers, cls_name)
    processor = from_pretrained(transformers.AutoProcessor, name, what, "hf_model_name")
    kw = {"device_map": {"": str(device)}, "dtype": resolve_dtype(cfg.lm_dtype, device)}
    try:
        model = from_pretrained(cls, name, what, "hf_model_name", **kw, **quantization_kwargs(cfg.quantization_bits))
    except (ImportError, RuntimeError, ValueError) as e:
        if cfg.quantization_bits == 16 or isinstance(e, (RefusedFileError, ConfigError, HubUnavailableError)):
            raise
        print(f"note: {cfg.quantization_bits}-bit quantization is not available here "
              f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); continuing unquantized")
        cfg.quantization_bits = 16
        model = from_pretrained(cls, name, what, "hf_model_name", **kw)
    keep_4bit_layout(model)
    return model, processor


def keep_4bit_layout(model) -> None:
    """bitsandbytes (0.49+) repacks each 4-bit weight for CPUs with AVX512-BF16 at its first forward in eval
    mode without grad. That repacked layout fails on layers narrower than one quantization block (the tiny
    demo models: "shape '[32, 0]' is invalid") and, after an evaluation, breaks the next training step (an
    in-place bias add on a leaf). Opting out keeps the portable layout; only 4-bit inference on such CPUs is
    slower. GPUs are unaffected."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def add_adapters(model, cfg: CaptionerConfig):
    """Wrap a transformers model in PEFT adapters (only they train). Quantized bases go through
    prepare_model_for_kbit_training first."""
    from peft import IA3Config, LoraConfig, get_peft_model, prepare_model_for_kbit_training
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    ckpt_kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}  # non-reentrant: no input-grad hook needed
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing, **ckpt_kw)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(**ckpt_kw)
    _, _, lora_t, ia3_t, ia3_ff = HF_FAMILIES[cfg.model_type]
    if cfg.peft_module == "LoRA":
        pcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules or lora_t, bias="none")
    elif cfg.peft_module == "IA3":
        targets = cfg.target_modules or ia3_t
        pcfg = IA3Config(target_modules=targets, feedforward_modules=[m for m in ia3_ff if m in targets])
    else:
        raise ValueError(f"unknown peft_module {cfg.peft_module!r}; expected 'LoRA' or 'IA3'")
    model = get_peft_model(model, pcfg)
    # transformers/peft hook the input embeddings to require grad (for reentrant checkpointing);
    # GIT adds position embeddings in place onto that output, which autograd refuses
    model.get_base_model().disable_input_require_grads()
    return model


class HFCaptioner(Captioner):
    """GIT or BLIP (+ PEFT adapters) behind ClipCaptioner's interface. Captions are tokenized as
    [CLS] caption [SEP] (BLIP: its [DEC] BOS instead of [CLS], as its generate() starts with)."""
    supports_feature_cache = False  # the adapters change what the image side computes

    def __init__(self, config: CaptionerConfig, model: nn.Module, processor):
        super().__init__()
        self.config, self.model, self.processor = config, model, processor
        self.tokenizer = processor.tokenizer
        self.preprocess = ImageProcessorTransform(processor.image_processor)

    @classmethod
    def from_config(cls, config: CaptionerConfig, device: str | torch.device = "cpu") -> "HFCaptioner":
        model, processor = load_hf_model(config, device=device)
        return cls(config, add_adapters(model, config), processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def tokenize(self, captions, max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(captions), padding="longest", truncation=True, return_tensors="pt",
                             max_length=self.caption_length(max_length))
        ids = enc["input_ids"]
        if self.config.model_type == "blip":
            ids[:, 0] = self.model.config.text_config.bos_token_id
        return {"input_ids": ids, "attention_mask": enc["attention_mask"]}

    def loss_tokens(self, attention_mask: torch.Tensor) -> int:
        return int(attention_mask[:, 1:].sum())  # the BOS is never predicted

    def caption_positions(self) -> int | None:
        return max_positions(self.model.config)  # [CLS] / BOS is the caption's first token; image tokens take none

    def _pixels(self, pixel_values, image_embeds):
        if image_embeds is not None or pixel_values is None:
            raise ValueError(f"{self.config.model_type} models take pixel_values (no cached image features)")
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        dtype = torch.float32 if dtype in (torch.uint8, torch.int8) else dtype
        return pixel_values.to(self.device, dtype)

    def forward(self, input_ids, attention_mask, pixel_values=None, image_embeds=None):
        """input_ids/attention_mask (B, T) from tokenize(). Returns (logits (B, T-1, V), loss) where
        logits[:, t] predicts input_ids[:, t+1] (the BOS is never predicted); loss = mean CE over the
        real text tokens after BOS, [SEP] included, padding excluded. Computed here from the logits,
        not taken from the model, so it can't inherit a library's shift bug (transformers #47394)."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        # no KV cache when scoring: with gradient checkpointing GIT would append the recomputed keys twice
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         pixel_values=self._pixels(pixel_values, image_embeds), use_cache=False)
        T = input_ids.shape[1]
        logits = out.logits[:, -T:-1]  # GIT puts the image tokens first: keep the text positions  (B, T-1, V)
        return logits, masked_cross_entropy(logits, input_ids[:, 1:], attention_mask[:, 1:])

    @torch.no_grad()
    def generate(self, pixel_values=None, image_embeds=None, **generation) -> list[str]:
        g = self.generation(generation)
        kw = {"max_new_tokens": g.max_new_tokens, "num_beams": g.num_beams, "do_sample": g.do_sample}
        if g.do_sample:
            kw.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        if g.seed is not None:
            torch.manual_seed(g.seed)
        ends = self.model.generation_config.eos_token_id
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        ids = self.model.generate(pixel_values=self._pixels(pixel_values, image_embeds), **kw,
                                  **never_empty(self.tokenizer, ends + [self.tokenizer.sep_token_id]))
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """A folder: the PEFT adapter (safetensors) + processor + capkit_config.json; written beside
        the target and renamed into place, so the folder is complete or absent."""
        write_hf_folder(path, self.model, self.processor, self.config)


def write_hf_folder(path, model, processor, cfg: CaptionerConfig) -> None:
    """model + processor (save_pretrained) + the capkit_config.json that rebuilds them, as one folder that
    is complete or absent (common.atomic_folder); an existing folder is replaced only if capkit wrote it."""
    def write(tmp: Path):
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        atomic_write_json({"format": HF_CHECKPOINT_FORMAT, "model_config": asdict(cfg)}, tmp / HF_CONFIG_FILE)
    atomic_folder(path, write, marker=HF_CONFIG_FILE)


def read_hf_config(path: Path, **config_overrides) -> CaptionerConfig:
    """The CaptionerConfig of an adapter or merged folder (its capkit_config.json), checked like any file
    from elsewhere: the folder must not ask for code, and the config must be a valid CaptionerConfig."""
    if not path.is_dir():
        raise RefusedFileError(f"{path} is not a folder: a .pth checkpoint, or an adapter_* / merged_* folder, "
                               "is expected")
    check_model_folder(path, "model folder")
    if not (path / HF_CONFIG_FILE).is_file():
        raise RefusedFileError(f"{path}: not a capkit model folder (no {HF_CONFIG_FILE})")
    saved = read_json(path / HF_CONFIG_FILE, "model folder config", RefusedFileError)
    if not isinstance(saved, dict) or saved.get("format") != HF_CHECKPOINT_FORMAT:
        raise RefusedFileError(f"{path}: not a capkit model folder (format {HF_CHECKPOINT_FORMAT} expected "
                               f"in {HF_CONFIG_FILE})")
    try:
        return CaptionerConfig.from_dict({**saved.get("model_config", {}), **config_overrides})
    except (TypeError, ValueError) as e:
        raise RefusedFileError(f"{path / HF_CONFIG_FILE}: {e}") from None


def load_hf_checkpoint(path, device="cpu", **config_overrides) -> HFCaptioner:
    """An adapter folder (base model from its config + the adapter) or a merged folder (standalone)."""
    from peft import PeftModel  # optional: only the git / blip path needs it
    path = Path(path)
    cfg = read_hf_config(path, **config_overrides)
    if (path / "adapter_config.json").exists():
        base, _ = load_hf_model(cfg, device=device)
        try:  # adapter weights: safetensors (pickles in the folder were refused above); no code runs
            model = PeftModel.from_pretrained(base, str(path), trust_remote_code=False)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise RefusedFileError(f"adapter folder {path} can't be loaded onto its base model "
                                   f"({type(e).__name__}: {first_line(e)})") from None
    else:
        model, _ = load_hf_model(cfg, source=str(path), device=device)
    processor = from_pretrained(AutoProcessor, str(path), "model folder", "checkpoint")
    return HFCaptioner(cfg, model, processor).eval()


def merge_adapter(adapter_dir, merged_dir=None, wise_alpha: float = 1.0) -> Path:
    """Fold a LoRA / IA3 adapter into an unquantized copy of its base model and save the result as a
    standalone folder (save_pretrained + processor + capkit_config.json + the training metadata).
    wise_alpha < 1 interpolates WiSE-FT style: weights = base + alpha x (fine-tuned - base)."""
    from peft import PeftModel  # optional: only the git / blip path needs it
    adapter_dir = Path(adapter_dir)
    cfg = read_hf_config(adapter_dir, quantization_bits=16, lm_dtype="float32")
    if not (adapter_dir / "adapter_config.json").exists():
        raise RefusedFileError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    base, processor = load_hf_model(cfg)  # full precision: merging into 4-bit weights would re-quantize them
    before = {k: v.detach().clone() for k, v in base.state_dict().items()} if wise_alpha < 1 else None
    merged = PeftModel.from_pretrained(base, str(adapter_dir), trust_remote_code=False).merge_and_unload()
    if before is not None:
        with torch.no_grad():
            for k, v in merged.state_dict().items():
                if v.is_floating_point():
                    v.copy_(before[k] + wise_alpha * (v - before[k]))
    stem = stem_of(adapter_dir)
    merged_dir = Path(merged_dir) if merged_dir else adapter_dir.with_name(
        f"merged_{stem}" + (f"_wise{wise_alpha:g}" if wise_alpha < 1 else ""))
    out_cfg = read_hf_config(adapter_dir, peft_module=None, quantization_bits=16)
    write_hf_folder(merged_dir, merged, processor, out_cfg)
    meta = adapter_dir.with_name(metadata_name(stem))
    if meta.exists():  # eval.py finds the dataset through it
        m = read_json(meta, "training metadata", RefusedFileError)
        m["merged"] = {"adapter": str(adapter_dir), "wise_alpha": wise_alpha}
        atomic_write_json(m, merged_dir / MERGED_METADATA)
    return merged_dir


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a capkit checkpoint without executing anything from it (weights_only=True refuses pickled code)
    and check its shape: a format tag, a model config and a dict of tensors."""
    ckpt = torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RefusedFileError(f"{path}: not a capkit checkpoint (format {CHECKPOINT_FORMAT} expected)")
    state = ckpt.get("state_dict")
    if not isinstance(ckpt.get("model_config"), dict) or not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise RefusedFileError(f"{path}: a damaged capkit checkpoint (model_config / state_dict missing or malformed)")
    return ckpt


def load_captioner(path: str | os.PathLike, device: str | torch.device = "cpu", datastore=None,
                   **config_overrides) -> nn.Module:
    """Rebuild a captioner from a checkpoint: a model_state_dict_*.pth (clip_mlp), or an adapter_*
    / merged folder (git, blip). `config_overrides` point at other copies of the backbones
    (e.g. lm_name="/data/Qwen3-0.6B-Base"); the architecture keys must match."""
    if Path(path).is_dir():
        return load_hf_checkpoint(path, device, **config_overrides)
    ckpt = read_checkpoint(path)
    try:
        cfg = CaptionerConfig.from_dict({**ckpt["model_config"], **config_overrides})
    except (TypeError, ValueError) as e:
        raise RefusedFileError(f"{path}: its model config is invalid: {e}") from None
    if cfg.model_type != "clip_mlp":
        raise RefusedFileError(f"{path}: a .pth checkpoint holds a clip_mlp model, not {cfg.model_type!r}")
    model = ClipCaptioner.from_config(cfg, device)
    saved = ckpt["model_config"]
    for k in ("clip_embed_dim", "clip_token_dim", "lm_hidden_size"):
        if saved.get(k) is not None and saved[k] != getattr(cfg, k):
            raise RefusedFileError(f"{path}: checkpoint was trained with {k}={saved[k]}, the loaded backbone has "
                                   f"{getattr(cfg, k)}")
    state = {k.removeprefix("projector."): v for k, v in ckpt["state_dict"].items()}
    try:
        model.projector.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RefusedFileError(f"{path}: its weights don't fit the projector its config describes "
                               f"({first_line(e)})") from None
    name = ckpt.get("datastore")  # (what eval.py's kNN baseline copies from, with or without retrieval)
    model.datastore_file = None if name is None else plain_name(name, f"{path}: its datastore file name")
    if cfg.retrieval_k:  # the captions it retrieves: the datastore given, else the one saved beside it
        source = datastore if datastore is not None else saved_datastore(path, model.datastore_file)
        model.attach_datastore(source if isinstance(source, Datastore) else open_datastore(model, source))
    return model.to(device).eval()


def saved_datastore(path, name: str | None) -> Path:
    """The datastore file a retrieval checkpoint names (a plain name, checked on reading), in its own folder."""
    if name is None:
        raise RefusedFileError(f"{path}: trained with retrieval but names no datastore; pass one with --datastore DIR")
    found = Path(path).parent / name
    if not found.is_file():
        raise MissingInputError(f"{path} retrieves captions from {found.name}, which is not beside it; copy it there, "
                                "or give a folder of captioned images with --datastore DIR")
    return found
