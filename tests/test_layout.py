"""The code's shape, checked: only the scripts and the two modules a user reads at the root, library code in
capkit/, tools in tools/; no import circles; no module imports an entry-point script; capkit's modules imported
at the top (a lazy import hides a circle); no function longer than 80 lines; the shared helpers at the bottom of
the import graph; and one default per setting."""
import ast
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import REPO

ROOT_MODULES = {"train", "eval", "inference", "serve", "load_model_example", "model", "dataset"}
ENTRY_POINTS = ROOT_MODULES - {"model", "dataset"}  # scripts a user runs: nothing imports them
PACKAGES = ("capkit", "tools")


def dotted(path: Path) -> str:
    """capkit/data/images.py -> capkit.data.images; capkit/serving/__init__.py -> capkit.serving."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# every module, by the name it is imported as: root modules, capkit.x, capkit.part.x, tools.x
MODULES = {**{p.stem: p for p in sorted(REPO.glob("*.py"))},
           **{dotted(p): p for d in PACKAGES for p in sorted((REPO / d).rglob("*.py"))}}
MAX_FUNCTION_LINES = 80
# third-party packages that may be imported inside a function: optional extras, and the scorer's parts
LAZY_OK = {"peft", "bitsandbytes", "pycocoevalcap", "wandb", "prodigyopt"}
# the shared leaves at the bottom of the graph: what each may import of capkit's own modules
LEAVES = {"capkit": set(), "capkit.errors": set(), "capkit.names": set(), "capkit.checkpoints": {"capkit.errors", "capkit.files", "capkit.names"},
          "capkit.files": {"capkit.errors"}, "capkit.runtime": {"capkit.errors"}, "capkit.cli": {"capkit.errors"},
          "capkit.hub": {"capkit.errors", "capkit.files"}}
# the parts above them (capkit/README.md): each imports the leaves, its own part and the parts below it; evaluation
# and training sit side by side on the models; serving is apart (serve.py puts it together with a model)
BELOW = {"data": set(), "models": {"data"}, "evaluation": {"data", "models"}, "training": {"data", "models"},
         "serving": set()}


def part_of(module: str) -> str | None:
    """capkit.data.images -> "data"; a leaf, a root module or a tool -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "capkit" and len(parts) > 1 and parts[1] in BELOW else None


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """-> (module imported, whether at module level) for every import statement in the file: a capkit or tools
    module by its dotted name (`from capkit.data import images` and `from capkit.data.images import x` both give
    capkit.data.images), anything else by its top-level package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            out += [(own_name(a.name), at_top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PACKAGES:
                out += [(own_name(f"{node.module}.{a.name}"), at_top) for a in node.names]
            else:
                out.append((own_name(node.module), at_top))
    return out


def own_name(module: str) -> str:
    """A dotted import -> the module it names: the longest prefix that is one of ours (capkit.data.images.SkipLog
    -> capkit.data.images), or the top-level package for anything else."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return parts[0]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return module


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


def layering_breaks(graph: dict[str, set[str]]) -> list[str]:
    """Imports that break the layering: a leaf importing more than LEAVES allows it, or a part importing a part
    that is not below it (BELOW)."""
    breaks = [f"{leaf} imports {sorted(graph[leaf] - allowed)}" for leaf, allowed in LEAVES.items()
              if graph.get(leaf, set()) - allowed]
    for name, deps in sorted(graph.items()):
        if (part := part_of(name)) is None:
            continue
        for dep in sorted(deps):
            if dep.startswith("capkit") and dep not in LEAVES and part_of(dep) not in {part} | BELOW[part]:
                breaks.append(f"{name} ({part}) imports {dep} ({part_of(dep)})")
    return breaks


def test_only_the_scripts_and_the_two_modules_a_user_reads_sit_at_the_root():
    assert {p.stem for p in REPO.glob("*.py")} == ROOT_MODULES
    assert all((REPO / d).is_dir() for d in ("saved_models", "notebooks", "tests", "capkit", "tools", "docs"))


def test_the_cycle_finder_finds_circles():  # (so that the next test can fail)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles_among_capkit_modules():
    assert set(LEAVES) <= set(MODULES) and ROOT_MODULES <= set(MODULES)
    assert find_cycle(import_graph()) is None


def test_capkit_modules_are_imported_at_the_top_and_only_optional_packages_lazily():
    lazy = {f"{name} imports {m} inside a function" for name, path in MODULES.items()
            for m, at_top in imports_of(path) if not at_top and m not in LAZY_OK}
    assert not lazy


def test_the_import_reader_names_capkit_modules_however_they_are_imported(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from capkit.training import config\nfrom capkit import errors\nfrom capkit.files import read_json\n"
                 "import capkit.data.images as im\nimport torch.nn\ndef f():\n    import model\n")
    assert imports_of(f) == [("capkit.training.config", True), ("capkit.errors", True), ("capkit.files", True),
                             ("capkit.data.images", True), ("torch", True), ("model", False)]


def test_the_layering_check_sees_a_part_importing_upwards():
    graph = {**import_graph(), "capkit.data.images": {"capkit.models.captioner"},
             "capkit.files": {"capkit.hub"}, "capkit.serving.batcher": {"capkit.models.decoders"}}
    assert layering_breaks(graph) == ["capkit.files imports ['capkit.hub']",
                                      "capkit.data.images (data) imports capkit.models.captioner (models)",
                                      "capkit.serving.batcher (serving) imports capkit.models.decoders (models)"]


def test_every_module_belongs_to_a_part_or_is_a_shared_leaf():
    loose = [m for m in MODULES if m.startswith("capkit") and m not in LEAVES and part_of(m) is None]
    assert not loose
    assert {p.name for p in (REPO / "capkit").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(BELOW)


def test_the_parts_are_layered_leaves_data_models_then_evaluation_and_training_with_serving_apart():
    assert not layering_breaks(import_graph())


def test_no_module_imports_an_entry_point_script_and_the_package_stands_alone():
    graph = import_graph()
    assert not {name: deps & ENTRY_POINTS for name, deps in graph.items() if deps & ENTRY_POINTS}
    # the package stands alone (pip install): it imports neither the root modules nor the tools
    assert not {name: deps for name, deps in graph.items()
                if name.startswith("capkit") and {d for d in deps if not d.startswith("capkit")}}


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


def compile_warnings(path: Path) -> list[str]:
    """What compiling the file warns about: an invalid escape such as "\\w" in a plain string is a
    DeprecationWarning on Python 3.11, a SyntaxWarning on 3.12 (printed at every user's first import), later an
    error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
    return [str(w.message) for w in caught]


def test_the_compile_check_sees_an_invalid_escape(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('PATTERN = "(\\w+)"\n')
    assert any("escape" in m for m in compile_warnings(f))


def test_every_module_compiles_without_warnings():
    assert {name: w for name, path in MODULES.items() if (w := compile_warnings(path))} == {}


def test_train_py_defaults_agree_with_the_model_config_and_generation_defaults():
    import train
    from capkit.models.captioner import SHAPING_FIELDS, CaptionerConfig, Generation
    from capkit.training import config
    assert asdict(config.model_config_from_hparams(train.hyperparameters)) == asdict(CaptionerConfig())
    assert train.hyperparameters["max_new_tokens"] == Generation().max_new_tokens
    assert train.hyperparameters["num_beams"] == Generation().num_beams
    assert all(train.hyperparameters[k] == getattr(Generation(), k) for k in SHAPING_FIELDS)


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


def test_the_wheel_holds_every_module_of_the_package(tmp_path):
    """pyproject.toml names every subpackage: a non-editable install (`pip install .`) gets all of capkit, not the
    top level alone. Built here without dependencies or network (the wheel's file list is what pip installs)."""
    import shutil
    import subprocess
    import sys
    import zipfile
    src = tmp_path / "src"  # a copy of what git tracks, so the build leaves nothing in the clone
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git clone: the tracked files are unknown")
    for name in tracked:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    if build.returncode and "No module named" in build.stderr:
        pytest.skip(f"can't build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("capkit-*.whl")
    inside = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    ours = {n for n in tracked if n.endswith(".py") and n.split("/")[0] in PACKAGES}
    assert ours | {f"{m}.py" for m in ROOT_MODULES} <= inside
