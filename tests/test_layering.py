"""The import graph of worker/ and model/ (docs/ARCHITECTURE.md, "Layers"), read from the sources with ``ast``.

Every import counts: module level, inside functions, under ``if TYPE_CHECKING:``. The rules:

* no import cycle among the modules of worker/ and model/;
* the layers of worker/ only import downwards: shared modules (worker/*.py) < media < engine < jobs <
  service < tools; shared modules import no sub-package; model/ never imports worker/;
* rq is imported only in worker/jobs/; torch never in worker/media/ (the decoder processes and the GPU
  benchmark image load media without it);
* at run time, a producer (``worker.jobs.enqueue``, ``worker.jobs.status``) does not load torch, and the
  decoder modules load neither torch, rq nor the settings module.

The checker itself is tested on a small synthetic graph, so a rule that stopped firing would show.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("worker", "model")
#: worker's layers, bottom to top; a module of a layer imports only its own layer and the ones below.
LAYERS = ("shared", "media", "engine", "jobs", "service", "tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    """Every module of worker/ and model/, by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(tree: ast.AST, name: str, is_package: bool, modules: set[str] | dict[str, Path]) -> set[str]:
    """Dotted names of everything ``tree`` imports, anywhere in it. ``from a import b`` is ``a.b`` when
    that is one of ``modules``, else ``a``; relative imports are resolved against ``name``."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return out


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(imports of our own modules, top-level external packages imported), per module."""
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in modules.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", modules)
        edges[name] = {n for n in names if n in modules} - {name}
        external[name] = {n.split(".")[0] for n in names if n.split(".")[0] not in PACKAGES}
    return edges, external


def layer(name: str) -> str | None:
    """The layer of one of worker's modules (None for model/)."""
    parts = name.split(".")
    if parts[0] != "worker":
        return None
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "shared"


def layer_violations(edges: dict[str, set[str]], external: dict[str, set[str]]) -> list[str]:
    found = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            if a.startswith("model") and b.startswith("worker"):
                found.append(f"{a} imports {b}: model/ never imports worker/")
            la, lb = layer(a), layer(b)
            if la is not None and lb is not None and LAYERS.index(lb) > LAYERS.index(la):
                found.append(f"{a} ({la}) imports {b} ({lb}): a lower layer imports a higher one")
    for a, names in sorted(external.items()):
        if "rq" in names and layer(a) != "jobs":
            found.append(f"{a} imports rq: only worker/jobs/ does")
        if "torch" in names and layer(a) == "media":
            found.append(f"{a} imports torch: worker/media/ never does")
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph(source_modules())


def test_the_layers_exist_and_have_modules(graph):
    edges, _ = graph
    for name in LAYERS[1:]:
        assert any(m.startswith(f"worker.{name}.") for m in edges), name
    assert "worker.jobs.task" in edges["worker.jobs"]  # rq finds worker.jobs.tag_video through the package


def test_no_import_cycles(graph):
    edges, _ = graph
    assert cycles(edges) == []


def test_imports_go_down_the_layers(graph):
    assert layer_violations(*graph) == []


def test_the_checker_catches_a_cycle_and_an_upward_import():
    edges = {
        "worker.media.source": {"worker.engine.pipeline"},  # media -> engine: upward
        "worker.engine.pipeline": {"worker.media.source"},  # and back: a cycle
        "worker.config": {"worker.jobs.task"},  # shared -> jobs: upward
        "worker.jobs.task": set(),
        "model.extractors": {"worker.config"},  # model -> worker
    }
    external = {"worker.media.open": {"rq", "torch"}, "worker.engine.pipeline": {"torch"}}
    assert cycles(edges) == [["worker.engine.pipeline", "worker.media.source"]]
    assert layer_violations(edges, external) == [
        "model.extractors imports worker.config: model/ never imports worker/",
        "worker.config (shared) imports worker.jobs.task (jobs): a lower layer imports a higher one",
        "worker.media.source (media) imports worker.engine.pipeline (engine): a lower layer imports a higher one",
        "worker.media.open imports rq: only worker/jobs/ does",
        "worker.media.open imports torch: worker/media/ never does",
    ]


def test_function_level_and_type_checking_imports_count():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from worker.engine import pipeline\n"
        "def f():\n    import worker.jobs.task\n    from . import sink\n"
    )
    modules = {"worker.engine.pipeline", "worker.jobs.task", "worker.jobs.sink"}
    names = imported_names(tree, "worker.jobs.enqueue", False, modules)
    assert modules <= names


LIGHT = """
import sys
import {module}
loaded = [m for m in {forbidden} if m in sys.modules]
print(",".join(loaded))
"""


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("worker.jobs.enqueue", ("torch",)),
        ("worker.jobs.status", ("torch",)),
        ("worker.jobs", ("torch",)),
        ("worker.media.source", ("torch", "rq", "pydantic_settings")),
        ("worker.media.isolation", ("torch", "rq", "pydantic_settings")),
        ("worker.media.decoder_child", ("torch", "rq", "pydantic_settings")),
        ("model.log_mel", ("torch",)),
    ],
)
def test_light_modules_stay_light(module, forbidden):
    out = subprocess.run([sys.executable, "-c", LIGHT.format(module=module, forbidden=forbidden)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "", f"importing {module} loads {out.stdout.strip()}"
