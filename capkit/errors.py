"""
capkit's expected failures and the one way a script ends on them.

Every expected failure (a wrong setting, unusable data, a file refused, the Hub unreachable, a disk
that fills up) is one of the exceptions below. A script's main() runs through run_cli(), which turns
them into one paragraph on stderr and the exit code of their class; anything else is a bug and keeps
its traceback. Set CAPKIT_DEBUG=1 to see the traceback of an expected failure too.

    exit 0    done
    exit 1    NothingReadable: inference.py / eval.py / load_model_example.py could read none of the images
    exit 2    ConfigError, DataError: a hyperparameter, a flag, or the data / file it names can't be used
    exit 3    RunStopped: a file could not be written (disk full, permissions), or training stopped on
              repeated NaN/inf losses; everything saved before is intact and named
    exit 4    RefusedFileError: a checkpoint or model folder that would run code, or is damaged / not capkit's
    exit 5    HubUnavailableError: a download is needed and the Hugging Face Hub can't be reached
    exit 6    TargetMissed: targets.py measured a result below one of the targets it checks
    exit 130  interrupted (Ctrl-C in eval / inference; a second interrupt during training or serving)

This module imports nothing of capkit's, so every other module can use it.
"""
from __future__ import annotations

import errno
import os
import sys

EXIT_CODES = {0: "done", 1: "no input could be read", 2: "configuration or data", 3: "could not write / run stopped",
              4: "file refused", 5: "offline", 6: "target missed", 130: "interrupted"}


class CapkitError(Exception):
    """An expected failure: its message is the whole explanation (what, which file or key, what to do)."""
    exit_code = 2


class NothingReadable(CapkitError):
    """Not one of the images to caption or evaluate could be read (each was skipped and named)."""
    exit_code = 1


class ConfigError(CapkitError, ValueError):
    """A hyperparameter or command-line flag is unknown, of the wrong type or out of range."""
    exit_code = 2


class DataError(CapkitError, ValueError):
    """The dataset, or a captions / predictions / references file, can't be used as a whole."""
    exit_code = 2


class MissingInputError(DataError, FileNotFoundError):
    """A file or folder that the configuration or a flag names does not exist."""


class RunStopped(CapkitError, RuntimeError):
    """Work stopped with what was saved before intact: a write failed, or the losses went non-finite."""
    exit_code = 3


class SaveError(RunStopped):
    """A checkpoint could not be written (disk full, permissions): the run stops, the previous one is intact."""


class NonFiniteError(RunStopped):
    """Too many NaN/inf losses or gradients in a row: the run stops (the last checkpoint is intact)."""


class RefusedFileError(CapkitError, ValueError):
    """A checkpoint, training state or model folder that would run code, or that is damaged or not capkit's."""
    exit_code = 4


class HubUnavailableError(CapkitError, RuntimeError):
    """A hub download was needed but the Hugging Face Hub is unreachable and nothing is cached."""
    exit_code = 5


class TargetMissed(CapkitError):
    """targets.py: a measured figure is below its target (the printed table and claims say which)."""
    exit_code = 6


# OSErrors that are the machine's state, not a bug: reported in one sentence with exit 3
_WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


def describe_os_error(e: OSError) -> str | None:
    """One sentence for a disk-full / permission OSError, or None for any other."""
    why = _WRITE_ERRNOS.get(e.errno)
    if why is None:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return f"could not read or write a file{where}: {why}. Free space or fix the permissions, then run again."


# OSErrors about a path the user typed (a name too long, a loop of links): exit 2
_PATH_ERRNOS = {errno.ENAMETOOLONG: "a file name in it is too long", errno.ELOOP: "it loops through symbolic links"}


def run_cli(main, argv=None) -> int:
    """main(argv) -> exit code, with every expected failure turned into one paragraph and its exit code."""
    try:
        return main(argv)
    except CapkitError as e:
        if os.environ.get("CAPKIT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno in _PATH_ERRNOS and not os.environ.get("CAPKIT_DEBUG"):
            print(f"error: can't use the path {e.filename}: {_PATH_ERRNOS[e.errno]}", file=sys.stderr)
            return ConfigError.exit_code
        message = describe_os_error(e)
        if message is None or os.environ.get("CAPKIT_DEBUG"):
            raise
        print(f"error: {message}", file=sys.stderr)
        return RunStopped.exit_code
