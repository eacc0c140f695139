"""vqtok's imports point down only: core -> kernels, data, backbones -> quantize, codebook, models -> train, metrics,
bench (and later generate, convert, sweep) -> cli. Within a layer, packages may import each other without cycles.

Every `import` / `from ... import` in src/vqtok is read with `ast`, including those inside functions (a lazy import is
still a dependency). Run `python tests/test_layers.py` to print the package graph.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vqtok"
LAYERS = [
    {"core"},
    {"kernels", "data", "backbones"},
    {"quantize", "codebook", "models"},
    {"train", "metrics", "generate", "convert", "sweep", "bench", "bench_command", "bench_train"},
    {"cli", "__main__", "__init__"},  # __init__: the package's public API, re-exported from below
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_imports(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the vqtok modules it imports}, names relative to the package ("quantize.lc", "core", "cli")."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts) or "__init__"
        here = parts[:-1]  # the package this file's relative imports start from
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    stem = base + (node.module.split(".") if node.module else [])
                elif node.module and (node.module == "vqtok" or node.module.startswith("vqtok.")):
                    stem = node.module.split(".")[1:]
                else:
                    continue
                # `from .. import distributed` names a module (count it), `from .. import __version__` does not
                targets = [".".join(stem + [a.name]) if _is_module(root, stem + [a.name]) else ".".join(stem)
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("vqtok.")]
            for target in targets:
                edges[module].add(target or "__init__")
    return edges


def _is_module(root: Path, parts: list[str]) -> bool:
    path = root.joinpath(*parts) if parts else root
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def top(module: str) -> str:
    return module.split(".")[0]


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Imports between top-level packages (self-imports dropped)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, targets in edges.items():
        for target in targets:
            if top(source) != top(target):
                graph[top(source)].add(top(target))
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports, packages missing from LAYERS, and cycles within a layer."""
    found = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            for name in (source, target):
                if name not in LAYER_OF:
                    found.append(f"{name} is in no layer: add it to LAYERS")
            if source in LAYER_OF and target in LAYER_OF and LAYER_OF[target] > LAYER_OF[source]:
                found.append(f"{source} (layer {LAYER_OF[source]}) imports {target} (layer {LAYER_OF[target]})")
    for cycle in _cycles(graph):
        found.append("cycle: " + " -> ".join(cycle))
    return sorted(set(found))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_imports_point_down_the_layers():
    graph = package_graph(module_imports())
    assert {"core", "quantize", "models", "train", "metrics", "cli"} <= set(graph) | {"core"}
    assert violations(graph) == []


def test_no_two_modules_import_each_other():
    """Module level, package __init__ files excluded (they re-export their own modules): e.g. ibq.py and the IBQ
    kernel once imported each other behind a local import."""
    edges = module_imports()
    modules = {m: {t for t in ts if t in edges and t != m and not _is_package(t)}
               for m, ts in edges.items() if not _is_package(m)}
    assert _cycles(modules) == []


def _is_package(module: str) -> bool:
    return module == "__init__" or (PACKAGE.joinpath(*module.split(".")) / "__init__.py").is_file()


def test_core_imports_nothing_above_it():
    edges = module_imports()
    assert {t for s, ts in edges.items() if top(s) == "core" for t in ts if top(t) != "core"} == set()


@pytest.mark.parametrize("source, target", [("quantize", "train"), ("core", "data"), ("kernels", "quantize"),
                                            ("models", "metrics"), ("quantize", "models")])
def test_an_upward_import_or_a_cycle_within_a_layer_is_reported(source, target):
    graph = package_graph(module_imports())
    graph[source].add(target)
    assert violations(graph), f"{source} -> {target} was not reported"


def test_the_reader_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "vqtok"
    (package / "quantize").mkdir(parents=True)
    (package / "train.py").write_text("")
    (package / "quantize" / "lc.py").write_text(
        "from ..core.io import x\nfrom .. import train\ndef f():\n    import vqtok.metrics.fid\n")
    assert module_imports(package)["quantize.lc"] == {"core.io", "train", "metrics.fid"}


if __name__ == "__main__":
    graph = package_graph(module_imports(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE))
    for level, names in enumerate(LAYERS):
        for name in sorted(names & set(graph) | {n for n in names if any(n in t for t in graph.values())}):
            print(f"{level} {name:14s} -> {', '.join(sorted(graph.get(name, ()))) or '-'}")
    problems = violations(graph)
    print("\n".join(problems) if problems else "no violations")
