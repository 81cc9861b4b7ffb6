"""
capkit's captioners. The main path, PrefixCaptioner: a frozen image encoder (capkit/models/encoders.py) -> a trainable
mapper (capkit/models/mappers.py) -> a frozen decoder LM (capkit/models/decoders.py). The image's features,
pooled (B, E) or tokens (B, N, W), become `mapper_prefix_length` vectors in the decoder's embedding space
(B, P, H); those are prepended to the caption's token embeddings (after an optional retrieval prompt) and the
frozen decoder is trained, through the mapper only, to continue with the caption + EOS.
The alternative path, model_type "git" / "blip", is capkit/models/hf_captioner.py; both fill in the Captioner
interface of capkit/models/captioner.py, so every script treats them alike.

    from model import CaptionerConfig, build_model, load_captioner
    model = build_model(CaptionerConfig())                          # downloads on first use
    model = build_model(CaptionerConfig(model_type="git", quantization_bits=4))
    model = load_captioner("saved_models/model_state_dict_....pth")  # or an adapter_... folder
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationConfig

from capkit.checkpoints import (
    CHECKPOINT_FORMAT,
    checkpoint_in,
    metadata_name,
    metadata_path_for,
    read_checkpoint,
    read_metadata,
    stem_of,
)
from capkit.errors import ConfigError, MissingInputError, RefusedFileError
from capkit.files import atomic_torch_save, atomic_write_json, plain_name
from capkit.hub import first_line, load_all
from capkit.models.captioner import (
    Captioner,
    CaptionerConfig,
    masked_cross_entropy,
)
from capkit.models.decoders import (
    add_lora,
    is_lora,
    load_decoder,
    max_positions,
    merge_lora,
    never_empty,
    shaping,
    stop_when,
    tokenize_captions,
)
from capkit.models.decoding import covers, decode
from capkit.models.encoders import ImageEncoder, OpenClipEncoder, build_image_encoder
from capkit.models.hf_captioner import HFCaptioner, load_hf_checkpoint
from capkit.models.mappers import build_mapper
from capkit.models.retrieval import (
    RETRIEVAL_CAPTION_TOKENS,
    RETRIEVAL_TEMPLATES,
    Datastore,
    open_datastore,
)
from capkit.names import current_names


def build_model(config: CaptionerConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The one switch on model_type: PrefixCaptioner for "prefix", HFCaptioner for "git" / "blip";
    returned on `device` (quantized models are loaded straight onto it)."""
    if config.model_type == "prefix":
        return PrefixCaptioner.from_config(config, device).to(device)
    return HFCaptioner.from_config(config, device)


class PrefixCaptioner(Captioner):
    supports_feature_cache = True  # the image side is frozen: features can be computed once (features.py)
    fast_decoding = True  # greedy and beams through capkit/models/decoding.py; False: transformers' generate

    def __init__(self, config: CaptionerConfig, image_encoder: nn.Module, lm: nn.Module, tokenizer,
                 preprocess=None):
        super().__init__()
        self.config = config
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        # frozen towers: no gradients, always in eval mode (see train()), run under no_grad
        self.lm = lm.requires_grad_(False).eval()
        if not isinstance(image_encoder, ImageEncoder):  # a bare open_clip visual tower
            image_encoder = OpenClipEncoder(image_encoder, config.encoder_features, config.encoder_layer,
                                            config.encoder_name)
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        # what encode_images gives per image (the feature cache's row): (E,) pooled or (N, W) tokens
        config.encoder_embed_dim, self.feature_shape = image_encoder.feature_dims()
        config.lm_hidden_size = int(lm.get_input_embeddings().embedding_dim)
        if config.encoder_features == "tokens":
            config.encoder_token_dim = self.feature_shape[-1]
        self.mapper = build_mapper(config)
        if config.lm_lora_r:  # LoRA adapters beside the decoder's attention learn with the mapper; its weights stay
            self.lm = add_lora(self.lm, config)  # frozen (decoders.py). After the mapper: the same seed starts it alike
        self._said: set[str] = set()              # the decoding notes already printed
        self.datastore: Datastore | None = None   # retrieval_k > 0: attach_datastore() before training or decoding
        self.datastore_file: str | None = None    # its file name beside the checkpoints (train.py saves it)
        if (room := self.caption_positions()) is not None and room < 2:  # not even one word and its EOS
            raise ConfigError(f"mapper_prefix_length={config.mapper_prefix_length}" + (
                f" and a retrieval prompt of up to {self.prompt_limit()} tokens (retrieval_k={config.retrieval_k})"
                if config.retrieval_k else "") + (" leave" if config.retrieval_k else " leaves") +
                f" no room for a caption: the decoder {config.lm_name!r} has {max_positions(lm.config)} positions")

    @classmethod
    def from_config(cls, config: CaptionerConfig, device: str | torch.device | None = None) -> "PrefixCaptioner":
        (encoder, preprocess), (lm, tok) = load_all(partial(build_image_encoder, config),
                                                    partial(load_decoder, config, device))
        return cls(config, encoder, lm, tok, preprocess)

    @property
    def projector(self) -> nn.Module:
        """The mapper's name until 2026-12 (read-only): PrefixCaptioner.mapper."""
        return self.mapper

    def train(self, mode: bool = True):
        super().train(mode)
        self.image_encoder.eval()  # frozen towers keep eval behaviour (no dropout) while the mapper trains
        self.lm.eval()
        for name, m in self.lm.named_modules():  # (the decoder's LoRA dropout trains with the mapper)
            if name.endswith(".lora_dropout"):
                m.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """mapper.* and, with lm_lora_r, the decoder's adapters lm.* (never its frozen weights)."""
        out = {f"mapper.{k}": v.detach().cpu().contiguous() for k, v in self.mapper.state_dict().items()}
        return out | {f"lm.{k}": v.detach().cpu().contiguous() for k, v in self.lm.named_parameters() if is_lora(k)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.mapper.parameters()) + [p for k, p in self.lm.named_parameters() if is_lora(k)]

    def load_trainable(self, state: dict[str, torch.Tensor], where, fresh_adapters: bool = False) -> None:
        """trainable_state_dict()'s tensors back into the mapper and the decoder's adapters; every one of them
        must be there, and nothing else (RefusedFileError naming `where`). fresh_adapters: a state without any
        adapters is taken too, the adapters staying as built (lora_B = 0: the decoder as it was)."""
        mapper = {k.removeprefix("mapper."): v for k, v in state.items() if k.startswith("mapper.")}
        lora = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
        want = {k for k, _ in self.lm.named_parameters() if is_lora(k)}
        stray = sorted(set(state) - {f"mapper.{k}" for k in mapper} - {f"lm.{k}" for k in lora})
        try:
            if stray or (set(lora) != want and not (fresh_adapters and not lora)):
                raise RuntimeError(f"decoder adapters: {len(lora)} saved, {len(want)} expected (lm_lora_r="
                                   f"{self.config.lm_lora_r})" + (f"; unexpected {stray[:3]}" if stray else ""))
            self.mapper.load_state_dict(mapper, strict=True)
            params = dict(self.lm.named_parameters())
            with torch.no_grad():
                for k, v in lora.items():
                    params[k].copy_(v)
        except RuntimeError as e:
            raise RefusedFileError(f"{where}: its weights don't fit the model its config describes "
                                   f"({first_line(e)})") from None

    def tokenize(self, captions, max_length: int) -> dict[str, torch.Tensor]:
        """-> input_ids, attention_mask (B, T): caption tokens + EOS, right-padded (no BOS: the prefix leads);
        T <= max_length and what the decoder's positions hold after the prefix."""
        return tokenize_captions(self.tokenizer, captions, self.caption_length(max_length))

    def caption_positions(self) -> int | None:
        n = max_positions(self.lm.config)  # the prompt (at most prompt_limit()) and the prefix take the first ones
        return None if n is None else n - self.config.mapper_prefix_length - self.prompt_limit()

    def prompt_limit(self) -> int:
        """The most tokens a retrieval prompt takes (0 without retrieval)."""
        k = self.config.retrieval_k
        if not k:
            return 0
        head, sep, tail = (self.tokenizer(t, add_special_tokens=False)["input_ids"]
                           for t in RETRIEVAL_TEMPLATES[self.config.retrieval_template])
        return len(head) + (k - 1) * len(sep) + len(tail) + k * RETRIEVAL_CAPTION_TOKENS

    def attach_datastore(self, store: Datastore | None) -> None:
        """The datastore the retrieval prompt is read from (retrieval_k > 0); its keys must come from this encoder."""
        self.datastore = store

    def retrieval_prompt(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """-> (ids, mask) (B, L) of each image's retrieval prompt, left-padded (mask 0) so that every image's
        prefix and caption sit at the same positions; None without retrieval. Evaluating: the first caption of each
        of the k nearest images. Training: k drawn among the retrieval_pool nearest, a random caption of each (torch's
        RNG: a resume replays it), so the mapper learns to use the prompt without trusting any one neighbour."""
        k = self.config.retrieval_k
        if not k:
            return None
        if self.datastore is None:
            raise ConfigError(f"this model was trained with retrieval_k={k}: it reads the captions of similar images "
                              "from a datastore, and none is attached (load_captioner finds the one saved beside the "
                              "checkpoint; --datastore DIR builds one from a folder of captioned images)")
        tok, store = self.tokenizer, self.datastore
        rows = store.neighbours(feats, max(k, self.config.retrieval_pool) if self.training else k)     # (B, N)
        drawn = self.training and self.config.retrieval_pool > k  # (retrieval_pool 0: the k nearest, first captions)
        if drawn:  # training: k of the pool, at random
            rows = rows.gather(1, torch.rand(rows.shape).argsort(-1)[:, :k].to(rows.device))
        rows = rows.tolist()
        pick = (lambda c: c[int(torch.randint(len(c), ()))]) if drawn else (lambda c: c[0])
        head, sep, tail = (tok(t, add_special_tokens=False)["input_ids"]
                           for t in RETRIEVAL_TEMPLATES[self.config.retrieval_template])
        caps = tok([pick(store.captions[j]) for row in rows for j in row], add_special_tokens=False)["input_ids"]
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
        or with encoder_features="tokens" its tokens (B, N, W) (encoders.py)."""
        dtype = next(self.image_encoder.parameters()).dtype
        return self.image_encoder(pixel_values.to(self.device, dtype)).float()

    def prefix_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Image features ((B, E) pooled or (B, N, W) tokens) -> (B, P, H) prefix in the decoder's dtype."""
        x = image_embeds.to(self.device, torch.float32)
        if self.config.encoder_normalize and self.config.encoder_features == "pooled" and self.image_encoder.contrastive:
            x = F.normalize(x, dim=-1)
        prefix = self.mapper(x)  # (B, P*H) for mlp / linear, (B, P, H) for the others
        prefix = prefix.reshape(x.shape[0], self.config.mapper_prefix_length, self.config.lm_hidden_size)
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
    def generation_config(self, g) -> GenerationConfig:
        """transformers' GenerationConfig for the decoding settings g (a Generation): the never-empty guard, EOS and
        padding from the tokenizer, no BOS (the image prefix leads)."""
        sampled = {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k} if g.do_sample else \
            {"temperature": None, "top_p": None, "top_k": None}
        return GenerationConfig(max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, do_sample=g.do_sample,
                                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                bos_token_id=None, **never_empty(self.tokenizer), **sampled, **shaping(g))

    def generate_ids(self, pixel_values=None, image_embeds=None, stop=None, **generation) -> torch.Tensor:
        """Batched decoding with the decoder's KV cache; returns new token ids (B, <=max_new_tokens),
        padded with pad_token_id after EOS. generation: the fields of Generation; stop: a callable that,
        once True, ends decoding after the current step."""
        g = self.generation(generation)
        lead, mask = self.lead_embeds(self._image_embeds(pixel_values, image_embeds))  # (B, [L+]P, H)
        gen = self.generation_config(g)
        if g.seed is not None:
            torch.manual_seed(g.seed)
        if self.fast_decoding and (why := covers(self.lm, g)) is None:  # decoding.py: generate's captions, less work
            return decode(self.lm, lead, mask, g, gen.eos_token_id, gen.pad_token_id, gen.suppress_tokens,
                          gen.begin_suppress_tokens, stop)
        if self.fast_decoding and why not in self._said:
            self._said.add(why)
            print(f"note: {why} decodes through transformers' generate (capkit's own loop covers greedy and beams)")
        return self.lm.generate(inputs_embeds=lead, attention_mask=mask, generation_config=gen, **stop_when(stop))

    def generate(self, pixel_values=None, image_embeds=None, stop=None, **generation) -> list[str]:
        ids = self.generate_ids(pixel_values, image_embeds, stop, **generation)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Only the trainable tensors + the config that rebuilds everything else."""
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "model_config": asdict(self.config),
                           "state_dict": self.trainable_state_dict(),
                           **({"datastore": self.datastore_file} if self.datastore_file else {})}, path)


ClipCaptioner = PrefixCaptioner  # its name until 2026-12 (capkit/names.py has the renamed keys)


def load_captioner(path: str | os.PathLike, device: str | torch.device = "cpu", datastore=None,
                   **config_overrides) -> nn.Module:
    """Rebuild a captioner from a checkpoint: a model_state_dict_*.pth (prefix), or an adapter_*
    / merged folder (git, blip). `config_overrides` point at other copies of the backbones
    (e.g. lm_name="/data/Qwen3-0.6B-Base"); the architecture keys must match."""
    if Path(path).is_dir():
        return load_hf_checkpoint(path, device, **config_overrides)
    ckpt = read_checkpoint(path)
    try:
        cfg = CaptionerConfig.from_dict({**ckpt["model_config"], **current_names(config_overrides, "the overrides")[0]})
    except (TypeError, ValueError) as e:
        raise RefusedFileError(f"{path}: its model config is invalid: {e}") from None
    if cfg.model_type != "prefix":
        raise RefusedFileError(f"{path}: a .pth checkpoint holds a prefix model, not {cfg.model_type!r}")
    model = PrefixCaptioner.from_config(cfg, device)
    saved = ckpt["model_config"]
    for k in ("encoder_embed_dim", "encoder_token_dim", "lm_hidden_size"):
        if saved.get(k) is not None and saved[k] != getattr(cfg, k):
            raise RefusedFileError(f"{path}: checkpoint was trained with {k}={saved[k]}, the loaded backbone has "
                                   f"{getattr(cfg, k)}")
    model.load_trainable(ckpt["state_dict"], path)
    name = ckpt.get("datastore")  # (what eval.py's kNN baseline copies from, with or without retrieval)
    model.datastore_file = None if name is None else plain_name(name, f"{path}: its datastore file name")
    if cfg.retrieval_k:  # the captions it retrieves: the datastore given, else the one saved beside it
        source = datastore if datastore is not None else saved_datastore(path, model.datastore_file)
        model.attach_datastore(source if isinstance(source, Datastore) else open_datastore(model, source))
    return model.to(device).eval()


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", datastore=None,
                    **config_overrides) -> tuple[nn.Module, dict, dict]:
    """-> (the captioner in eval mode on device, its run's training metadata ({} when the JSON beside it is
    missing), the run's hyperparameters). path: a checkpoint, or a folder of them (its newest is loaded, said).
    datastore: see load_captioner."""
    found = checkpoint_in(path)
    if found != Path(path):
        print(f"note: {path} holds checkpoints: loading the newest, {found}")
        path = found
    model = load_captioner(path, device, datastore=datastore, **config_overrides)
    meta_path = metadata_path_for(path)
    metadata = read_metadata(meta_path, of_run=False) if meta_path.exists() else {}
    return model, metadata, metadata.get("hyperparameters", {})


def merge_decoder_lora(checkpoint, merged_dir=None, wise_alpha: float = 1.0) -> Path:
    """A prefix checkpoint trained with lm_lora_r > 0 -> a folder that needs no adapters: decoder/ (the decoder with
    the adapters folded into its weights, save_pretrained + tokenizer) and the checkpoint (the mapper; its config's
    lm_name is that decoder/, lm_lora_r 0) with its run's metadata. wise_alpha < 1 folds in that share of the update
    (WiSE-FT). Load the folder's .pth as any checkpoint; moved elsewhere, give lm_name=<its decoder/>."""
    checkpoint = Path(checkpoint)
    model = load_captioner(checkpoint)
    if not model.config.lm_lora_r:
        raise ConfigError(f"{checkpoint}: its decoder has no LoRA adapters (lm_lora_r=0): nothing to merge")
    stem = stem_of(checkpoint)
    out = Path(merged_dir) if merged_dir else checkpoint.with_name(
        f"merged_{stem}" + (f"_wise{wise_alpha:g}" if wise_alpha < 1 else ""))
    decoder = (out / "decoder").resolve()
    merge_lora(model.lm, wise_alpha).save_pretrained(decoder, safe_serialization=True)
    model.tokenizer.save_pretrained(decoder)
    model.config.lm_name, model.config.lm_tokenizer_name, model.config.lm_lora_r = str(decoder), str(decoder), 0
    model.save_checkpoint(out / checkpoint.name)
    if model.datastore_file and (checkpoint.parent / model.datastore_file).is_file():  # the training captions retrieval (and eval.py's kNN baseline) reads, beside it
        shutil.copy2(checkpoint.parent / model.datastore_file, out / model.datastore_file)
    meta = metadata_path_for(checkpoint)
    if meta.exists():  # eval.py finds the run's data through it
        m = read_metadata(meta, of_run=False)
        m["merged"] = {"checkpoint": str(checkpoint), "wise_alpha": wise_alpha}
        m["model_config"] = asdict(model.config)
        atomic_write_json(m, out / metadata_name(stem))
    return out


def saved_datastore(path, name: str | None) -> Path:
    """The datastore file a retrieval checkpoint names (a plain name, checked on reading), in its own folder."""
    if name is None:
        raise RefusedFileError(f"{path}: trained with retrieval but names no datastore; pass one with --datastore DIR")
    found = Path(path).parent / name
    if not found.is_file():
        raise MissingInputError(f"{path} retrieves captions from {found.name}, which is not beside it; copy it there, "
                                "or give a folder of captioned images with --datastore DIR")
    return found
