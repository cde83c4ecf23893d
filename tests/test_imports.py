"""The layout's rules, checked on the source: no import cycle (counting imports inside functions
too, since a lazy import that dodges a cycle is still one), and ``models/`` imports nothing above
itself but ``config`` and ``errors``."""

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reptok", "reptok_cli", "export")


# ----------------------------------------------------------------------------- the import graph
def modules_of(root: Path, packages) -> Dict[str, Path]:
    mods = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = f
    return mods


def _targets(mods: Dict[str, Path], current: str, node) -> Set[str]:
    """Modules of ``mods`` that one import statement of ``current`` loads."""
    base = current.split(".") if mods[current].name == "__init__.py" else current.split(".")[:-1]
    names: List[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
        names = [mod] + [f"{mod}.{a.name}" for a in node.names]
    out = set()
    for n in names:
        while n and n not in mods:  # "pkg.mod.attr" -> "pkg.mod"
            n = n.rpartition(".")[0]
        if n and n != current:
            out.add(n)
    return out


def import_graph(root: Path, packages=PACKAGES) -> Dict[str, Set[str]]:
    mods = modules_of(root, packages)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _targets(mods, name, node)
        # A module importing its own parent package is not a cycle worth reporting.
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ----------------------------------------------------------------------------- the rules
def test_no_import_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_models_import_nothing_above_themselves():
    allowed = {"reptok.config", "reptok.errors"}
    for mod, deps in import_graph(ROOT).items():
        if mod.startswith("reptok.models"):
            bad = {d for d in deps if not d.startswith("reptok.models") and d not in allowed}
            assert not bad, f"{mod} imports {sorted(bad)}"


def test_cycle_detector_catches_a_cycle(tmp_path):
    # A package where a lazy import inside a function closes a loop a -> b -> c -> a.
    pkg = tmp_path / "reptok"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..c import thing\n")
    (pkg / "c.py").write_text("def thing():\n    from . import a\n    return a\n")
    (pkg / "d.py").write_text("from .a import x\n")  # depends on the cycle, not part of it
    found = cycles(import_graph(tmp_path, ("reptok",)))
    assert found == [["reptok.a", "reptok.c", "reptok.sub.b"]]
    (pkg / "c.py").write_text("def thing():\n    return 1\n")
    assert cycles(import_graph(tmp_path, ("reptok",))) == []


# ----------------------------------------------------------------------------- package layering
LAYERS = {"reptok": set(), "export": {"reptok"}, "reptok_cli": {"export", "reptok"}}  # who may import whom


def package_violations(graph: Dict[str, Set[str]]) -> List[str]:
    """'a.mod -> b.mod' for every import (module level or inside a function) that goes against
    ``reptok_cli -> export -> reptok``."""
    out = []
    for mod, deps in sorted(graph.items()):
        pkg = mod.split(".")[0]
        for d in sorted(deps):
            if d.split(".")[0] not in LAYERS[pkg] | {pkg}:
                out.append(f"{mod} -> {d}")
    return out


def test_packages_depend_one_way():
    assert package_violations(import_graph(ROOT)) == []


def test_layering_check_catches_an_in_function_upward_import(tmp_path):
    # reptok/a.py reaching up into export inside a function is a violation; the reverse is not.
    for pkg in ("reptok", "export"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "export" / "x.py").write_text("from reptok import a\n")
    (tmp_path / "reptok" / "a.py").write_text("def f():\n    from export.x import g\n    return g\n")
    graph = import_graph(tmp_path, ("reptok", "export"))
    assert package_violations(graph) == ["reptok.a -> export.x"]


def test_reptok_bench_needs_the_runtimes_handed_in():
    """reptok.bench measures torch alone; onnx / trt rows come from export.bench (which passes
    its RUNTIMES). Catches: onnx / trt silently dropped from the report when nothing builds them."""
    import pytest

    from export.bench import RUNTIMES
    from reptok.bench import run_bench
    from reptok.errors import InputError

    with pytest.raises(InputError, match="export.bench"):
        run_bench(preset="tiny", backends="torch,onnx")
    assert callable(RUNTIMES.check) and callable(RUNTIMES.pipelines)


# ----------------------------------------------------------------------------- function length
MAX_FUNCTION_LINES = 80
# Functions in files other engineers are reshaping in parallel; the integrator removes each entry
# once their split has merged.
LENGTH_WAIVERS: set = set()


def long_functions(root: Path, packages=PACKAGES, limit=MAX_FUNCTION_LINES) -> Dict[str, int]:
    """``"path:qualname" -> lines`` for every function (methods and nested ones too) over ``limit``."""
    out = {}

    def walk(node, prefix, path):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    n = child.end_lineno - child.lineno + 1
                    if n > limit:
                        out[f"{path}:{name}"] = n
                walk(child, name + ".", path)
            else:
                walk(child, prefix, path)

    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            walk(ast.parse(f.read_text(), str(f)), "", f.relative_to(root).as_posix())
    return out


def test_functions_fit_on_a_screen():
    found = long_functions(ROOT)
    too_long = {k: n for k, n in found.items() if k not in LENGTH_WAIVERS}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"
    stale = LENGTH_WAIVERS - set(found)
    assert not stale, f"waivers for functions that now fit (remove them): {sorted(stale)}"


def test_length_rule_sees_methods_and_nested_functions(tmp_path):
    pkg = tmp_path / "reptok"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(4))  # def line + 4 = 5 lines
    (pkg / "m.py").write_text(f"class C:\n    def meth(self):\n    {body.replace(chr(10), chr(10) + '    ').rstrip()}\n"
                              f"def outer():\n    def inner():\n    {body.replace(chr(10), chr(10) + '    ').rstrip()}\n    return inner\n")
    assert long_functions(tmp_path, ("reptok",), limit=4) == {
        "reptok/m.py:C.meth": 5, "reptok/m.py:outer.inner": 5, "reptok/m.py:outer": 7}
    assert long_functions(tmp_path, ("reptok",), limit=7) == {}


# ----------------------------------------------------------------------------- one home per concept
SHARED_CHOICES = ("PRECISIONS", "TRAIN_PRECISIONS", "DTYPES", "BACKENDS", "SOLVERS", "IMAGE_EXTENSIONS", "SD_VAE_CONFIG")


def literal_homes(root: Path, packages=PACKAGES) -> Dict[str, List[str]]:
    """``name -> [module, ...]`` for each module that spells one of SHARED_CHOICES out as a literal
    at top level (a derived subset such as ``tuple(DTYPES)`` or an import is not a second home)."""
    homes: Dict[str, List[str]] = {}
    for mod, path in modules_of(root, packages).items():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                literal = isinstance(node.value, (ast.Tuple, ast.List, ast.Set, ast.Dict)) or (
                    isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") in ("dict", "frozenset", "set"))
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in SHARED_CHOICES and literal:
                        homes.setdefault(t.id, []).append(mod)
    return homes


def test_each_shared_choice_has_one_home():
    homes = literal_homes(ROOT)
    assert {k: v for k, v in homes.items() if len(v) != 1} == {}
    assert homes["IMAGE_EXTENSIONS"] == ["reptok.images"]
    assert homes["SD_VAE_CONFIG"] == ["reptok.models.vae"]
