"""
What the scripts share on their command lines: argparse value types (int_at_least, positive_int), the output file a
user names (checked before any work), and the `path<TAB>caption` lines they print.

Imports nothing of capkit's but errors.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from capkit.errors import ConfigError


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


def float_in(low: float, high: float, low_open: bool = False):
    """argparse type: a finite number in [low, high] ((low, high] with low_open): --temperature, --top_p, ..."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < v if low_open else low <= v) or not v <= high:
            raise argparse.ArgumentTypeError(f"{v} must be in {'(' if low_open else '['}{low:g}, {high:g}]")
        return v
    return parse


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
