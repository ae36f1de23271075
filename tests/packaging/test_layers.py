"""Nothing imports upward: the layers the README's architecture section draws, read from the
code's own import statements (function-level and TYPE_CHECKING imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# bottom to top; a module may import its own layer and the layers below it, never above
LAYERS = [
    ("ground", ["growth_ops", "orchestrator.atomic", "orchestrator.exits", "orchestrator.secrets",
                "orchestrator.faults", "orchestrator.package_data"]),
    ("config", ["orchestrator.config"]),
    ("schedule", ["orchestrator.schedule"]),
    ("model", ["orchestrator.model"]),
    ("data", ["orchestrator.data"]),
    ("checkpoint", ["orchestrator.checkpoint"]),
    ("budget", ["orchestrator.budget"]),
    ("tracking", ["orchestrator.tracking"]),
    ("engines", ["orchestrator.engines"]),
    ("offline", ["orchestrator.offline"]),
    ("run", ["orchestrator.run"]),
    ("proxy", ["orchestrator.proxy"]),
    ("slurm", ["orchestrator.slurm"]),
    ("commands", ["orchestrator.commands"]),
    ("cli", ["orchestrator.cli"]),
    ("bench", ["bench"]),
]


def layer_of(module: str) -> int | None:
    if module in ("orchestrator", "bench"):  # the packages' faces: nothing of the project inside
        return 0
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import of the project in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing file's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return [(m, line) for m, line in found if layer_of(m) is not None]


def sources() -> list[Path]:
    return sorted(p for d in ("growth_ops", "orchestrator", "bench") for p in (REPO / d).rglob("*.py"))


def upward_imports() -> list[str]:
    bad = []
    for path in sources():
        here = layer_of(module_name(path))
        assert here is not None, f"{path} is on no layer: add it to LAYERS (and to the README's drawing)"
        for module, line in imported(path):
            there = layer_of(module)
            if there > here:
                bad.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[here][0]}) imports {module} "
                           f"({LAYERS[there][0]})")
    return sorted(set(bad))


def test_every_module_is_on_a_layer_and_nothing_imports_upward():
    assert upward_imports() == []


def test_the_rule_is_read_from_the_code():
    """The reader sees what it must: a function-level import counts, a relative one resolves."""
    tree_module = module_name(REPO / "orchestrator" / "config" / "parse.py")
    assert tree_module == "orchestrator.config.parse" and layer_of(tree_module) == 1
    assert layer_of("orchestrator.commands.configure") > layer_of("orchestrator.engines.checks")
    launch = [m for m, _ in imported(REPO / "orchestrator" / "run" / "launch.py")]
    assert "orchestrator.run.runner" in launch  # imported inside a function
