"""
The frozen decoder LM of the main path: loading any transformers causal LM (hub id or folder, safely), the
positions it holds, captions as its tokens, and the generate() settings that rule out an empty caption.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from capkit.errors import ConfigError
from capkit.hub import first_line, from_pretrained

# ----------------------------------------------------------------------------------------------
# loading backbones (hub.hub_or_cache: one clear message when the hub can't be reached)

# lm_dtype: the decoder's weights in memory; "auto" (None here) is bfloat16 on a CUDA GPU that has it, else float32
LM_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """lm_dtype -> torch dtype. "auto": bf16 where the decoder will run on a GPU that has it, else fp32 (a bf16
    step on a CPU without AMX takes minutes). device=None means "the GPU if there is one"."""
    if name == "auto":
        on_gpu = device is None or torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return LM_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown lm_dtype {name!r}; expected one of {', '.join(LM_DTYPES)}") from None


def shaping(g) -> dict:
    """generate() keyword arguments for Generation's caption-shaping settings (only those away from their defaults:
    a setting left alone adds no logits processor)."""
    out = {"min_new_tokens": g.min_new_tokens or None, "no_repeat_ngram_size": g.no_repeat_ngram_size or None,
           "repetition_penalty": g.repetition_penalty if g.repetition_penalty != 1.0 else None}
    if g.num_beams > 1:
        out["length_penalty"] = g.length_penalty
    return {k: v for k, v in out.items() if v is not None}


def load_decoder(cfg, device: str | torch.device | None = None):
    """transformers causal LM + tokenizer from a hub id or local folder; lm_dtype=auto is resolved for `device`."""
    lm = from_pretrained(AutoModelForCausalLM, cfg.lm_name, "decoder", "lm_name",
                         dtype=resolve_dtype(cfg.lm_dtype, device))
    tok = from_pretrained(AutoTokenizer, cfg.lm_tokenizer_name or cfg.lm_name, "tokenizer",
                          "lm_tokenizer_name" if cfg.lm_tokenizer_name else "lm_name")
    if tok.pad_token_id is None:  # padding is masked out of attention and loss; never a content token
        tok.pad_token = tok.eos_token
    return lm, tok


# ----------------------------------------------------------------------------------------------
# LoRA on the frozen decoder (lm_lora_r > 0): low-rank updates beside its attention projections learn with the
# mapper; the base weights stay frozen and bit-identical, and only the adapters go into a checkpoint

DECODER_BOUNDS = {"lm_lora_r": (0, 1024)}  # 0: the decoder stays wholly frozen (inclusive bounds)
DECODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # Llama / Qwen / SmolLM attention; GPT-2: c_attn


def add_lora(lm: nn.Module, cfg) -> nn.Module:
    """Inject peft LoRA layers (rank cfg.lm_lora_r, cfg.lora_alpha, cfg.lora_dropout) into the decoder's
    target_modules, in place: module names and the model's class are kept, so decoding treats it as before.
    lora_B starts at zero: until the first step the decoder computes exactly what it did. -> lm, its base
    weights frozen, the adapters trainable."""
    from peft import LoraConfig, inject_adapter_in_model
    targets = list(cfg.target_modules or DECODER_LORA_TARGETS)
    pcfg = LoraConfig(r=cfg.lm_lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
    try:
        lm = inject_adapter_in_model(pcfg, lm)
    except ValueError as e:  # no module of those names
        raise ConfigError(f"lm_lora_r={cfg.lm_lora_r}: the decoder {cfg.lm_name!r} has no layers named {targets} "
                          f"for LoRA ({first_line(e)}); name its attention projections in target_modules") from None
    for name, p in lm.named_parameters():
        p.requires_grad_(is_lora(name))
        if is_lora(name):  # adapters in float32 whatever the decoder's dtype: AdamW's small steps on bf16 weights
            p.data = p.data.float()  # round away (peft casts the input to them and the result back)
    return lm


def is_lora(name: str) -> bool:
    """Is this decoder parameter (a named_parameters() name) one of the LoRA adapters add_lora made?"""
    return any(f".{part}." in name for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))


def merge_lora(lm: nn.Module, alpha: float = 1.0) -> nn.Module:
    """Fold the LoRA adapters into the decoder's weights (W + alpha x BA x scaling) and put the plain layers back:
    -> a decoder of the original class and module names, which save_pretrained writes as any other."""
    from peft.tuners.lora import LoraLayer
    with torch.no_grad():
        for name, module in list(lm.named_modules()):
            if not isinstance(module, LoraLayer):
                continue
            for b in module.lora_B.values():
                b.weight.mul_(alpha)
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, child, module.get_base_layer())
    return lm


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


class _StopWhen(StoppingCriteria):
    """transformers' per-step check: every row ends once stop() is True."""

    def __init__(self, stop):
        self.stop = stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:  # -> (B,) bool: True ends that row
        return torch.full((input_ids.shape[0],), bool(self.stop()), dtype=torch.bool, device=input_ids.device)


def stop_when(stop) -> dict:
    """generate() settings that end every row after the current step once stop() says True (serve.py: the
    clients of a batch have all gone); {} for stop=None."""
    return {} if stop is None else {"stopping_criteria": StoppingCriteriaList([_StopWhen(stop)])}


# ----------------------------------------------------------------------------------------------
# the main path: frozen image encoder -> trainable mapper -> frozen decoder

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
