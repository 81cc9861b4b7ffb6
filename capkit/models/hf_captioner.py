"""
The alternative path: GIT / BLIP captioning models fine-tuned through PEFT adapters (LoRA or IA3), optionally
on a 4- or 8-bit quantized base (QLoRA); their adapter and merged folders, and WiSE-FT merging.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from transformers import AutoProcessor

from capkit.checkpoints import (
    HF_CHECKPOINT_FORMAT,
    HF_CONFIG_FILE,
    MERGED_METADATA,
    metadata_name,
    read_folder_config,
    read_metadata,
    stem_of,
)
from capkit.errors import CapkitError, ConfigError, HubUnavailableError, RefusedFileError
from capkit.files import atomic_folder, atomic_write_json, check_model_folder, read_json
from capkit.hub import first_line, from_pretrained, resolve_local_path
from capkit.models.captioner import (
    Captioner,
    CaptionerConfig,
    masked_cross_entropy,
)
from capkit.models.decoders import max_positions, never_empty, resolve_dtype, shaping, stop_when
from capkit.models.encoders import ImageProcessorTransform
from capkit.names import current_names

# ----------------------------------------------------------------------------------------------
# the alternative path: GIT / BLIP fine-tuned through PEFT adapters (optionally on a quantized base)

QUANTIZATION_BITS = (4, 8, 16)  # 4 = QLoRA (nf4), 8, or 16 (not quantized)
PEFT_MODULES = ("LoRA", "IA3")
ADAPTER_BOUNDS = {"lora_r": (1, 4096)}  # the LoRA rank a config may ask for (inclusive)
HF_FAMILIES = {
    # model_type: (default hub id, transformers class, LoRA targets, IA3 targets, IA3 feed-forward targets).
    # Targets are the text side's linear layers (BERT-style names in both families); the image side
    # keeps its pretrained features.
    "git": ("microsoft/git-base", "GitForCausalLM", ["query", "key", "value", "dense"],
            ["key", "value", "output.dense"], ["output.dense"]),
    "blip": ("Salesforce/blip-image-captioning-base", "BlipForConditionalGeneration",
             ["query", "key", "value", "dense"], ["key", "value", "output.dense"], ["output.dense"]),
}


def hf_family(name: str) -> str | None:
    """"git" or "blip" for a GIT / BLIP local folder (its config.json's model_type) or hub id (its words:
    microsoft/git-base, Salesforce/blip-image-captioning-base); None when it doesn't say (BLIP-2 is neither)."""
    local = resolve_local_path(name)
    if local is not None:  # a folder says what it is in its config.json; its path's words don't count
        try:
            kind = read_json(local / "config.json", "model config", RefusedFileError).get("model_type")
        except (CapkitError, OSError, AttributeError):
            kind = None
        return kind if kind in HF_FAMILIES else None
    words = re.split(r"[^a-z0-9]+", str(name).lower())
    found = [f for f in HF_FAMILIES if f in words]
    return found[0] if len(found) == 1 else None


def quantization_kwargs(bits: int) -> dict:
    """from_pretrained kwargs for bitsandbytes 4-bit (QLoRA: nf4, double quantization, bf16 compute) or 8-bit."""
    if bits == 16:
        return {}
    if bits not in QUANTIZATION_BITS:
        raise ValueError(f"quantization_bits must be one of {', '.join(map(str, QUANTIZATION_BITS))}, got {bits}")
    if bits == 4:
        return {"quantization_config": transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)}
    return {"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True)}


def load_hf_model(cfg: CaptionerConfig, source: str | None = None, device: str | torch.device = "cpu",
                  key: str = "hf_model_name"):
    """(transformers model, processor) for cfg.model_type from a hub id or local folder, quantized as
    cfg.quantization_bits says. Where this platform can't quantize, says so in one line and goes on
    unquantized (cfg.quantization_bits is set to 16 so the checkpoint tells the truth). The model
    comes back on `device` (bitsandbytes models can't be moved after loading). `key`: the setting errors name."""
    default, cls_name = HF_FAMILIES[cfg.model_type][:2]
    name = source or cfg.hf_model_name or default
    what, cls = f"{cfg.model_type.upper()} model", getattr(transformers, cls_name)
    processor = from_pretrained(transformers.AutoProcessor, name, what, key)
    kw = {"device_map": {"": str(device)}, "dtype": resolve_dtype(cfg.lm_dtype, device)}
    try:
        model = from_pretrained(cls, name, what, key, **kw, **quantization_kwargs(cfg.quantization_bits))
    except (ImportError, RuntimeError, ValueError) as e:
        if cfg.quantization_bits == 16 or isinstance(e, (RefusedFileError, ConfigError, HubUnavailableError)):
            raise
        print(f"note: {cfg.quantization_bits}-bit quantization is not available here "
              f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); continuing unquantized")
        cfg.quantization_bits = 16
        model = from_pretrained(cls, name, what, key, **kw)
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
    lo, hi = ADAPTER_BOUNDS["lora_r"]
    if cfg.peft_module == "LoRA" and not lo <= cfg.lora_r <= hi:  # a hostile config can't ask for huge adapters
        raise ValueError(f"model config lora_r={cfg.lora_r} is out of range [{lo}, {hi}]")
    if cfg.peft_module == "LoRA":
        pcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules or lora_t, bias="none")
    elif cfg.peft_module == "IA3":
        targets = cfg.target_modules or ia3_t
        pcfg = IA3Config(target_modules=targets, feedforward_modules=[m for m in ia3_ff if m in targets])
    else:
        raise ValueError(f"unknown peft_module {cfg.peft_module!r}; expected one of {', '.join(PEFT_MODULES)}")
    model = get_peft_model(model, pcfg)
    # transformers/peft hook the input embeddings to require grad (for reentrant checkpointing);
    # GIT adds position embeddings in place onto that output, which autograd refuses
    model.get_base_model().disable_input_require_grads()
    return model


class HFCaptioner(Captioner):
    """GIT or BLIP (+ PEFT adapters) behind PrefixCaptioner's interface. Captions are tokenized as
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
    def generate(self, pixel_values=None, image_embeds=None, stop=None, **generation) -> list[str]:
        g = self.generation(generation)
        kw = {"max_new_tokens": g.max_new_tokens, "num_beams": g.num_beams, "do_sample": g.do_sample, **shaping(g)}
        if g.do_sample:
            kw.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        if g.seed is not None:
            torch.manual_seed(g.seed)
        ends = self.model.generation_config.eos_token_id
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        ids = self.model.generate(pixel_values=self._pixels(pixel_values, image_embeds), **kw,
                                  **never_empty(self.tokenizer, ends + [self.tokenizer.sep_token_id]),
                                  **stop_when(stop))
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """A folder: the PEFT adapter (safetensors) + processor + capkit_config.json; written beside
        the target and renamed into place, so the folder is complete or absent."""
        write_hf_folder(path, self.model, self.processor, self.config)


def write_hf_folder(path, model, processor, cfg: CaptionerConfig) -> None:
    """model + processor (save_pretrained) + the capkit_config.json that rebuilds them, as one folder that
    is complete or absent (files.atomic_folder); an existing folder is replaced only if capkit wrote it."""
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
        plain = " (a GIT / BLIP model as published: caption with it untrained through inference.py --model " \
            f"{path})" if hf_family(str(path)) else ""
        raise RefusedFileError(f"{path}: not a capkit model folder (no {HF_CONFIG_FILE}){plain}")
    saved = read_folder_config(path)
    try:
        return CaptionerConfig.from_dict({**saved, **current_names(config_overrides, "the overrides")[0]})
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


def load_base_captioner(name: str, device="cpu", model_type: str | None = None) -> HFCaptioner:
    """A GIT / BLIP captioning model as published, untrained by capkit (hub id or local folder): seed 000's
    simple_inference, `inference.py --model microsoft/git-base`. model_type: "git" / "blip" where the name
    doesn't tell (hf_family)."""
    named = hf_family(name)
    if model_type and named and model_type != named:
        raise ConfigError(f"--model {name!r} is a {named.upper()} model, not {model_type!r}: drop --model_type")
    family = model_type or named
    if family not in HF_FAMILIES:
        raise ConfigError(f"--model {name!r}: can't tell whether it is a GIT or a BLIP model; add --model_type git "
                          "or --model_type blip (a capkit checkpoint is given with --checkpoint)")
    cfg = CaptionerConfig(model_type=family, hf_model_name=name, quantization_bits=16, peft_module=None)
    model, processor = load_hf_model(cfg, device=device, key="model")
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
        m = read_metadata(meta, of_run=False)
        m["merged"] = {"adapter": str(adapter_dir), "wise_alpha": wise_alpha}
        atomic_write_json(m, merged_dir / MERGED_METADATA)
    return merged_dir
