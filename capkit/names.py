"""
The names capkit used before, and what they are called now: the one table every reader of a name passes it
through — train.py's `hyperparameters` dict, a TOML file, --KEY=VALUE, a checkpoint's model config and weights,
a run's metadata and --resume. An old name is read as the new one and said once ("note: proj_type is now
mapper_type"); a file that gives both names with different values is refused.

    from capkit.names import current_names
    config, renamed = current_names({"clip_model_name": "ViT-B-32", "proj_type": "mlp"})
    # -> {"encoder_name": "ViT-B-32", "mapper_type": "mlp"}, ["clip_model_name", "proj_type"]

Imports nothing of capkit's.
"""
from __future__ import annotations

# 2026-12: the encoder keys hold timm and transformers encoders as well as CLIP, and the trainable part is called
# the mapper everywhere (it was "projector" in code, "mapping network" in places)
RENAMED_KEYS = {
    "clip_model_name": "encoder_name", "clip_pretrained": "encoder_pretrained",
    "clip_image_size": "encoder_image_size", "clip_normalize": "encoder_normalize",
    "clip_features": "encoder_features", "clip_embed_dim": "encoder_embed_dim", "clip_token_dim": "encoder_token_dim",
    "proj_type": "mapper_type", "proj_prefix_length": "mapper_prefix_length", "proj_hidden_dim": "mapper_hidden_dim",
    "proj_dropout": "mapper_dropout", "proj_num_layers": "mapper_num_layers", "proj_num_heads": "mapper_num_heads",
}
# the flag names of the projects capkit grew from (../shared/seeds: GIT-QLoRA, the GIT scripts, caption-train) ->
# capkit's keys: read on the command line and in a TOML file (files capkit wrote never held them)
SPELLINGS = {"lr": "learning_rate", "epochs": "num_epochs", "model_name": "hf_model_name",
             "model_name_or_path": "hf_model_name", "model_id": "hf_model_name", "dataset_dir": "data_dir",
             "block_size": "max_caption_length", "lora_bits": "quantization_bits", "rank": "lora_r",
             "alpha": "lora_alpha", "gradient_accumulation": "gradient_accumulation_steps", "config_file": "config"}
# every other name of a key a user may give: each is read as its key and said once ("--lr is learning_rate")
KEY_ALIASES = {**SPELLINGS, **RENAMED_KEYS}
# values of a key that were renamed: model_type "clip_mlp" is the main path's name until 2026-12
RENAMED_VALUES = {"model_type": {"clip_mlp": "prefix"}}
# the main path's weights: the mapper was the module `projector`
RENAMED_WEIGHTS = {"projector.": "mapper."}


def current_key(key: str) -> str:
    return RENAMED_KEYS.get(key, key)


def current_value(key: str, value):
    table = RENAMED_VALUES.get(current_key(key), {})
    return table.get(value, value) if isinstance(value, str) else value


def current_names(d: dict, where: str = "the configuration") -> tuple[dict, list[str]]:
    """-> (d with every old key and value renamed, the old keys it held). ValueError when d gives a key under both
    its names with different values (which one was meant can't be known)."""
    out, renamed = {}, []
    for key, value in d.items():
        new = current_key(key)
        if new != key:
            renamed.append(key)
            if new in d and d[new] != value:
                raise ValueError(f"{where} gives both {key}={value!r} and {new}={d[new]!r}: {key} is {new}'s old "
                                 f"name; keep one")
        if new not in out or new == key:
            out[new] = current_value(new, value)
    return out, renamed


def current_weights(state_dict: dict) -> dict:
    """A saved state dict with the weights' old module names renamed (projector.* -> mapper.*)."""
    out = {}
    for name, tensor in state_dict.items():
        for old, new in RENAMED_WEIGHTS.items():
            if isinstance(name, str) and name.startswith(old):
                name = new + name[len(old):]
        out[name] = tensor
    return out
