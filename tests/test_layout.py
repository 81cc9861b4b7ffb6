"""The code's shape, checked: no import circles among capkit's modules, capkit's modules imported at the
top (a lazy import hides a circle), no function longer than 80 lines, the shared helpers at the bottom
of the import graph, and one default per setting."""
import ast
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import REPO

MODULES = {p.stem: p for p in sorted(REPO.glob("*.py"))}
MAX_FUNCTION_LINES = 80
# third-party packages that may be imported inside a function: optional extras, and the scorer's parts
LAZY_OK = {"peft", "bitsandbytes", "pycocoevalcap", "wandb", "prodigyopt"}
# the bottom of the graph: what each may import of capkit's own modules
LEAVES = {"errors": set(), "checkpoints": set(), "common": {"errors"}, "safeio": {"errors"},
          "shapes": {"errors"}}


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """-> (top-level package imported, whether at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], id(node) in top_level))
    return out


def import_graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports (as a list of modules, the first repeated at the end), or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, stack + [nxt])):
                return found
        state[node] = "done"
        return None
    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_circles():  # (so that the next test can fail)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles_among_capkit_modules():
    assert set(LEAVES) <= set(MODULES) and {"train", "model", "dataset", "eval"} <= set(MODULES)
    assert find_cycle(import_graph()) is None


def test_capkit_modules_are_imported_at_the_top_and_only_optional_packages_lazily():
    lazy = {f"{name}.py imports {m} inside a function" for name, path in MODULES.items()
            for m, at_top in imports_of(path) if not at_top and m not in LAZY_OK}
    assert not lazy


def test_shared_helpers_sit_at_the_bottom_and_no_script_uses_train_py_as_a_library():
    graph = import_graph()
    for leaf, allowed in LEAVES.items():
        assert graph[leaf] <= allowed, f"{leaf}.py imports {graph[leaf] - allowed}"
    assert not [name for name, deps in graph.items() if "train" in deps]


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def test_the_length_check_sees_a_long_function(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\n\ndef g():\n    pass\n")
    assert long_functions(f) == [f"x.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_is_longer_than_80_lines(name):
    assert not long_functions(MODULES[name])


def test_train_py_defaults_agree_with_the_model_config_and_generation_defaults():
    import config
    import train
    from model import CaptionerConfig, Generation
    assert asdict(config.model_config_from_hparams(train.hyperparameters)) == asdict(CaptionerConfig())
    assert train.hyperparameters["max_new_tokens"] == Generation().max_new_tokens
    assert train.hyperparameters["num_beams"] == Generation().num_beams


def late_bound_reads(path: Path) -> list[str]:
    """Nested functions / lambdas that read a local of their enclosing function which is (re)bound after
    they are defined: the closure then sees a value its reader can't find above it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    found = []

    def own_nodes(fn):  # fn's body, not descending into nested functions
        todo = list(ast.iter_child_nodes(fn))
        while todo:
            n = todo.pop()
            yield n
            if not isinstance(n, funcs):
                todo += list(ast.iter_child_nodes(n))

    def params(fn):
        return {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}

    for outer in (n for n in ast.walk(tree) if isinstance(n, funcs)):
        binds = {}
        for n in own_nodes(outer):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                binds.setdefault(n.id, []).append(n.lineno)
        for inner in (n for n in own_nodes(outer) if isinstance(n, funcs)):
            own = params(inner) | {n.id for n in ast.walk(inner) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            reads = {n.id for n in ast.walk(inner) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - own
            for name in sorted(reads & set(binds)):
                late = [ln for ln in binds[name] if ln > inner.end_lineno]
                if late:
                    found.append(f"{path.name}:{inner.lineno} reads {name!r}, rebound at line {late[0]}")
    return found


def test_the_closure_check_sees_a_late_binding(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    x = 1\n    def g():\n        return x\n    x = 2\n    return g\n")
    assert late_bound_reads(f) == ["x.py:3 reads 'x', rebound at line 5"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_closure_reads_a_name_bound_after_it(name):
    assert not late_bound_reads(MODULES[name])


def test_train_reads_as_a_table_of_contents():
    """train() names its stages in order and defines no closures (each stage gets its inputs as arguments)."""
    tree = ast.parse(MODULES["train"].read_text(encoding="utf-8"))
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert fn.end_lineno - fn.lineno + 1 <= 60
    assert not [n for n in ast.walk(fn) if n is not fn and isinstance(n, (ast.FunctionDef, ast.Lambda))]
