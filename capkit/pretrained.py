"""
The one place capkit loads a transformers model, tokenizer, processor or config: from_pretrained(cls, name, ...),
with name a local save_pretrained folder (as given, or relative to the repo) or a hub id. It never runs code
from what it loads (trust_remote_code=False; a folder asking for custom code, or holding a pickle that would
run code, is refused first), and offline without a cached copy it ends in one paragraph naming the key to change.

    from capkit.pretrained import from_pretrained
    lm = from_pretrained(AutoModelForCausalLM, "Qwen/Qwen3-0.6B-Base", "decoder", "lm_name")
"""
from __future__ import annotations

from capkit.common import hub_or_cache, resolve_local_path
from capkit.errors import ConfigError, RefusedFileError
from capkit.safeio import check_model_folder


def first_line(e: BaseException) -> str:
    """An exception's first line (at most 300 characters), for one-paragraph errors."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def from_pretrained(cls, name: str, what: str, key: str, **kw):
    """cls.from_pretrained(name) safely; `what` names the thing in errors, `key` the setting that chose it.
    Offline and not cached: HubUnavailableError naming `key`."""
    local = resolve_local_path(name)
    if local is not None and not local.is_dir():
        raise ConfigError(f"{key}={name!r} is a file; give a folder written by save_pretrained, or a hub id")
    if local is not None:
        check_model_folder(local, what)
    try:
        if local is not None:
            return cls.from_pretrained(str(local), trust_remote_code=False, **kw)
        return hub_or_cache(lambda offline: cls.from_pretrained(name, local_files_only=offline, trust_remote_code=False,
                                                                **kw),
                            f"the {what} {name!r}", f"set `{key}` to a local folder written by save_pretrained "
                            f"(e.g. --{key}=/path/to/folder).", catch=OSError)
    except OSError as e:
        if local is not None:
            raise RefusedFileError(f"{key}={name!r}: the {what} folder {local} can't be loaded: {first_line(e)}") \
                from None
        raise ConfigError(f"{key}={name!r}: {first_line(e)}") from None
    except ValueError as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise RefusedFileError(
                f"refused {what} {name!r}: it needs Python code shipped with the model (trust_remote_code), "
                "which capkit never runs; use a model that transformers supports natively.") from None
        if local is None and type(e).__name__ == "HFValidationError":
            raise ConfigError(f"{key}={name!r}: no such folder, and not a Hugging Face Hub id") from None
        if local is not None:  # e.g. a folder with no config.json ("Unrecognized model"): not a model folder
            raise RefusedFileError(f"{key}={name!r}: {local} is not a {what} folder transformers can load "
                                   f"({first_line(e)}); give a folder written by save_pretrained") from None
        raise
