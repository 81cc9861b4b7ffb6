"""
The mappers: image features -> the decoder's prefix. build_mapper is the one factory (mlp, linear,
transformer, resampler; CaptionerConfig.mapper_type), as LLaVA's build_projector is.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from capkit.errors import ConfigError

# each mapper (build_mapper) and the image features it takes (encoder_features)
MAPPER_INPUTS = {"mlp": ("pooled",), "linear": ("pooled",), "transformer": ("pooled", "tokens"),
                 "resampler": ("tokens",)}
MAPPER_TYPES = tuple(MAPPER_INPUTS)
# the sizes a mapper may be given (inclusive): CaptionerConfig refuses others, train.py's checks derive from these
MAPPER_BOUNDS = {"mapper_prefix_length": (1, 1024), "mapper_hidden_dim": (1, 65536), "mapper_num_layers": (1, 64),
                 "mapper_num_heads": (1, 256)}

# ----------------------------------------------------------------------------------------------
# mapper

def build_mapper(cfg) -> nn.Module:
    """The one factory for mappers (cfg: a CaptionerConfig): image features -> prefix (B, P, H), or (B, P * H) for mlp /
    linear (reshaped by PrefixCaptioner.prefix_embeds). Input: the pooled embedding (B, E) or, with
    encoder_features="tokens", the patch tokens (B, N, W). Dims come from the loaded backbones."""
    if cfg.encoder_embed_dim is None or cfg.lm_hidden_size is None:
        raise ValueError("build_mapper needs encoder_embed_dim and lm_hidden_size (set when the backbones load)")
    tokens = cfg.encoder_features == "tokens"
    if tokens and cfg.encoder_token_dim is None:
        raise ValueError("build_mapper needs encoder_token_dim for encoder_features='tokens'")
    d_in, H, P = (cfg.encoder_token_dim if tokens else cfg.encoder_embed_dim), cfg.lm_hidden_size, cfg.mapper_prefix_length
    if cfg.mapper_type in ("transformer", "resampler") and H % cfg.mapper_num_heads:
        # ConfigError (a ValueError): known only once the decoder has loaded, and train.py must end in one sentence
        raise ConfigError(f"mapper_num_heads={cfg.mapper_num_heads} must divide the decoder's hidden size {H}")
    if cfg.mapper_type == "linear":
        return nn.Linear(d_in, P * H)
    if cfg.mapper_type == "mlp":
        return nn.Sequential(
            nn.Linear(d_in, cfg.mapper_hidden_dim),
            nn.GELU(),
            nn.Dropout(cfg.mapper_dropout),
            nn.Linear(cfg.mapper_hidden_dim, P * H),
        )
    if cfg.mapper_type == "transformer":
        return TransformerMapper(d_in, H, P, cfg, tokens)
    if cfg.mapper_type == "resampler":
        return Resampler(d_in, H, P, cfg)
    raise ValueError(f"unknown mapper_type {cfg.mapper_type!r}; expected one of {', '.join(MAPPER_TYPES)}")


def _encoder(width: int, cfg, cross: bool) -> nn.Module:
    """cfg.mapper_num_layers pre-norm blocks of width `width`: self-attention (+ cross-attention to the
    image when `cross`) + a GELU feed-forward of mapper_hidden_dim."""
    kw = dict(d_model=width, nhead=cfg.mapper_num_heads, dim_feedforward=cfg.mapper_hidden_dim, dropout=cfg.mapper_dropout,
              activation="gelu", batch_first=True, norm_first=True)
    if cross:
        return nn.TransformerDecoder(nn.TransformerDecoderLayer(**kw), cfg.mapper_num_layers, norm=nn.LayerNorm(width))
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), cfg.mapper_num_layers, norm=nn.LayerNorm(width),
                                 enable_nested_tensor=False)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper (Mokady et al. 2021): the image features become a few
    tokens (the pooled embedding (B, E) -> P tokens through one Linear; or the patch tokens (B, N, W),
    each through a Linear), P learned constant queries are appended, a transformer encoder mixes them,
    and its outputs at the query positions are the prefix (B, P, H). Width: the decoder's H."""

    def __init__(self, d_in: int, H: int, P: int, cfg, tokens: bool):
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

    def __init__(self, d_in: int, H: int, P: int, cfg):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, H))
        self.queries = nn.Parameter(torch.randn(P, H))  # unit scale: see TransformerMapper
        self.blocks = _encoder(H, cfg, cross=True)
        self.out = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.inp(x)                                                            # (B, N, H)
        q = self.queries.expand(x.shape[0], -1, -1)                                     # (B, P, H)
        return self.out(self.blocks(q, memory))                                         # (B, P, H)
