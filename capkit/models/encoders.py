"""
Frozen image encoders behind one interface: build_image_encoder(cfg) -> (ImageEncoder, preprocess).

    encoder_type    encoder_name                          encoder_pretrained
    "open_clip"     ViT-B-32 | hf-hub:org/repo | local-dir:  pretrained tag | weights file | None
    "timm"          a timm name (efficientnet_lite0) or a     a weights file (.safetensors / .pth state dict)
                    folder with timm's config.json + weights   | None (the folder's weights, or timm's hub ones)
    "hf"            a transformers vision model: hub id or    (unused)
                    save_pretrained folder (CLIPVisionModel,
                    SiglipVisionModel, Dinov2Model, ...)

Every encoder gives, for pixels (B, 3, S, S) from its own preprocess:
  pooled(x) -> (B, E)      one vector per image (CLIP's embedding, a CNN's global average pool, a ViT's CLS)
  tokens(x) -> (B, N, W)   a ViT's patch tokens, or a CNN's feature map flattened to H*W tokens
and forward(x) returns the one of them its `features` names. `layer` picks which block's tokens (-1: the
encoder's final features, as the library's forward_features / last_hidden_state give them; -2: the block
before, as LLaVA takes). `contrastive` says whether the pooled vector was trained against text (CLIP,
SigLIP): only then is it L2-normalised and only then does CLIPScore mean anything.
"""
from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants as hfc
import open_clip
import timm
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

from capkit.errors import ConfigError, HubUnavailableError, RefusedFileError
from capkit.files import check_model_folder, read_json, torch_load
from capkit.hub import first_line, from_pretrained, hub_or_cache, resolve_local_path

ENCODER_TYPES = ("open_clip", "timm", "hf")
FEATURE_KINDS = ("pooled", "tokens")
# (inclusive) tokens of which block: the last 64 at most; the input size a config may ask the encoder for
ENCODER_BOUNDS = {"encoder_layer": (-64, -1), "encoder_image_size": (16, 4096)}
TIMM_CONFIG = "config.json"           # a timm model folder (timm.models.save_for_hf): architecture + preprocessing
TIMM_WEIGHTS = "model.safetensors"
CONTRASTIVE_HF_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")


class ImageEncoder(nn.Module):
    """A frozen image encoder. Subclasses fill in pooled() and tokens(); dims are read from one forward."""
    kind = "?"
    contrastive = False

    def __init__(self, features: str = "pooled", layer: int = -1, image_size: int = 224):
        super().__init__()
        if features not in FEATURE_KINDS:
            raise ValueError(f"unknown image features {features!r}; expected one of {', '.join(FEATURE_KINDS)}")
        self.features, self.layer, self.image_size = features, layer, image_size

    def pooled(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, E)
        raise NotImplementedError

    def tokens(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, N, W)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x) if self.features == "tokens" else self.pooled(x)

    @torch.no_grad()
    def feature_dims(self) -> tuple[int, tuple[int, ...]]:
        """-> (pooled width E, shape of one image's features: (E,) or (N, W)), from a forward of zeros."""
        p = next(self.parameters())
        x = torch.zeros(1, 3, self.image_size, self.image_size, dtype=p.dtype, device=p.device)
        embed_dim = int(self.pooled(x).shape[-1])
        return embed_dim, ((embed_dim,) if self.features == "pooled" else tuple(self.tokens(x).shape[1:]))


def flatten_map(x: torch.Tensor) -> torch.Tensor:
    """A CNN feature map (B, C, H, W) -> (B, H*W, C) tokens; tokens (B, N, W) pass through."""
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


# ---------------------------------------------------------------------------------------------- open_clip

class OpenClipEncoder(ImageEncoder):
    """An open_clip visual tower. pooled: the CLIP image embedding; tokens: a ViT's patch tokens (after its
    final LayerNorm for layer -1). ResNet towers have no tokens (ConfigError)."""
    kind, contrastive = "open_clip", True

    def __init__(self, visual: nn.Module, features: str = "pooled", layer: int = -1, name: str = "?"):
        size = getattr(visual, "image_size", 224)
        super().__init__(features, layer, size[0] if isinstance(size, (tuple, list)) else int(size))
        self.visual = visual
        if features == "tokens" and not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ConfigError(f"encoder_features='tokens' needs a ViT image encoder (open_clip VisionTransformer); "
                              f"{name!r} is a {type(visual).__name__}, which has no patch tokens. Use "
                              "encoder_features='pooled' (with mapper_type mlp, linear or transformer), a ViT-* encoder, "
                              "or encoder_type='timm' (a CNN's feature map becomes tokens).")

    def pooled(self, x):
        return self.visual(x)

    def tokens(self, x):
        if self.layer == -1:
            self.visual.output_tokens = True  # its forward then returns (pooled, tokens)
            try:
                return self.visual(x)[1]
            finally:
                self.visual.output_tokens = False
        out = self.visual.forward_intermediates(x, indices=[self.layer], intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]


def load_clip(cfg):
    """The whole open_clip model named by cfg (both towers) -> (model, eval preprocess, the name to
    give open_clip.get_tokenizer). Hub ids, local weights files and local open_clip folders."""
    name, pretrained, local = _clip_source(cfg)
    needs_hub = local is None and (name.startswith("hf-hub:") or bool(pretrained))

    def create(offline: bool):
        if offline:  # open_clip logs its own ERROR line before raising; hub_or_cache says it better
            logging.disable(logging.ERROR)
        try:
            return open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                         force_image_size=cfg.encoder_image_size)
        finally:
            if offline:
                logging.disable(logging.NOTSET)
    try:
        model, _, preprocess = hub_or_cache(
            create, f"the CLIP image encoder {cfg.encoder_name!r} (pretrained={cfg.encoder_pretrained!r})",
            "set `encoder_pretrained` to a local weights file (e.g. --encoder_pretrained=/path/ViT-B-32.pt), "
            "or `encoder_name` to 'local-dir:/path' (a folder with open_clip_config.json + weights).",
        ) if needs_hub else create(False)
    except HubUnavailableError:
        raise
    except Exception as e:  # open_clip wraps its failures in RuntimeError / FileNotFoundError / ValueError
        if local is not None:
            raise RefusedFileError(f"the CLIP encoder {local} can't be loaded by open_clip "
                                   f"({type(e).__name__}: {first_line(e)})") from None
        raise ConfigError(f"encoder_name={cfg.encoder_name!r} / encoder_pretrained={cfg.encoder_pretrained!r}: "
                          f"open_clip can't build it ({type(e).__name__}: {first_line(e)})") from None
    return model, preprocess, name


def _clip_source(cfg) -> tuple[str, str | None, Path | None]:
    """-> (name, pretrained) to give open_clip, and the local folder or weights file they come from (None:
    the hub or open_clip's built-in configs). Local weights that would run code are refused here, first."""
    name, pretrained = cfg.encoder_name, cfg.encoder_pretrained
    folder = resolve_local_path(name.removeprefix("local-dir:"))
    if folder is not None and folder.is_dir():
        check_model_folder(folder, "CLIP folder")  # its weights file is refused if it would run code
        return f"local-dir:{folder}", None, folder
    if name.startswith("local-dir:"):
        raise ConfigError(f"encoder_name {cfg.encoder_name!r}: no such folder")
    weights = resolve_local_path(pretrained) if pretrained else None
    if weights is None:
        return name, pretrained, None
    if not weights.is_file():
        raise ConfigError(f"encoder_pretrained {cfg.encoder_pretrained!r} is not a file (a weights file is expected)")
    if weights.suffix != ".safetensors":
        torch_load(weights, "encoder_pretrained: the CLIP weights file")  # refused in capkit's words if it would run code
    return name, str(weights), weights


def build_open_clip(cfg):
    model, preprocess, _ = load_clip(cfg)
    return OpenClipEncoder(model.visual, cfg.encoder_features, cfg.encoder_layer, cfg.encoder_name), preprocess


# ---------------------------------------------------------------------------------------------- timm

class TimmEncoder(ImageEncoder):
    """A timm model without its classifier. pooled: forward_head(pre_logits) (a CNN's global average pool);
    tokens: forward_features (layer -1) or forward_intermediates' block `layer`, a feature map flattened to
    H*W tokens; a ViT's class / register tokens are dropped."""
    kind = "timm"

    def __init__(self, model: nn.Module, features: str = "pooled", layer: int = -1, image_size: int = 224):
        super().__init__(features, layer, image_size)
        # a CNN runs in channels-last layout: EfficientNet-Lite0 on a 2-core CPU takes 1.4 s instead of 2.9 s
        # for 64 images (depthwise convolutions), and GPU convolutions prefer it too; a ViT has one conv
        self.memory_format = torch.channels_last if is_cnn(model) else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)

    def pooled(self, x):
        x = x.contiguous(memory_format=self.memory_format)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def tokens(self, x):
        x = x.contiguous(memory_format=self.memory_format)
        if self.layer == -1:
            h = self.model.forward_features(x)
            return flatten_map(h[:, getattr(self.model, "num_prefix_tokens", 0):] if h.ndim == 3 else h)
        return flatten_map(self.model.forward_intermediates(x, indices=[self.layer], intermediates_only=True)[0])


def is_cnn(model: nn.Module) -> bool:
    """More than one 2-d convolution (a ViT has only its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def _timm_weights(path: Path) -> dict:
    """A state dict from a .safetensors file, or a torch file that holds no code (weights_only)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise RefusedFileError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    sd = torch_load(path, "encoder_pretrained: the encoder weights file")
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RefusedFileError(f"{path} is not a state dict (a mapping of names to tensors)")
    return sd


def build_timm(cfg):
    name, folder = cfg.encoder_name, resolve_local_path(cfg.encoder_name)
    kw, weights = {}, resolve_local_path(cfg.encoder_pretrained) if cfg.encoder_pretrained else None
    if cfg.encoder_pretrained and (weights is None or not weights.is_file()):
        raise ConfigError(f"encoder_pretrained {cfg.encoder_pretrained!r}: no such weights file")
    if folder is not None and folder.is_dir():  # timm's own folder layout (save_for_hf)
        check_model_folder(folder, "timm encoder folder")
        if not (folder / TIMM_CONFIG).is_file():
            raise RefusedFileError(f"{folder} is not a timm model folder (no {TIMM_CONFIG}); write one with "
                                   "timm.models.save_for_hf or python -m tools.demo_assets --real-encoder")
        c = read_json(folder / TIMM_CONFIG, "timm config", RefusedFileError)
        if not isinstance(c, dict) or not isinstance(c.get("architecture"), str):
            raise RefusedFileError(f"{folder / TIMM_CONFIG}: no 'architecture' (a timm model name)")
        name = c["architecture"]
        kw = {"num_classes": c.get("num_classes", 1000), "pretrained_cfg_overlay": c.get("pretrained_cfg") or {},
              **(c.get("model_args") or {})}
        weights = weights or folder / TIMM_WEIGHTS
        if not weights.is_file():
            raise RefusedFileError(f"{folder}: no {TIMM_WEIGHTS} beside {TIMM_CONFIG}")
    try:
        if weights is not None:
            model = timm.create_model(name, pretrained=False, **kw)
        else:  # timm's own pretrained weights, from the hub or its cache
            model = hub_or_cache(lambda offline: _timm_from_hub(name, offline), f"the timm encoder {name!r}",
                                 "set `encoder_pretrained` to a local weights file, or `encoder_name` to a folder "
                                 "(python -m tools.demo_assets --real-encoder writes one).")
    except (HubUnavailableError, RefusedFileError):
        raise
    except Exception as e:  # an unknown name, bad model_args
        raise ConfigError(f"encoder_name={cfg.encoder_name!r} (encoder_type 'timm'): timm can't build it "
                          f"({type(e).__name__}: {first_line(e)})") from None
    if weights is not None:
        try:
            model.load_state_dict(_timm_weights(weights), strict=True)
        except RuntimeError as e:
            raise RefusedFileError(f"{weights}: its weights don't fit timm's {name} ({first_line(e)})") from None
    data_cfg = resolve_data_config({}, model=model)
    if cfg.encoder_image_size:
        data_cfg["input_size"] = (3, cfg.encoder_image_size, cfg.encoder_image_size)
    enc = TimmEncoder(model.eval(), cfg.encoder_features, cfg.encoder_layer, data_cfg["input_size"][-1])
    return enc, create_transform(**data_cfg, is_training=False)


def _timm_from_hub(name: str, offline: bool):
    """timm's pretrained weights through huggingface_hub (from its cache alone when offline)."""
    was = hfc.HF_HUB_OFFLINE
    hfc.HF_HUB_OFFLINE = hfc.HF_HUB_OFFLINE or offline
    try:
        return timm.create_model(name, pretrained=True)
    finally:
        hfc.HF_HUB_OFFLINE = was


# ---------------------------------------------------------------------------------------------- transformers

class ImageProcessorTransform:
    """PIL image -> (3, S, S) pixel tensor with a transformers image processor (picklable, for DataLoader workers)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:  # part of the feature cache's key
        return f"ImageProcessorTransform({self.image_processor.to_json_string()})"


class HFVisionEncoder(ImageEncoder):
    """A transformers vision model (CLIPVisionModel, SiglipVisionModel, Dinov2Model, ...). pooled: its
    pooler_output; tokens: last_hidden_state (layer -1) or hidden_states[layer], the class token dropped."""
    kind = "hf"

    def __init__(self, model: nn.Module, features: str = "pooled", layer: int = -1):
        c = model.config
        super().__init__(features, layer, int(c.image_size))
        self.model = model
        self.contrastive = c.model_type in CONTRASTIVE_HF_TYPES
        self.num_patches = (int(c.image_size) // int(c.patch_size)) ** 2

    def pooled(self, x):
        return self.model(pixel_values=x).pooler_output

    def tokens(self, x):
        out = self.model(pixel_values=x, output_hidden_states=self.layer != -1)
        h = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]   # (B, prefix + N, W)
        return h[:, h.shape[1] - self.num_patches:]


def build_hf_vision(cfg):
    conf = from_pretrained(transformers.AutoConfig, cfg.encoder_name, "vision model config", "encoder_name")
    kind = conf.model_type.removesuffix("_vision_model")
    cls = {"clip": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel}.get(
        kind, transformers.AutoModel)  # (a whole CLIP / SigLIP checkpoint: its vision tower alone)
    model = from_pretrained(cls, cfg.encoder_name, "vision model", "encoder_name")
    if not hasattr(model.config, "image_size") or not hasattr(model.config, "patch_size"):
        raise ConfigError(f"encoder_name={cfg.encoder_name!r} (encoder_type 'hf') is a {type(model).__name__}, "
                          "not a ViT-style vision model (CLIPVisionModel, SiglipVisionModel, Dinov2Model, ...)")
    proc = from_pretrained(transformers.AutoImageProcessor, cfg.encoder_name, "image processor", "encoder_name")
    return HFVisionEncoder(model.eval(), cfg.encoder_features, cfg.encoder_layer), ImageProcessorTransform(proc)


# ---------------------------------------------------------------------------------------------- the factory

BUILDERS = {"open_clip": build_open_clip, "timm": build_timm, "hf": build_hf_vision}


def build_image_encoder(cfg) -> tuple[ImageEncoder, object]:
    """The one factory for image encoders: cfg.encoder_type -> (frozen ImageEncoder, eval preprocess)."""
    if cfg.encoder_type not in BUILDERS:
        raise ConfigError(f"unknown encoder_type {cfg.encoder_type!r}; expected one of {', '.join(ENCODER_TYPES)}")
    enc, preprocess = BUILDERS[cfg.encoder_type](cfg)
    return enc.requires_grad_(False).eval(), preprocess
