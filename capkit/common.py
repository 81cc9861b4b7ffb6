"""
What every capkit script shares with the machine it runs on: choosing the device, torch.compile,
the library versions a run records, whether the Hugging Face Hub can be reached (and what to say
when it can't), atomic writes, and the command-line value checks.

    from capkit.common import pick_device, atomic_write_json, hub_or_cache
    device = pick_device("auto")                 # cuda > mps > cpu

It imports nothing of capkit's except errors.py (the exception types), so any module can use it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants as hfc
import torch
import torch._dynamo

from capkit.errors import ConfigError, HubUnavailableError

REPO_DIR = Path(__file__).resolve().parents[1]  # the clone: relative paths in presets and metadata start here too
DEMO_DIR = REPO_DIR / "demo"  # the demo backbones: tiny ones committed, real ones converted by tools/demo_assets.py
DEMO_CLIP_DIR, DEMO_LM_DIR = DEMO_DIR / "clip-tiny", DEMO_DIR / "qwen3-tiny"
REAL_DECODER_DIR = DEMO_DIR / "smollm2-135m"        # not committed: ~540 MB (see .gitignore)
REAL_ENCODER_DIR = DEMO_DIR / "efficientnet-lite0"  # not committed: ~19 MB; lite1/2 go beside it

SERVING = re.compile(r"^serving .* at (http://\S+/)$")  # the line serve.py prints once it serves (loadtest waits)

# ----------------------------------------------------------------------------------------------
# the device, and torch.compile

def pick_device(name: str) -> torch.device:
    """"auto" -> cuda > mps > cpu; any other name must be a device this machine has (ConfigError otherwise)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA GPU is visible here; use device='cpu' (or 'auto')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device {name!r}: Apple's MPS backend is not available here; use 'cpu' or 'auto'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


COMPILE_PAD_MULTIPLE = 8  # compile=True: caption lengths rounded up to a multiple of this (a few static shapes)


def compile_step(module, device):
    """torch.compile for the training step: static shapes (the collate pads captions to a multiple of
    COMPILE_PAD_MULTIPLE) and, on CUDA, CUDA graphs ("reduce-overhead"), since the frozen decoder's step
    is launch-bound. Measured on an H100 with torch 2.11 (docs/performance.md): dynamic=True did not finish
    compiling the 0.6B decoder's step in 170 s (and hit an inductor assertion in another run); static
    shapes compiled in 65-90 s per shape and ran a batch-64 step in 31 ms, 17 ms with CUDA graphs (eager: 112 ms).
    Each new (batch size, padded length) compiles once, so the recompile limit is raised above dynamo's 8."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(module, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "open_clip_torch", "transformers", "tokenizers", "rouge_score"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------------------------
# local paths and the Hugging Face Hub: one clear message when it can't be reached

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


# ----------------------------------------------------------------------------------------------
# atomic writes: a crash mid-write never leaves a half-written file under the final name

def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path, write_fn) -> None:
    """write_fn(binary file) into a temp file beside path, fsync, then rename over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions (shared clusters)
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


def atomic_folder(path, write_fn, marker: str) -> None:
    """write_fn(temp folder) beside path, fsync every file, then rename it to path: the folder is complete
    or absent. An existing path is replaced only if it is a folder holding `marker` (one that this code
    wrote before) or empty; anything else is refused (ConfigError), never deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700 folders; give the usual permissions
    try:
        write_fn(tmp)
        for f in tmp.rglob("*"):  # on disk before the rename makes the folder visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.is_symlink() or path.is_file():
            raise ConfigError(f"{path} exists and is not a folder: choose another destination")
        if path.exists():  # replace only a folder capkit wrote (a checkpoint saved again after a resume)
            if any(path.iterdir()) and not (path / marker).is_file():
                raise ConfigError(f"{path} exists and is not a capkit model folder: capkit won't replace it; "
                                  "choose another destination or remove it yourself")
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# command-line values

def int_at_least(low: int, high: int = 2**31 - 1):
    """argparse type: an integer in [low, high] (a batch size, a token count, a beam count, top_k, a seed)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{value} must be <= {high}")
        return value
    return parse


positive_int = int_at_least(1)


def check_output_path(path) -> None:
    """An output file the user named (--output): a folder in its place, or a folder that doesn't exist,
    is said before any work is done."""
    if path is None:
        return
    if Path(path).is_dir():
        raise ConfigError(f"--output {path} is a folder; give a file name")
    if not Path(path).parent.is_dir():
        raise ConfigError(f"--output {path}: the folder {Path(path).parent} does not exist")


def write_output(path, text: str) -> None:
    check_output_path(path)
    Path(path).write_text(text, encoding="utf-8")


_TSV_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_line(*fields: str) -> str:
    """One `path<TAB>caption` output line: a tab or line break inside a field (a file may be named so; a
    real LM may write one) is shown as \\t, \\n or \\r, so each image stays one line of two fields."""
    return "\t".join(str(f).translate(_TSV_ESCAPES) for f in fields)
