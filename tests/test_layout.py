"""The package's imports run one way: each module imports only modules below it in LAYERS.

Lazy imports inside functions count too: a module that reaches up, even
late, ties the lower floor to the higher one.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"

# From the bottom floor up. A module may import the modules listed before it, never one after it.
LAYERS = [
    "siftune.errors",
    "siftune.artifacts.io",  # atomic files
    "siftune.parallel.distributed",  # processes, collectives, parts of sharded tensors
    "siftune.core.heap",  # the host heap's free pages, handed back
    "siftune.core.select",  # which weights are targeted; index helpers
    "siftune.core.quantize",
    "siftune.core.storage",  # where trained values live: in place, sharded, delta
    "siftune.core.budget",  # how a selection is scored and shared
    "siftune.core.structured",  # whole rows or columns
    "siftune.core.stepscale",  # steps scaled by each input feature's size
    "siftune.config",
    "siftune.core.optim",
    "siftune.recipes.data",  # built-in datasets
    "siftune.recipes.models",  # built-in models, loading
    "siftune.recipes.loss",  # a batch's loss, the output layer at labelled positions only
    "siftune.artifacts.increment",
    "siftune.core.engine",
    "siftune.core.reference",
    "siftune.artifacts.checkpoint",
    "siftune.parallel.sharding",  # FSDP2 in a run: shard_model, sharded checkpoints
    "siftune.recipes.tracking",
    "siftune.recipes.train",
    "siftune.recipes.trainer",
    "siftune.bench.methods",
    "siftune.bench.report",
    "siftune.bench.runner",
    "siftune.estimate.calibration",  # siftune estimate: memory and step time by simulation
    "siftune.estimate.methods",
    "siftune.estimate.int8",
    "siftune.estimate.shapes",
    "siftune.estimate.simulate",
    "siftune.estimate.fsdp",
    "siftune.estimate.extrapolate",
    "siftune.estimate.fit",
    "siftune.estimate.command",
    "siftune.estimate",
    "siftune.analysis.stats",
    "siftune.analysis.report",
    "siftune.analysis.plots",
    "siftune.analysis.inputs",
    "siftune.analysis.gradients",
    "siftune.analysis.landscape",
    "siftune.analysis.selection",
    "siftune.analysis",
    "siftune.cli",
    "siftune.trainer",  # the Trainer's public import path
    "siftune",
]


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((SRC / "siftune").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports(name: str, modules: dict) -> set[str]:
    """The package's modules ``name`` imports, at the top or inside functions."""
    path, is_package = modules[name]
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            source = node.module
            if node.level:
                source = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                if source == "siftune" and alias.name == "__version__":
                    continue  # the root package is loaded before any of its modules
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_every_import_points_to_a_lower_floor():
    modules = _modules()
    floor = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for name in LAYERS:
        if name not in modules:
            continue
        for target in sorted(_imports(name, modules)):
            if target not in floor:
                if modules[target][1] and not _imports(target, modules):
                    continue  # a package whose __init__ only documents it
                upward.append(f"{name} imports {target}, which is not in LAYERS: add it at its floor")
            elif floor[target] > floor[name]:
                upward.append(f"{name} imports {target}, a higher floor")
    assert not upward, "\n".join(upward)


def test_layers_name_existing_modules_once():
    modules = _modules()
    assert len(set(LAYERS)) == len(LAYERS)
    assert [name for name in LAYERS if name not in modules] == []


def test_the_engine_asks_no_storage_its_kind():
    source = (SRC / "siftune" / "core" / "engine.py").read_text()
    for kind in ("InPlace", "ShardedInPlace", "Delta", "SliceInPlace", "SliceDelta", "sharding"):
        assert f".{kind}" not in source and f"import {kind}" not in source, kind


def test_the_increment_applies_itself_through_the_storage_alone():
    # quantize's names are for checking an increment's metadata; applying it is the storage's business
    assert _names_from("siftune.artifacts.increment", "siftune.core.quantize") <= {"QUANTIZATIONS"}
    assert _names_from("siftune.artifacts.increment", "siftune.core.storage") <= {
        "add_increment", "remove_increment", "increment_shape", "writable"}


def _names_from(name: str, source: str) -> set[str]:
    """The names module ``name`` imports from module ``source``."""
    path, _ = _modules()[name]
    package = name.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            resolved = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            if resolved == source:
                names.update(alias.name for alias in node.names)
    return names
