"""The tree reads as the pipeline: no import cycles, each layer imports only those below it, small files.

Imports are read from the source with ``ast`` (nothing is imported, so the check takes a second):
module-level ones, those inside functions (often written to hide a cycle) and those under
``if TYPE_CHECKING:`` all count, since each one is a dependency a reader has to follow.

Layers, lowest first:

    utilities (UTILITIES below)  →  revify.runtime  →  revify.passes.{capture → analysis → planning → rewrite}
                                                       revify.passes.prediction (after capture and analysis)
    →  revify's public surface (every other module of ``revify/``: api, cli, report, estimate, io, ...)
"""
from __future__ import annotations

import ast
import importlib.util
import itertools
from pathlib import Path

import networkx as nx
import pytest

# Top-level modules of ``revify/`` that passes and runtime may import. Each is a floor every
# stage stands on and imports only other modules of this list, never the public surface.
UTILITIES = {
    "revify.messages": "one line of an exception, cut at a word: the reasons passes record and the CLI's errors",
    "revify.units": "parses and prints bytes and FLOPs; the planner's budget errors and the plan summary use it",
    "revify.training_step": "calls a model on its example inputs, derives the default loss, syncs CUDA: "
                            "how every measurement, in a pass or in the report, runs a step",
    "revify.storage_tracking": "storage identity, the saved-tensor hook and the live-storage tracker: capture's "
                               "call recorder and the planner's profiles observe memory with them",
    "revify.forward_timing": "forward times of blocks: the planner prices recompute in them, the report too",
    "revify.measure": "saved, retained and peak bytes of one step: prediction runs it on fake tensors, "
                      "the planner's profiles on blocks",
}
STAGES = ("capture", "analysis", "planning", "rewrite")  # each imports only itself and earlier ones
PREDICTION_MAY_IMPORT = ("capture", "analysis", "prediction")
MAX_LINES = 450


def package_roots() -> dict[str, Path]:
    """Package name → folder, as installed (pyproject's package-dir puts ``revify.passes`` in ``passes/``)."""
    return {name: Path(importlib.util.find_spec(name).submodule_search_locations[0])
            for name in ("revify", "revify.passes")}


def modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Every module under the roots, by dotted name; a root nested in another's folder is named by its own."""
    found: dict[str, Path] = {}
    for pkg, folder in sorted(roots.items()):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([pkg, *parts])] = path
    return found


def _lazy_names(init: Path) -> dict[str, str]:
    """``revify/__init__``'s ``_PUBLIC``: ``from revify import report`` depends on the module defining it."""
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_PUBLIC" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def import_graph(mods: dict[str, Path], lazy: dict[str, str] | None = None) -> nx.DiGraph:
    """Module → module it imports (edge attribute ``at``: file and line), for modules in ``mods`` only."""
    lazy = lazy or {}
    roots = {m.split(".")[0] for m in mods}

    def resolve(name: str) -> str | None:
        while name and name not in mods:  # ``from x import f``: f is a name in x, not a module
            name = name.rpartition(".")[0]
        return name or None

    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = mod.split(".") if is_package else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # a lazy public name of the package (``from revify import report``) is its defining module
                targets = [lazy[a.name] if source == "revify" and a.name in lazy else f"{source}.{a.name}"
                           for a in node.names]
                targets.append(source)  # importing a name runs its module
            else:
                continue
            for target in targets:
                if target.split(".")[0] not in roots:
                    continue
                dep = resolve(target)
                if dep is not None and dep != mod:
                    g.add_edge(mod, dep, at=f"{path.name}:{node.lineno}")
    return g


def _revify_graph() -> tuple[nx.DiGraph, dict[str, Path]]:
    roots = package_roots()
    mods = modules(roots)
    return import_graph(mods, _lazy_names(roots["revify"] / "__init__.py")), mods


def _layer(mod: str) -> tuple[str, str | None]:
    """("passes", stage), ("runtime", None), ("utility", None) or ("public", None)."""
    parts = mod.split(".")
    if parts[:2] == ["revify", "passes"]:
        return "passes", parts[2] if len(parts) > 2 else None
    if parts[:2] == ["revify", "runtime"]:
        return "runtime", None
    return ("utility" if mod in UTILITIES else "public"), None


def _violations(g: nx.DiGraph, allowed) -> list[str]:
    return [f"{a} imports {b} ({g.edges[a, b]['at']})" for a, b in sorted(g.edges) if not allowed(a, b)]


def test_import_walker_sees_every_kind_of_import(tmp_path):
    """The walker itself: a missed kind of import would hide a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b.py": "def f():\n    from . import c\n",
        "c.py": "import pkg.sub.d\n",
        "sub/__init__.py": "",
        "sub/d.py": "from pkg import e\nfrom ..sub import f as g\n",
        "e.py": "from pkg.sub.f import thing\n",
        "sub/f.py": "import os\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    g = import_graph(modules({"pkg": pkg}))
    assert set(g.edges) == {("pkg.a", "pkg.b"), ("pkg.b", "pkg"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.sub.d"),
                            ("pkg.sub.d", "pkg"), ("pkg.sub.d", "pkg.e"), ("pkg.sub.d", "pkg.sub"),
                            ("pkg.sub.d", "pkg.sub.f"), ("pkg.e", "pkg.sub.f")}
    # revify's own graph: a module-level, a local and a lazy public name are all seen
    rg, mods = _revify_graph()
    assert "revify.passes.capture.record_calls" in mods and "revify.api" in mods
    assert rg.has_edge("revify.api", "revify.passes.planning.plan_budget")
    assert rg.has_edge("revify.estimate", "revify.api")  # imported inside estimate()


def test_no_import_cycles():
    g, _ = _revify_graph()
    tangles = sorted((sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1), key=len)
    lines = []
    for scc in tangles:
        cycle = nx.find_cycle(g.subgraph(scc))
        lines.append(f"{len(scc)} modules import each other: {', '.join(scc)}\n  for example: "
                     + " -> ".join(f"{a} ({g.edges[a, b]['at']})" for a, b in cycle) + f" -> {cycle[0][0]}")
    assert not lines, "import cycles:\n" + "\n".join(lines)


def test_pass_stages_import_only_earlier_stages():
    g, _ = _revify_graph()

    def allowed(a: str, b: str) -> bool:
        (la, sa), (lb, sb) = _layer(a), _layer(b)
        if lb != "passes" or sb is None:
            return True
        if la != "passes":
            return True  # runtime and utilities import no pass at all: their own tests below say so
        if sa is None:
            return False  # revify.passes' own __init__ imports no stage
        if sb == "prediction":
            return sa == "prediction"  # nothing below the public surface uses a prediction
        if sa == "prediction":
            return sb in PREDICTION_MAY_IMPORT
        return STAGES.index(sb) <= STAGES.index(sa)

    bad = _violations(g, allowed)
    assert not bad, "a pass imports a later stage:\n" + "\n".join(bad)


def test_passes_and_runtime_import_no_public_surface():
    g, _ = _revify_graph()

    def allowed(a: str, b: str) -> bool:
        return _layer(a)[0] not in ("passes", "runtime") or _layer(b)[0] != "public"

    bad = _violations(g, allowed)
    assert not bad, ("passes and runtime may import only " + ", ".join(sorted(UTILITIES))
                     + " from revify's top level:\n" + "\n".join(bad))


def test_runtime_imports_no_pass():
    g, _ = _revify_graph()
    bad = _violations(g, lambda a, b: _layer(a)[0] != "runtime" or _layer(b)[0] != "passes")
    assert not bad, "the runtime runs inside a training step and imports no pass:\n" + "\n".join(bad)


def test_utilities_stay_at_the_floor():
    g, mods = _revify_graph()
    assert set(UTILITIES) <= set(mods), f"UTILITIES names modules that do not exist: {set(UTILITIES) - set(mods)}"
    bad = _violations(g, lambda a, b: a not in UTILITIES or b in UTILITIES)
    assert not bad, "a utility imports above the floor:\n" + "\n".join(bad)


@pytest.mark.parametrize("root", ["revify", "revify.passes"])
def test_no_source_file_over_450_lines(root):
    folder = package_roots()[root]
    long = {str(p.relative_to(folder.parent)): n for p in sorted(folder.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split by responsibility): " + ", ".join(
        f"{p} {n}" for p, n in itertools.islice(long.items(), 50))
