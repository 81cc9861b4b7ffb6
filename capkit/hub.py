"""
Where a model or a dataset comes from: a local path (as given, or relative to the clone, so notebooks find the demo
assets) or the Hugging Face Hub. Whether the Hub can be reached is checked once (3 s), and offline without a cached
copy every loader ends in one paragraph naming the key to change. from_pretrained(cls, name, ...) is the one place
capkit loads a transformers model, tokenizer, processor or config: it never runs code from what it loads
(trust_remote_code=False; a folder asking for custom code, or holding a pickle that would run code, is refused
first).

    from capkit.hub import from_pretrained
    lm = from_pretrained(AutoModelForCausalLM, "Qwen/Qwen3-0.6B-Base", "decoder", "lm_name")

Imports nothing of capkit's but errors.py and files.py.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants as hfc

from capkit.errors import ConfigError, HubUnavailableError, RefusedFileError
from capkit.files import check_model_folder

REPO_DIR = Path(__file__).resolve().parents[1]  # the clone: relative paths in presets and metadata start here too


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


def offline_message(what: str, hint: str) -> str:
    return (f"cannot load {what}: the Hugging Face Hub is unreachable (no network, or HF_HUB_OFFLINE=1) "
            f"and it is not in the local cache. Run once on a machine with internet access to cache it, "
            f"or {hint}")


def hub_or_cache(load, what: str, hint: str, catch=(Exception,)):
    """load(local_files_only) for something that lives on the Hub: online it may download; offline only
    the local cache is tried, and a miss (one of `catch`) is HubUnavailableError naming `what` and `hint`.
    Online failures are the caller's to explain."""
    offline = not hub_online()
    try:
        return load(offline)
    except catch:
        if offline:
            raise HubUnavailableError(offline_message(what, hint)) from None
        raise


def load_all(*loaders) -> list:
    """Call each loader; every one that needs the unreachable Hub is named in one HubUnavailableError,
    so an offline user sees all the missing pieces at once, not one per attempt."""
    results, problems = [], []
    for load in loaders:
        try:
            results.append(load())
        except HubUnavailableError as e:
            problems.append(str(e))
    if problems:
        raise HubUnavailableError("\n".join(problems))
    return results


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
