"""
Files on disk: what capkit did not write is read safely, as data and never as code; what it writes is written
atomically (a crash mid-write never leaves a half-written file under the final name).

- open_regular(): only regular files are opened; a FIFO, device, socket or folder named like an image
  is refused without blocking (opening a FIFO for reading would wait forever for a writer).
- read_text() / read_json(): the file named in every error; non-UTF-8 text says so (UTF-16 with a BOM,
  as spreadsheets save "Unicode text", is detected).
- torch_load(): torch.load(weights_only=True); a pickle that would run code is refused in one sentence.
- check_model_folder(): a folder whose configs ask for custom code (`auto_map`) or hold a pickle that
  would run code is refused before transformers sees it (it could otherwise prompt to run that code).
- inside(): a file name read from a metadata JSON resolves inside its own folder, or is refused.
- atomic_write() / atomic_torch_save() / atomic_write_json() / atomic_folder(): temp file (or folder) beside the
  target, fsync, rename.

Imports nothing of capkit's but errors.py.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import stat
import tempfile
from pathlib import Path

import torch

from capkit.errors import ConfigError, DataError, RefusedFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# config files through which transformers / peft could be pointed at code in the folder
CODE_CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                     "image_processor_config.json", "feature_extractor_config.json", "video_processor_config.json",
                     "generation_config.json", "adapter_config.json")


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


class NotRegularFile(OSError):
    """A path that names a FIFO, device, socket or folder where a file was expected."""

    def __init__(self, path, kind: str):
        super().__init__(errno.EINVAL, f"is {kind}, not a regular file", str(path))
        self.kind = kind

    def __str__(self):
        return f"{self.filename} is {self.kind}, not a regular file"


def open_regular(path, mode: str = "rb"):
    """Open a regular file for reading (binary or text). Never blocks on a FIFO: the open is
    non-blocking, and the opened thing is checked with fstat (no race between a check and the open)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, file_kind(st.st_mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, what: str, error=DataError) -> bytes:
    """The bytes of a regular file, or `error` naming it (missing, a folder, a FIFO, unreadable)."""
    try:
        with open_regular(path) as f:
            return f.read()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except NotRegularFile as e:
        raise error(f"{what} {e}") from None
    except OSError as e:
        raise error(f"{what} {path} can't be read: {e.strerror or e}") from None


def decode_text(raw: bytes, path, what: str) -> str:
    """UTF-8 (a BOM allowed) or UTF-16 with its BOM; anything else is an error naming the file and line."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): save it as "
                        f"UTF-8, e.g. `iconv -f cp1252 -t utf-8 {Path(path).name} > fixed_{Path(path).name}` "
                        "for a file from Excel on Windows") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise DataError(f"{what} {path} holds NUL bytes on line {line}: a binary or damaged file, not text")
    return text


def read_text(path, what: str) -> str:
    return decode_text(read_bytes(path, what), path, what)


def read_json(path, what: str, error=DataError):
    """Parsed JSON, or `error` naming the file and where it stops being JSON (truncated files included)."""
    raw = read_bytes(path, what, error)
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                    "it may be truncated or hand-edited") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, a 200,000-deep nesting
        raise error(f"{what} {path} can't be read as JSON ({type(e).__name__}: {str(e)[:120]})") from None


def _blocked_global(message: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return f" (it asks for {m.group(1)})" if m else ""


def torch_load(path, what: str = "checkpoint"):
    """torch.load(weights_only=True) of a regular file: plain tensors and containers only. A pickle that
    would run code, and a damaged file, are refused with a sentence of capkit's own."""
    try:
        with open_regular(path) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RefusedFileError(f"{what} {path} does not exist") from None
    except NotRegularFile as e:
        raise RefusedFileError(f"{what} {e}") from None
    except pickle.UnpicklingError as e:
        raise RefusedFileError(
            f"refused {what} {path}: it contains pickled objects that would run code when loaded"
            f"{_blocked_global(str(e))}, so torch.load(weights_only=True) refused it. capkit loads checkpoints as "
            "data only; use a file that capkit "
            "(or torch.save of plain tensors) wrote, or convert the weights to safetensors.") from None
    except Exception as e:  # unpickling a stranger's bytes raises anything (IndexError for a text file): refused
        raise RefusedFileError(f"{what} {path} is damaged or not a PyTorch file ({type(e).__name__}); it may "
                               "be truncated by a crash or an incomplete copy: use an earlier checkpoint") from None


def folder_config_asks_for_code(folder: Path) -> str | None:
    """The config file and key through which a model folder asks transformers / peft to run its own code."""
    for name in CODE_CONFIG_FILES:
        p = folder / name
        if not p.is_file():
            continue
        try:
            cfg = json.loads(read_bytes(p, "config file", RefusedFileError).decode("utf-8-sig"))
        except (ValueError, UnicodeDecodeError):
            continue  # transformers reports unreadable configs itself
        if not isinstance(cfg, dict):
            continue
        for key in ("auto_map", "custom_pipelines"):  # (peft's own auto_mapping names a transformers class: data)
            if cfg.get(key):
                return f"{name} ({key})"
        for sub in cfg.values():  # nested configs (text_config / vision_config) can carry auto_map too
            if isinstance(sub, dict) and sub.get("auto_map"):
                return f"{name} (auto_map)"
    return None


def check_model_folder(folder, what: str) -> None:
    """Refuse a local model / adapter / merged folder that asks for custom code or holds a code-running
    pickle, before any library loads from it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    where = folder_config_asks_for_code(folder)
    if where:
        raise RefusedFileError(
            f"refused {what} {folder}: its {where} asks to run Python code shipped in the folder. capkit loads "
            "model folders as data only (trust_remote_code=False); use a model that transformers supports "
            "natively, saved with save_pretrained.")
    for p in sorted(folder.iterdir()):
        if p.suffix in PICKLE_SUFFIXES and p.is_file():
            torch_load(p, f"{what} file")  # raises RefusedFileError for a pickle that would run code


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def plain_name(name, what: str, error=RefusedFileError) -> str:
    """A file or run name that can't leave its folder or act as a glob pattern: letters, digits, . _ -"""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise error(f"{what} {name!r} is not a plain name (letters, digits, '.', '_', '-'; no path separators, "
                    "no '..', at most 200 characters)")
    return name


def inside(folder, name, what: str) -> Path:
    """folder / name, where name (read from a file that anyone may have edited) must stay in folder."""
    folder = Path(folder)
    p = folder / plain_name(name, what)
    if p.parent.resolve() != folder.resolve():
        raise RefusedFileError(f"{what} {name!r} leaves its folder {folder}")
    return p


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
