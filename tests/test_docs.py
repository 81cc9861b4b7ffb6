"""The documentation, checked against the code: the README stays short, no link in README.md or docs/ is dead
(files and #anchors), and docs/hyperparameters.md lists every key of train.py's `hyperparameters` with the
dict's own default."""
import ast
import re

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", REPO / "capkit" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lstrip("#").strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path) -> set[str]:
    return {slug(line) for line in path.read_text().splitlines() if line.startswith("#")}


def test_the_readme_fits_on_a_few_screens():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_dead_links(doc):
    dead = []
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            dead.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            dead.append(target)
    assert not dead, f"{doc.name}: {dead}"


def test_the_slugs_follow_github():
    assert slug("## The alternative path: GIT and BLIP with QLoRA / LoRA / IA3") == \
        "the-alternative-path-git-and-blip-with-qlora--lora--ia3"
    assert slug("### `encoder_type`: open_clip, timm") == "encoder_type-open_clip-timm"


def documented_defaults() -> dict:
    """docs/hyperparameters.md's table -> {key: default as written, parsed as a Python literal}."""
    found = {}
    for line in (REPO / "docs" / "hyperparameters.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([a-z_0-9]+)`", cells[0])
        values = re.findall(r"`([^`]+)`", cells[1])
        if len(values) == len(keys):
            found.update({k: ast.literal_eval(v) for k, v in zip(keys, values)})
        else:  # one default shared by every key of the row
            found.update({k: ast.literal_eval(values[0]) for k in keys})
    return found


def test_every_hyperparameter_is_documented_with_its_default():
    import train
    documented = documented_defaults()
    assert set(documented) == set(train.hyperparameters)
    wrong = {k: (documented[k], v) for k, v in train.hyperparameters.items() if documented[k] != v}
    assert not wrong, wrong


def test_the_allowed_values_table_is_the_one_the_code_declares():
    """docs/hyperparameters.md's "Allowed values" table is generated from the choices and bounds the parts declare
    (capkit/training/usage.py allowed_table): a bound changed in code and not here fails this test."""
    import train
    from capkit.training.usage import allowed_table
    table = allowed_table(train.hyperparameters)
    assert "| `mapper_num_heads` | in [1, 256] |" in table and "| `lm_dtype` | one of 'auto'" in table
    assert table in (REPO / "docs" / "hyperparameters.md").read_text(), \
        "docs/hyperparameters.md's table is out of date; paste this one:\n" + table
