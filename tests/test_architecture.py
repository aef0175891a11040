"""The package's layers, checked from its source: every import (lazy ones inside functions too)
points to a lower layer or, inside one subpackage, to a sibling; there is no import cycle; only
`engines/` imports DeepSpeed or FSDP. docs/architecture.md describes the same layers."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "logra_dist"

# Lower number = lower layer. A module may import modules of strictly lower layers, and
# modules of its own subpackage (then the no-cycle check keeps the order inside it).
LAYERS = {
    "version": 0,
    "config": 0,
    "registry": 0,
    "comm": 0,
    "tracking": 0,
    "data": 1,
    "core": 2,
    "embedded": 2,
    "index": 3,
    "engines": 4,
    "session": 5,
    "logger": 6,
    "scoring": 6,
    "cli": 7,
    "eval": 7,
    "integrations": 7,
}
ENGINE_LIBRARIES = ("deepspeed", "torch.distributed.fsdp", "torch.distributed._composable.fsdp")
MAX_TOP_LEVEL_MODULES = 10


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    path = PKG.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            modules = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            found += [(node.lineno, m) for m in modules]  # `from logra_dist.x import module`
            if len(modules) < len(node.names):
                found.append((node.lineno, base))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for _, target in _imports(p):
            while target and target not in modules:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != m and target.startswith("logra_dist"):
                graph[m].add(target)
    return graph


def _layer(module: str) -> tuple[str, int]:
    """(group, layer): a subpackage is its own group; top-level modules of one layer form one."""
    top = module.split(".")[1]
    is_package = (PKG / top).is_dir()
    return (top if is_package else f"layer-{LAYERS[top]}"), LAYERS[top]


def test_every_module_belongs_to_a_layer():
    unknown = sorted({m.split(".")[1] for m in _graph() if m != "logra_dist" and m.split(".")[1] not in LAYERS})
    assert not unknown, f"modules outside the layer table (add them to LAYERS and docs/architecture.md): {unknown}"


def test_imports_point_down():
    wrong = []
    for module, targets in _graph().items():
        if module == "logra_dist":
            continue  # the public API re-exports from every layer
        group, rank = _layer(module)
        for target in targets:
            if target == "logra_dist":
                wrong.append(f"{module} imports the package root")
                continue
            t_group, t_rank = _layer(target)
            if t_group != group and t_rank >= rank:
                wrong.append(f"{module} (layer {rank}) imports {target} (layer {t_rank})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if t == "logra_dist":
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state and m != "logra_dist":
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_engines_know_deepspeed_and_fsdp():
    wrong = [
        f"{p.relative_to(PKG.parent)}:{line} imports {target}"
        for p in PKG.rglob("*.py")
        if _module_name(p).split(".")[1:2] != ["engines"]
        for line, target in _imports(p)
        if target.startswith(ENGINE_LIBRARIES)
    ]
    assert not wrong, "\n".join(wrong)


def test_few_modules_at_the_top():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
