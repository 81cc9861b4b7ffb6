"""
capkit's captioner: frozen CLIP image encoder -> trainable MLP -> frozen decoder LM.

    from model import CaptionerConfig, ClipCaptioner, load_captioner
    model = ClipCaptioner.from_config(CaptionerConfig())          # downloads on first use
    model = load_captioner("saved_models/model_state_dict_....pth")  # rebuilds from the checkpoint

The image embedding (B, E) is mapped by the projector to `proj_prefix_length` vectors in the
decoder's embedding space (B, P, H); those are prepended to the caption's token embeddings and
the frozen decoder is trained (through the projector only) to continue with the caption + EOS.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_DIR = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = "capkit.clip_mlp.v1"


# ----------------------------------------------------------------------------------------------
# config

@dataclass
class CaptionerConfig:
    model_type: str = "clip_mlp"
    # image encoder (open_clip): a built-in name + pretrained tag or weights file, "hf-hub:org/repo",
    # or "local-dir:/path" (a folder with open_clip_config.json + weights)
    clip_model_name: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    clip_image_size: int | None = None      # None: the encoder's native input size
    clip_normalize: bool = True             # L2-normalise the image embedding before the projector
    # projector: image embedding (E) -> prefix_length x decoder hidden size (P x H)
    proj_type: str = "mlp"                  # "mlp" (Linear-GELU-Linear) or "linear"
    proj_prefix_length: int = 10
    proj_hidden_dim: int = 2048
    proj_dropout: float = 0.0
    # decoder (transformers AutoModelForCausalLM): hub id or local save_pretrained folder
    lm_name: str = "Qwen/Qwen3-0.6B-Base"
    lm_tokenizer_name: str | None = None    # None: same as lm_name
    lm_dtype: str = "auto"                  # auto: bfloat16 on CUDA, float32 elsewhere
    # read from the loaded backbones when the model is built; stored so checkpoints describe themselves
    clip_embed_dim: int | None = None
    lm_hidden_size: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# projector

def build_projector(cfg: CaptionerConfig) -> nn.Module:
    """Image embedding (B, E) -> (B, P * H). Dims come from the loaded backbones."""
    if cfg.clip_embed_dim is None or cfg.lm_hidden_size is None:
        raise ValueError("build_projector needs clip_embed_dim and lm_hidden_size (set when the backbones load)")
    d_in, d_out = cfg.clip_embed_dim, cfg.proj_prefix_length * cfg.lm_hidden_size
    if cfg.proj_type == "linear":
        return nn.Linear(d_in, d_out)
    if cfg.proj_type == "mlp":
        return nn.Sequential(
            nn.Linear(d_in, cfg.proj_hidden_dim),
            nn.GELU(),
            nn.Dropout(cfg.proj_dropout),
            nn.Linear(cfg.proj_hidden_dim, d_out),
        )
    raise ValueError(f"unknown proj_type {cfg.proj_type!r}; expected 'mlp' or 'linear'")


# ----------------------------------------------------------------------------------------------
# loading backbones, with one clear message when the hub can't be reached

class HubUnavailableError(RuntimeError):
    """A hub download was needed but the Hugging Face Hub is unreachable and nothing is cached."""


def resolve_local_path(path: str | os.PathLike | None) -> Path | None:
    """An existing path as given (relative to the cwd) or relative to the repo (so notebooks and
    other working directories find the shipped demo assets); None if neither exists."""
    if not path:
        return None
    p = Path(path).expanduser()
    for cand in (p, REPO_DIR / p):
        if cand.exists():
            return cand.resolve()
    return None


_HUB_ONLINE: bool | None = None


def hub_online() -> bool:
    """Can the Hugging Face Hub be reached? Checked once per process with a 3 s TCP connect, so
    an offline machine fails in seconds instead of huggingface_hub's ~30 s of retries. When it
    can't, huggingface_hub is switched to offline mode so cached files still load."""
    global _HUB_ONLINE
    if _HUB_ONLINE is None:
        import huggingface_hub.constants as hfc
        if hfc.HF_HUB_OFFLINE:
            _HUB_ONLINE = False
        elif os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
            _HUB_ONLINE = True  # can't probe through a proxy; let the hub client try
        else:
            host = urlparse(hfc.ENDPOINT).hostname or "huggingface.co"
            try:
                socket.create_connection((host, 443), timeout=3).close()
                _HUB_ONLINE = True
            except OSError:
                _HUB_ONLINE = False
        if not _HUB_ONLINE:
            hfc.HF_HUB_OFFLINE = True
            os.environ["HF_HUB_OFFLINE"] = "1"
    return _HUB_ONLINE


def _offline_message(what: str, key_hint: str) -> str:
    return (f"cannot load {what}: the Hugging Face Hub is unreachable (no network, or HF_HUB_OFFLINE=1) "
            f"and it is not in the local cache. Run once on a machine with internet access to cache it, "
            f"or {key_hint}")


def load_image_encoder(cfg: CaptionerConfig):
    """open_clip model -> (visual tower, eval preprocess, embedding dim). Only the visual tower is
    kept: the text tower is never used for captioning."""
    import open_clip
    name, pretrained = cfg.clip_model_name, cfg.clip_pretrained
    local = resolve_local_path(name[len("local-dir:"):] if name.startswith("local-dir:") else name)
    needs_hub = False
    if local is not None and local.is_dir():
        name, pretrained = f"local-dir:{local}", None
    elif name.startswith("local-dir:"):
        raise FileNotFoundError(f"clip_model_name {cfg.clip_model_name!r}: no such folder")
    elif pretrained and resolve_local_path(pretrained) is not None:
        pretrained = str(resolve_local_path(pretrained))
    else:
        needs_hub = name.startswith("hf-hub:") or bool(pretrained)
    if needs_hub:
        hub_online()
    quiet = needs_hub and not hub_online()  # open_clip logs its own ERROR line before raising; we say it better
    if quiet:
        logging.disable(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, force_image_size=cfg.clip_image_size)
    except Exception:  # open_clip wraps hub failures in RuntimeError/FileNotFoundError
        if needs_hub and not hub_online():
            raise HubUnavailableError(_offline_message(
                f"the CLIP image encoder {cfg.clip_model_name!r} (pretrained={cfg.clip_pretrained!r})",
                "set `clip_pretrained` to a local weights file (e.g. --clip_pretrained=/path/ViT-B-32.pt), "
                "or `clip_model_name` to 'local-dir:/path' (a folder with open_clip_config.json + weights).",
            )) from None
        raise
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    visual = model.visual
    embed_dim = getattr(visual, "output_dim", None)
    if embed_dim is None:
        with torch.no_grad():
            size = preprocess.transforms[0].size if hasattr(preprocess, "transforms") else 224
            size = size if isinstance(size, int) else size[0]
            embed_dim = visual(torch.zeros(1, 3, size, size)).shape[-1]
    return visual, preprocess, int(embed_dim)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown lm_dtype {name!r}; expected auto, float32, bfloat16 or float16") from None


def load_decoder(cfg: CaptionerConfig):
    """transformers causal LM + tokenizer from a hub id or local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = []
    for what, name, cls, kw in (
        ("decoder", cfg.lm_name, AutoModelForCausalLM, {"dtype": resolve_dtype(cfg.lm_dtype)}),
        ("tokenizer", cfg.lm_tokenizer_name or cfg.lm_name, AutoTokenizer, {}),
    ):
        local = resolve_local_path(name)
        src = str(local) if local is not None else name
        offline = local is None and not hub_online()
        try:
            out.append(cls.from_pretrained(src, local_files_only=offline, **kw))
        except OSError:
            if offline:
                key = "lm_name" if what == "decoder" else "lm_tokenizer_name"
                raise HubUnavailableError(_offline_message(
                    f"the {what} {name!r}",
                    f"set `{key}` to a local folder written by save_pretrained (e.g. --{key}=/path/to/Qwen3-0.6B-Base).",
                )) from None
            raise
    lm, tok = out
    if tok.pad_token_id is None:  # padding is masked out of attention and loss; never a content token
        tok.pad_token = tok.eos_token
    return lm, tok


# ----------------------------------------------------------------------------------------------
# the captioner

class ClipCaptioner(nn.Module):
    def __init__(self, config: CaptionerConfig, image_encoder: nn.Module, lm: nn.Module, tokenizer,
                 preprocess=None, clip_embed_dim: int | None = None):
        super().__init__()
        self.config = config
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        # frozen towers: no gradients, always in eval mode (see train()), run under no_grad
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        self.lm = lm.requires_grad_(False).eval()
        config.clip_embed_dim = int(clip_embed_dim or getattr(image_encoder, "output_dim"))
        config.lm_hidden_size = int(lm.get_input_embeddings().embedding_dim)
        self.projector = build_projector(config)

    @classmethod
    def from_config(cls, config: CaptionerConfig) -> "ClipCaptioner":
        problems = []
        try:
            encoder, preprocess, embed_dim = load_image_encoder(config)
        except HubUnavailableError as e:
            problems.append(str(e))
        try:
            lm, tok = load_decoder(config)
        except HubUnavailableError as e:
            problems.append(str(e))
        if problems:
            raise HubUnavailableError("\n".join(problems))
        return cls(config, encoder, lm, tok, preprocess, embed_dim)

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

    # -- pieces ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, E) float32 image embeddings from the frozen encoder."""
        dtype = next(self.image_encoder.parameters()).dtype
        return self.image_encoder(pixel_values.to(self.device, dtype)).float()

    def prefix_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, P, H) prefix in the decoder's embedding dtype."""
        x = image_embeds.to(self.device, torch.float32)
        if self.config.clip_normalize:
            x = F.normalize(x, dim=-1)
        prefix = self.projector(x)  # (B, P*H)
        prefix = prefix.view(x.shape[0], self.config.proj_prefix_length, self.config.lm_hidden_size)
        return prefix.to(self.lm.get_input_embeddings().weight.dtype)

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
        prefix = self.prefix_embeds(self._image_embeds(pixel_values, image_embeds))   # (B, P, H)
        tokens = self.lm.get_input_embeddings()(input_ids)                            # (B, T, H)
        inputs_embeds = torch.cat([prefix, tokens], dim=1)                            # (B, P+T, H)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        T = input_ids.shape[1]
        # the last prefix position predicts the first caption token; the last position predicts nothing
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, logits_to_keep=T + 1, use_cache=False)
        logits = out.logits[:, :-1]                                                   # (B, T, V)
        labels = input_ids.masked_fill(attention_mask == 0, -100)                     # padding ignored
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, pixel_values=None, image_embeds=None, max_new_tokens: int = 40, num_beams: int = 1,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None) -> torch.Tensor:
        """Batched decoding with the decoder's KV cache; returns new token ids (B, <=max_new_tokens),
        padded with pad_token_id after EOS."""
        from transformers import GenerationConfig
        prefix = self.prefix_embeds(self._image_embeds(pixel_values, image_embeds))   # (B, P, H)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
            temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, bos_token_id=None,
        )
        if seed is not None:
            torch.manual_seed(seed)
        return self.lm.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=gen)

    def generate(self, pixel_values=None, image_embeds=None, **kw) -> list[str]:
        ids = self.generate_ids(pixel_values, image_embeds, **kw)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Only the trainable tensors + the config that rebuilds everything else."""
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "model_config": asdict(self.config),
                           "state_dict": self.trainable_state_dict()}, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a capkit checkpoint without executing anything from it (weights_only=True refuses pickled code)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything that isn't plain tensors/containers
        raise ValueError(f"{path}: not a loadable capkit checkpoint (refused by torch.load(weights_only=True): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a capkit checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return ckpt


def load_captioner(path: str | os.PathLike, device: str | torch.device = "cpu", **config_overrides) -> ClipCaptioner:
    """Rebuild the captioner from a checkpoint. `config_overrides` point at other copies of the
    backbones (e.g. lm_name="/data/Qwen3-0.6B-Base"); the architecture keys must match."""
    ckpt = read_checkpoint(path)
    cfg = CaptionerConfig.from_dict({**ckpt["model_config"], **config_overrides})
    model = ClipCaptioner.from_config(cfg)
    saved = ckpt["model_config"]
    for k in ("clip_embed_dim", "lm_hidden_size"):
        if saved.get(k) is not None and saved[k] != getattr(cfg, k):
            raise ValueError(f"{path}: checkpoint was trained with {k}={saved[k]}, the loaded backbone has {getattr(cfg, k)}")
    state = {k[len("projector."):]: v for k, v in ckpt["state_dict"].items()}
    model.projector.load_state_dict(state, strict=True)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# atomic writes: a crash mid-write never leaves a half-written file under the final name

def atomic_write(path, write_fn) -> None:
    """write_fn(binary file) into a temp file beside path, fsync, then rename over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))
