"""
`python train.py --help`: the script's commands (its docstring), the presets, and every hyperparameter with its
default and the comment beside it in train.py's `hyperparameters` dict — the one place each key is documented
(read from the source with `tokenize`, so the help can't drift from the dict). Then the seeds' flag names.

    from capkit.training.usage import help_text
    print(help_text(train.__doc__, Path(train.__file__), train.hyperparameters, train.PRESETS))
"""
from __future__ import annotations

import io
import tokenize
from pathlib import Path

from capkit.names import RENAMED_KEYS, SPELLINGS
from capkit.training.config import CHOICES, NOT_KEYS, RANGES, describe_range

DICT_NAME = "hyperparameters"


def key_comments(source: str, dict_name: str = DICT_NAME) -> dict[str, str]:
    """{key: its comment} for the dict literal `dict_name = {...}` in `source`: the comment on the key's line and
    the comment-only lines under it that are indented past the keys (a comment at the keys' own indent heads
    the next group instead)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    start = next(i for i, t in enumerate(tokens) if t.type == tokenize.NAME and t.string == dict_name
                 and t.start[1] == 0 and tokens[i + 1].string == "=" and tokens[i + 2].string == "{") + 3
    out, key, depth, key_col = {}, None, 1, None
    for i in range(start, len(tokens)):
        t = tokens[i]
        if t.type == tokenize.OP and t.string in "([{":
            depth += 1
        elif t.type == tokenize.OP and t.string in ")]}":
            depth -= 1
            if depth == 0:
                break
        elif depth == 1 and t.type == tokenize.STRING and tokens[i + 1].string == ":":
            key, key_col = t.string.strip("\"'"), t.start[1]
            out[key] = []
        elif t.type == tokenize.COMMENT and key is not None:
            own_line = not t.line[:t.start[1]].strip()
            if own_line and t.start[1] <= key_col:
                key = None  # a group's heading comment: not the previous key's
                continue
            out[key].append(t.string.lstrip("#").strip())
    return {k: " ".join(parts) for k, parts in out.items()}


def allowed(key: str) -> str | None:
    """What a key accepts, as config.py checks it (its CHOICES or RANGES, which the parts declare): "one of 'mlp',
    'linear', ..." or "in [1, 256]"; None for a key with no such rule."""
    if key in CHOICES:
        return "one of " + ", ".join(map(repr, CHOICES[key]))
    if key in RANGES:
        return describe_range(RANGES[key])
    return None


def allowed_table(defaults: dict) -> str:
    """The markdown table of every key's allowed values, in the dict's order (docs/hyperparameters.md holds a copy;
    tests/test_docs.py checks it is this one)."""
    rows = [f"| `{k}` | {rule.replace('|', '/')} |" for k in defaults if (rule := allowed(k))]
    return "\n".join(["| key | allowed |", "|---|---|", *rows])


def help_text(doc: str, script: Path, defaults: dict, presets: dict) -> str:
    comments = key_comments(script.read_text(encoding="utf-8"))
    lines = [doc.strip(), "", f"presets (--preset NAME): {', '.join(presets)}", "",
             "hyperparameters (--KEY=VALUE or --KEY VALUE; a boolean given bare is True, --no-KEY is False), "
             "with their defaults:"]
    for key, value in defaults.items():
        lines.append(f"  --{key}={value!r}" + (f"    ({rule})" if (rule := allowed(key)) else ""))
        if comments.get(key):
            lines.append(f"        {comments[key]}")
    seeds = ", ".join(f"--{a} ({k})" for a, k in SPELLINGS.items())
    renamed = ", ".join(f"--{a} ({k})" for a, k in RENAMED_KEYS.items() if k in defaults)
    lines += ["", f"the seed projects' flag names, read as capkit's keys: {seeds}",
              f"capkit's old names (capkit/names.py), still read everywhere: {renamed}",
              f"not keys (each says what to use instead): {', '.join('--' + k for k in NOT_KEYS)}",
              "docs/hyperparameters.md has the same keys in a table; docs/seeds.md maps the seeds' commands."]
    return "\n".join(lines)
