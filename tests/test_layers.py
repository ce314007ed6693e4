"""Layers run one way (issue 15, item 4): every module's imports, read with ast (function-level ones too), go to
its own layer or below, and the module-level imports of Hearth's own modules form no cycle.

    core, web                      contracts shared by all; import nothing from Hearth above them
    engine                         Hearth's runtime: imports core only
    hub, loaders, prompts          one layer: may import each other (without cycles), engine and core
    app_settings, app_state,       the app's state: the layers below
    loaded_model, scheduler
    api, ui                        the servers: everything below
    app                            the entry point
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYER = {"core": 0, "web": 0, "engine": 1, "hub": 2, "loaders": 2, "prompts": 2, "app_settings": 3,
         "app_state": 3, "loaded_model": 3, "scheduler": 3, "api": 4, "ui": 4, "app": 5}
# Packages that import nothing from their own layer's other packages (the bottom layer's are independent).
ALONE_IN_LAYER = ("core", "web", "engine")


def hearth_modules() -> dict[str, Path]:
    found = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] not in LAYER and not (len(rel.parts) == 1 and rel.stem in LAYER):
            continue           # tests/, bench/, .venv/, caches: not part of the layered app
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports_of(path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, node.lineno)]
    return [(name, line) for name, line in found if name.split(".")[0] in LAYER]


def test_every_known_package_is_placed_in_a_layer():
    packages = {p.name for p in REPO.iterdir() if p.is_dir() and any(p.glob("*.py"))} - {"tests", "bench"}
    packages |= {p.stem for p in REPO.glob("*.py")}
    assert packages <= set(LAYER), f"place these in LAYER: {sorted(packages - set(LAYER))}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for name, path in hearth_modules().items():
        own = name.split(".")[0]
        for target, line in imports_of(path, top_level_only=False):
            other = target.split(".")[0]
            if LAYER[other] > LAYER[own] or (other != own and LAYER[other] == LAYER[own] and own in ALONE_IN_LAYER):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert upward == []


def test_module_level_imports_form_no_cycle():
    modules = hearth_modules()

    def resolve(target: str) -> str | None:     # `from core import options` names a module too
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    graph = {name: {t for t, _ in imports_of(path, top_level_only=True) if resolve(t) and resolve(t) != name}
             for name, path in modules.items()}
    graph = {name: {resolve(t) for t in targets} for name, targets in graph.items()}
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an engine module importing loaders is reported."""
    bad = tmp_path / "x.py"
    bad.write_text("import torch\nfrom loaders.base import LoadError\ndef f():\n    from ui import app\n")
    assert [name for name, _ in imports_of(bad, top_level_only=False)] == ["loaders.base", "ui"]
    assert [name for name, _ in imports_of(bad, top_level_only=True)] == ["loaders.base"]
