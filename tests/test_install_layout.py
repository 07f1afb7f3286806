"""The checkout never shadows an installed package: from the repo root (where `python -m pytest`,
`python -m ...` and the benchmarks' child processes put it first on sys.path) `import kernels`
is Hugging Face's package, which transformers >= 5.25 imports, and `tte_kernels` (the folder
kernels/tte_kernels/) imports in editable and non-editable installs. `tte doctor` names a
checkout folder that would shadow an installed module."""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from unified_tte.tools.doctor import doctor_main, shadow_check, shadowing_modules

ROOT = Path(__file__).resolve().parents[1]
HF_KERNELS = importlib.util.find_spec("kernels") is not None and \
    "site-packages" in str(importlib.util.find_spec("kernels").origin or "")


def run_from_root(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -c code` with the repo root as cwd: sys.path[0] is the root, as under `python -m`."""
    full = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    full.update(env or {}, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=300)


def test_the_kernels_folder_is_not_a_package():
    assert (ROOT / "kernels" / "tte_kernels" / "__init__.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py makes the folder a regular package that shadows Hugging Face's `kernels`"


@pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's kernels package is not installed here")
def test_from_the_repo_root_kernels_is_hugging_faces_and_transformers_imports():
    probe = run_from_root(
        "import sys, kernels; print(sys.path[0] or '<cwd>'); print(getattr(kernels, '__file__', None)); "
        "import transformers.modeling_utils; print('transformers ok')")
    assert probe.returncode == 0, probe.stderr[-2000:]
    first, where, ok = probe.stdout.split("\n")[:3]
    assert first == "<cwd>"                     # the root is first on sys.path, as under python -m
    # (a venv inside the checkout, as CI's .venv-ci, is fine: the checkout's own kernels/ is not)
    assert "site-packages" in where and not Path(where).is_relative_to(ROOT / "kernels"), where
    assert ok == "transformers ok"


def test_tte_kernels_imports_and_its_bench_runs_as_a_module_from_the_root():
    probe = run_from_root("import tte_kernels, tte_kernels.bench; print(tte_kernels.__file__)")
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert Path(probe.stdout.strip()).parent.name == "tte_kernels"
    bench = subprocess.run([sys.executable, "-m", "tte_kernels.bench", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0 and "usage: python -m tte_kernels.bench" in bench.stdout, bench.stderr[-2000:]


@pytest.mark.slow
def test_a_non_editable_install_carries_tte_kernels(tmp_path):
    """pip builds a wheel from a copy of the tree and installs it into a folder; `python -S`
    (no site hooks, so no editable finder) with that folder first imports tte_kernels from it."""
    src, target = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name in ("setup.py", "README.md", "unified_tte", "kernels"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    assert (target / "tte_kernels" / "pooling.py").is_file() and not (target / "kernels").exists()
    path = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    probe = run_from_root("import tte_kernels, torch; from tte_kernels import pool; print(tte_kernels.__file__)",
                          "-S", env={"PYTHONPATH": path})
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().startswith(str(target)), probe.stdout


def test_doctor_names_a_checkout_folder_that_shadows_an_installed_module(tmp_path, monkeypatch, capsys):
    checkout = tmp_path / "checkout"
    (checkout / "yaml").mkdir(parents=True)          # PyYAML's top-level module, a core dependency
    (checkout / "yaml" / "__init__.py").write_text("")
    (checkout / "recipes").mkdir()                   # a plain folder: no __init__.py, no shadow
    (checkout / "notes.py").write_text("")           # a module no distribution owns
    found = shadowing_modules([checkout])
    assert len(found) == 1 and "yaml/ (a package" in found[0] and "PyYAML" in found[0], found
    assert shadow_check([checkout / "recipes"]).ok
    monkeypatch.chdir(checkout)
    assert doctor_main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  install: no shadowed third-party import" in out and "yaml/" in out
    assert "install: no shadowed third-party import" in out.strip().splitlines()[-1]


def test_the_repo_itself_shadows_nothing():
    assert shadowing_modules([ROOT]) == []
