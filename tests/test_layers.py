"""Imports run one way (DESIGN.md, "Layers"): processes -> activities -> store, runtime -> schemas.

Run: python -m pytest tests/test_layers.py -q

Every .py file of the product packages is parsed with `ast`; every import counts, at module
level or inside a function (a lazy import still ties the two modules together), and relative
imports are resolved. A failure names the file, the line and the rule broken.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The packages of the distribution (pyproject.toml's packages.find), by layer: a module may
# import its own package and packages of a lower layer, never one of a higher layer.
LAYER = {
    "schemas": 0,
    "store": 1,
    "runtime": 1,
    "activities": 2,
    "workflows": 3,  # hosted and started by the processes; imports only schemas
    "cli": 3,
    "api": 3,
    "worker_cpu": 3,
    "worker_gpu": 3,
}
# The activities that run on the CPU queue (preflight, snapshot, publish, and the CPU
# worker's own: events): they never import torch or worker_gpu. (Tokenizing goes through
# transformers, which imports torch itself: see activities.base_model.load_tokenizer.)
CPU_ACTIVITIES = {"activities.preflight", "activities.snapshot", "activities.publish", "activities.cpu"}
# The GPU-queue activities live with the recipe they run, in worker_gpu: no import runs up a layer.
GPU_ACTIVITIES = {"worker_gpu.activities"}
# Modules that define activities: the API reaches them through Temporal, not by import.
ACTIVITY_MODULES = CPU_ACTIVITIES | GPU_ACTIVITIES
# What a workflow module may import besides schemas: the SDK, pydantic, the standard library.
WORKFLOW_THIRD_PARTY = {"temporalio", "pydantic"}
TORCH = "torch"


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (ours: a module of the graph; else its full dotted name)
    file: Path
    line: int
    lazy: bool  # inside a function

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}{' (inside a function)' if self.lazy else ''}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LAYER for p in sorted((ROOT / pkg).rglob("*.py"))}


def _function_import_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lines |= {n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Imports under `if TYPE_CHECKING:` never run; they are for type checkers only."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _imports(modules: dict[str, Path]) -> list[Import]:
    """Every import statement of every module, resolved to the module it loads."""

    def ours(name: str) -> str:
        # `import a.b.c` or `from a.b import c` loads the deepest of these that is a module.
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    out = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        lazy, typing_only = _function_import_lines(tree), _type_checking_lines(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod.
                names = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            if node.lineno in typing_only:
                continue
            for name in dict.fromkeys(names):
                target = ours(name) if name.split(".")[0] in LAYER else name
                if target != mod:
                    out.append(Import(mod, target, path, node.lineno, node.lineno in lazy))
    return out


MODULES = _modules()
IMPORTS = _imports(MODULES)


def _pkg(module: str) -> str:
    return module.split(".")[0]


def _is_ours(module: str) -> bool:
    return _pkg(module) in LAYER


def _loads(module: str) -> list[tuple[Import, ...]]:
    """Import chains from `module` to each module or library it can load: its own imports
    (module level or in its functions), then what importing each of those loads (their
    module-level imports, recursively). Another module's lazy imports are its own business:
    they run only when that function is called."""
    by_source: dict[str, list[Import]] = {}
    for imp in IMPORTS:
        by_source.setdefault(imp.source, []).append(imp)
    chains: dict[str, tuple[Import, ...]] = {}
    todo = [(imp,) for imp in by_source.get(module, [])]
    while todo:
        chain = todo.pop()
        target = chain[-1].target
        if target in chains or target == module:
            continue
        chains[target] = chain
        if _is_ours(target):
            todo += [chain + (imp,) for imp in by_source.get(target, []) if not imp.lazy]
    return list(chains.values())


def _chain(chain: tuple[Import, ...]) -> str:
    """`a -> b (file:line) -> c (file:line)`: the first import is the failure's own file:line."""
    return " -> ".join([chain[0].target] + [f"{imp.target} ({imp.where})" for imp in chain[1:]])


def test_the_walk_sees_every_package():
    """A guard on the walk itself: it must see the imports it exists to check."""
    assert set(map(_pkg, MODULES)) == set(LAYER)
    assert any(imp.lazy for imp in IMPORTS), "no import inside a function was found: the walk is broken"
    seen = {imp.target if _is_ours(imp.target) else _pkg(imp.target) for imp in IMPORTS if imp.source == "workflows.tune_llm"}
    assert {"schemas.activities", "schemas.search_attributes", "temporalio"} <= seen


def _runs_up(imp: Import) -> bool:
    if not _is_ours(imp.target) or LAYER[_pkg(imp.target)] <= LAYER[_pkg(imp.source)]:
        return False
    return True


def test_the_walk_resolves_relative_lazy_and_typing_only_imports(tmp_path):
    """The resolver on a made-up tree: relative imports land on the right module, a function's
    import is marked lazy, `from pkg import sub` names the submodule, TYPE_CHECKING ones are skipped."""
    files = {
        "activities/__init__.py": "",
        "activities/snap.py": (
            "from typing import TYPE_CHECKING\n"
            "from . import rows\n"
            "from .rows import read\n"
            "if TYPE_CHECKING:\n    import torch\n"
            "def f():\n    from ..worker_gpu.loading import load\n"
        ),
        "activities/rows.py": "import worker_gpu.loading as w\n",
        "worker_gpu/__init__.py": "",
        "worker_gpu/loading.py": "",
    }
    modules = {}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
        modules[".".join(Path(rel).with_suffix("").parts).removesuffix(".__init__")] = tmp_path / rel
    found = {(i.source, i.target, i.lazy) for i in _imports(modules) if _is_ours(i.target)}
    assert found == {
        ("activities.snap", "activities.rows", False),
        ("activities.snap", "worker_gpu.loading", True),
        ("activities.rows", "worker_gpu.loading", False),
    }
    assert "torch" not in {i.target for i in _imports(modules)}


def test_imports_run_from_higher_layers_to_lower_ones():
    """Each package imports its own modules and those of lower layers (peers of one layer may
    use each other, without a loop); the processes, one layer, are kept apart by the rules below."""
    broken = [
        f"{imp.where}: {imp.source} ({_pkg(imp.source)}, layer {LAYER[_pkg(imp.source)]}) imports {imp.target} "
        f"({_pkg(imp.target)}, layer {LAYER[_pkg(imp.target)]}): a lower layer must not import a higher one; "
        "move the code both need down"
        for imp in IMPORTS
        if _runs_up(imp)
    ]
    assert not broken, "\n".join(broken)


def test_workflows_import_only_schemas_and_the_sdk():
    stdlib = sys.stdlib_module_names
    broken = [
        f"{imp.where}: workflow module {imp.source} imports {imp.target}: workflows import only schemas, "
        "the Temporal SDK, pydantic and the standard library (they replay in the sandbox)"
        for imp in IMPORTS
        if _pkg(imp.source) == "workflows"
        and not (_pkg(imp.target) in ("schemas", "workflows", "__future__") or _pkg(imp.target) in WORKFLOW_THIRD_PARTY
                 or _pkg(imp.target) in stdlib)
    ]
    assert not broken, "\n".join(broken)


def _forbidden_loads(sources, banned, rule: str) -> list[str]:
    out = []
    for mod in sorted(sources):
        for chain in _loads(mod):
            if banned(chain[-1].target):
                out.append(f"{chain[0].where}: {mod} imports {_chain(chain)}: {rule}")
    return out


def test_the_api_never_imports_the_gpu_worker_or_torch():
    broken = _forbidden_loads(
        (m for m in MODULES if _pkg(m) == "api"),
        lambda t: _pkg(t) in ("worker_gpu", TORCH),
        "the API never imports worker_gpu or torch",
    )
    broken += [
        f"{imp.where}: {imp.source} imports the activity module {imp.target}: the API reaches activities through "
        "Temporal; what both need (constants, rules) lives in a module below the activity"
        for imp in IMPORTS
        if _pkg(imp.source) == "api" and imp.target in ACTIVITY_MODULES
    ]
    assert not broken, "\n".join(broken)


def test_cpu_activities_never_import_the_gpu_worker_or_torch():
    broken = _forbidden_loads(
        CPU_ACTIVITIES,
        lambda t: _pkg(t) in ("worker_gpu", TORCH),
        "a CPU-queue activity never imports worker_gpu or torch, not even inside a function",
    )
    assert not broken, "\n".join(broken)


def test_the_gpu_worker_never_imports_the_cli_or_the_api():
    broken = [
        f"{imp.where}: {imp.source} imports {imp.target}: worker_gpu never imports cli or api"
        for imp in IMPORTS
        if _pkg(imp.source) == "worker_gpu" and _pkg(imp.target) in ("cli", "api")
    ]
    assert not broken, "\n".join(broken)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a cycle path."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if _is_ours(imp.target):
            graph[imp.source].add(imp.target)
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(set(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for scc in sccs:
        # One concrete cycle through the component: walk from its first module back to it.
        start = min(scc)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            for w in sorted(graph[path[-1]] & scc):
                if w == start:
                    cycles.append(path + [start])
                    paths = []
                    break
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def test_no_two_modules_import_each_other():
    where = {(imp.source, imp.target): imp.where for imp in IMPORTS}
    broken = [
        "import loop: " + " -> ".join(f"{a} ({where[a, b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}; "
        "move what both need into the lower one (or a third module)"
        for cycle in _cycles()
    ]
    assert not broken, "\n".join(broken)


def test_starting_the_api_or_the_cpu_worker_loads_no_torch():
    """The static walk's promise, checked for real: importing the API app and the CPU worker
    (workflows and CPU activities included) loads neither torch nor the GPU worker's code."""
    code = (
        "import sys, api.app, worker_cpu.main\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'worker_gpu')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"importing api.app and worker_cpu.main loaded: {out.stdout.strip()}"
