"""The package's import arrows point one way (ARCHITECTURE.md): a module imports only modules of
its own layer's package or of lower layers, never a higher one, not even lazily inside a function,
and no two modules import each other through any chain. data/ neither imports nor runs a model."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "unified_tte"

# Lowest first. A module may import from its own package (same layer, same first-level
# sub-package) and from any lower layer.
LAYERS = {
    "unified_tte.console": 0,
    "unified_tte.errors": 1,
    "unified_tte.model": 2,
    "unified_tte.locks": 2,
    "unified_tte.distributed": 2,
    "unified_tte.data": 3,
    "unified_tte.train": 4,
    "unified_tte.eval": 4,
    "unified_tte.tracegen": 4,
    "unified_tte.export": 4,
    "unified_tte.tools": 5,
    "unified_tte.testing": 5,
    "unified_tte.cli": 6,
    "unified_tte": 6,              # the package root: the public facade
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def area(name: str) -> str:
    """The LAYERS key a module belongs to (its longest matching prefix)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key
    raise KeyError(name)


def imported_names(path: Path, name: str) -> set[str]:
    """Every unified_tte name an import in `path` binds, anywhere in the file (function bodies
    included), absolute: `import unified_tte.model.zoo` gives that module, `from ..model import
    UnifiedTTE` in unified_tte.data.traces gives unified_tte.model.UnifiedTTE."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "unified_tte"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "unified_tte":
                out |= {f"{target}.{alias.name}" for alias in node.names}
    return out


def imports_of(path: Path, name: str) -> set[str]:
    """Every unified_tte module `path` imports, anywhere in the file (function bodies included).
    `from pkg import name` counts as importing pkg.name when that is a module, else pkg."""
    return {n if n in MODULES else n.rpartition(".")[0] for n in imported_names(path, name)}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path, name) for name, path in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    """Only the package root is the facade: any other module that falls through to the root's
    entry (the highest layer, allowed to import anything) must be given its own layer above."""
    assert "unified_tte" in MODULES
    strays = sorted(name for name in MODULES if area(name) == "unified_tte" and name != "unified_tte")
    assert not strays, f"modules in no layer of LAYERS: {strays}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_higher_layer_or_a_peer_package(name):
    mine = area(name)
    bad = []
    for target in sorted(GRAPH[name]):
        theirs = area(target)
        if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine] and theirs != mine):
            bad.append(f"{target} ({theirs}, layer {LAYERS[theirs]})")
    assert not bad, f"{name} ({mine}, layer {LAYERS[mine]}) imports upward or sideways: {bad}"


def test_no_import_cycle():
    """Depth-first search for a back edge over every import, lazy ones included."""
    state: dict[str, int] = {}   # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in MODULES:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """The walk itself: a function-level import of a higher layer is found."""
    fake = PACKAGE / "model" / "backbones.py"
    source = fake.read_text() + "\n\ndef _oops():\n    from ..train import loop  # noqa\n"
    probe = tmp_path / "backbones.py"
    probe.write_text(source)
    tree_imports = imports_of(probe, "unified_tte.model.backbones")
    assert "unified_tte.train.loop" in tree_imports


# data/ reads, checks and joins rows; running a model over them (writing traces, embedding) is a
# command's job a layer up (tracegen, eval, train). These are how a module gets a model to run,
# and the calls that run one.
MODEL_LOADERS = ("unified_tte.model.tte", "unified_tte.model.zoo", "unified_tte.model.UnifiedTTE")
MODEL_CALLS = {"think", "think_then_embed", "embed", "embed_both", "embed_recompute", "generate",
               "from_checkpoint", "from_pretrained"}


def model_use(path: Path, name: str) -> list[str]:
    loads = [n for n in imported_names(path, name) if any(n == m or n.startswith(m + ".") for m in MODEL_LOADERS)]
    calls = {node.func.attr for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MODEL_CALLS}
    return sorted(loads) + sorted(f".{c}()" for c in calls)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if area(n) == "unified_tte.data"))
def test_no_data_module_imports_or_runs_a_model(name):
    used = model_use(MODULES[name], name)
    assert not used, f"{name} loads or runs a model ({used}); that belongs to a command module (tracegen, eval)"


@pytest.mark.parametrize("line", ["from ..model import UnifiedTTE", "from ..model import zoo",
                                  "from ..model.zoo import load", "import unified_tte.model.tte",
                                  "from unified_tte.model.tte import UnifiedTTE", "model.think(inputs)"])
def test_the_data_check_sees_a_model_import_or_call(tmp_path, line):
    probe = tmp_path / "traces.py"
    probe.write_text((PACKAGE / "data" / "traces.py").read_text() + f"\n\ndef _oops(model, inputs):\n    {line}\n")
    assert model_use(probe, "unified_tte.data.traces")


def test_tte_kernels_never_imports_unified_tte():
    paths = sorted((ROOT / "kernels" / "tte_kernels").glob("*.py"))
    assert paths, "no kernel modules found: the layout moved"
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] == "unified_tte" for n in names), f"{path.name} imports unified_tte"


def test_unified_tte_takes_kernels_from_tte_kernels_and_no_benchmark_harness():
    """The package's benchmarks measure with tools/measure.py; tte_kernels' op benchmark is its own."""
    users = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if any(n == "tte_kernels.bench" or n.startswith("tte_kernels.bench.") for n in names):
                users.append(name)
    assert not users, f"{sorted(users)} import tte_kernels.bench; measure with unified_tte.tools.measure"
    assert not (ROOT / "kernels" / "tte_kernels" / "measure.py").exists()
