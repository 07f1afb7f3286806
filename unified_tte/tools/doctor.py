"""`tte doctor`: what to run first on a new machine. It lists the versions that matter (torch and
its CUDA, transformers, peft, DeepSpeed and its compiled ops, Triton, flash-attn), the devices and
their memory, and runs a self-test on the device it finds:

- the kernels against their plain references, fp32 and bf16 (Triton on CUDA, the chunked path
  on CPU; fp32 to atol 1e-5 / rtol 1e-4, bf16 within the flash-attention error budget);
- the forward path on a tiny model in the device's precision (CPU fp32: fast == recompute to
  1e-5; CUDA bf16: cosine(fast, recompute) >= 0.999 per row), with the attention implementation
  a backbone gets there by default;
- on CUDA, the CUDA-graph decode against the eager loop (same tokens);
- first of all, that no top-level folder or module of the checkout (or of the current folder)
  shadows an installed distribution's top-level module: Python puts that folder first on
  sys.path under `python -m ...` and in child processes started there, so a regular package
  of the same name (say a `kernels/` holding an __init__.py) would be imported instead of the
  installed one (Hugging Face's `kernels`, which transformers imports);
- next, the kernels' environment settings (TTE_KERNEL_BACKEND and the chunk sizes), named before
  any self-test runs.

It ends with one verdict line and exits 0 when every check passed, 1 when one failed (its name is
in the verdict), 2 on bad arguments.

    tte doctor                          # the device found (CUDA if available)
    tte doctor --device cpu             # the CPU self-test on a GPU machine
    tte doctor --json doctor.json       # the report as JSON too
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import RUN_FAILED, command

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "triton", "flash_attn", "accelerate",
            "kernels", "huggingface_hub", "safetensors", "tokenizers", "einops", "numpy")


@dataclass
class Check:
    """One self-test: its name, whether it passed, what was measured, how long it took."""
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(module), "__version__", "installed (no version)")
    except Exception as exc:  # noqa: BLE001 - a broken install is a finding, not a crash
        return f"installed, import fails: {type(exc).__name__}: {str(exc)[:120]}"


def versions() -> dict:
    """Versions of Python and the packages the project runs on (DeepSpeed imported for its ops)."""
    import torch

    from ..train.engine import setup_environment

    setup_environment()  # DeepSpeed picks its CPU accelerator where there is no GPU
    out = {"python": platform.python_version(), "unified_tte": _version("unified_tte")}
    for name in PACKAGES:
        out[name.replace("_", "-")] = _version(name)
    out["torch CUDA build"] = torch.version.cuda or "none (CPU build)"
    if torch.backends.cudnn.is_available():
        out["cuDNN"] = str(torch.backends.cudnn.version())
    from ..model.adapters import PEFT_VERSIONS_CHECKED
    out["peft versions checked"] = ", ".join(PEFT_VERSIONS_CHECKED)
    out.update(deepspeed_ops())
    return out


def deepspeed_ops() -> dict:
    """DeepSpeed's precompiled ops and the ones it can JIT-compile here (as `ds_report` lists)."""
    if importlib.util.find_spec("deepspeed") is None:
        return {}
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
        from torch.utils.cpp_extension import is_ninja_available
    except Exception as exc:  # noqa: BLE001
        return {"deepspeed ops": f"cannot be listed ({type(exc).__name__}: {exc})"}
    compiled = sorted(name for name, yes in installed_ops.items() if yes)
    compatible = []
    for name, builder in ALL_OPS.items():
        try:
            if builder is not None and builder.is_compatible(verbose=False):
                compatible.append(name)
        except Exception:  # noqa: BLE001 - a probe that fails means "not compatible"
            pass
    return {"deepspeed precompiled ops": ", ".join(compiled) or "none (JIT-compiled on first use)",
            "deepspeed JIT-compatible ops": ", ".join(sorted(compatible)) or "none",
            "ninja (for JIT ops)": "yes" if is_ninja_available() else "no"}


def devices() -> dict:
    """CUDA devices with their memory, and the CPU with its cores, memory and bf16 support."""
    import torch

    out: dict = {"cuda": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            out["cuda"].append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                "memory_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1),
                                "multiprocessors": props.multi_processor_count,
                                "bf16": torch.cuda.is_bf16_supported()})
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    memory = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                memory[key] = round(int(value.split()[0]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    from .measure import machine_name
    out["cpu"] = {"name": machine_name("cpu"), "usable_cores": len(os.sched_getaffinity(0)),
                  "memory_gib": memory.get("MemTotal"), "available_gib": memory.get("MemAvailable"),
                  "bf16_instructions": [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]}
    return out


# ---------------------------------------------------------------------------------------- self-test
def checkout_roots() -> list[Path]:
    """The folders whose contents Python may import ahead of site-packages: the current folder
    and, for an editable install, the checkout holding the running unified_tte."""
    here = Path(__file__).resolve().parents[2]
    roots = [Path.cwd().resolve()]
    if (here / "setup.py").is_file() and here not in roots:
        roots.append(here)
    return roots


def shadowing_modules(roots: list[Path]) -> list[str]:
    """Each top-level regular package (a folder with __init__.py) or module (NAME.py) in `roots`
    whose name is an installed distribution's top-level module, as one finding. A folder without
    __init__.py is only a namespace portion: a regular package anywhere on sys.path wins over it."""
    from importlib.metadata import packages_distributions, version

    installed = packages_distributions()
    found = []
    for root in roots:
        try:
            entries = sorted(root.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir() and (entry / "__init__.py").is_file():
                name, what = entry.name, f"{entry.name}/ (a package: it holds __init__.py)"
            elif entry.is_file() and entry.suffix == ".py":
                name, what = entry.stem, entry.name
            else:
                continue
            owners = [d for d in installed.get(name, []) if d != "unified_tte"]
            if owners:
                dists = ", ".join(f"{d} {version(d)}" for d in sorted(set(owners)))
                found.append(f"{root / what} shadows the installed module '{name}' of {dists} wherever "
                             f"{root} is first on sys.path (python -m ..., pytest, child processes "
                             f"started there); rename it, or remove its __init__.py if it is a folder")
    return found


def shadow_check(roots: list[Path] | None = None) -> Check:
    def run():
        found = shadowing_modules(checkout_roots() if roots is None else roots)
        assert not found, "; ".join(found)
        return "no top-level module of " + ", ".join(str(r) for r in (roots or checkout_roots())) + \
            " shadows an installed package"
    return _timed("install: no shadowed third-party import", run)


def environment_check(device: str) -> Check:
    """The kernels' TTE_* environment settings on `device`, before the kernel self-tests (which
    pass their backend explicitly, so a bad setting would otherwise first fail the forward check)."""
    def run():
        from ..errors import SettingError
        from ..model.environment import check_kernel_environment

        try:
            backend = check_kernel_environment(device)
        except SettingError as exc:
            raise AssertionError(str(exc)) from None
        return f"the kernels run their {backend} backend here"
    return _timed("environment: TTE_KERNEL_BACKEND, TTE_INFONCE_CHUNK, TTE_POOL_CHUNK", run)


def _timed(name: str, fn) -> Check:
    start = time.perf_counter()
    try:
        detail = fn()
        ok = True
    except AssertionError as exc:
        ok, detail = False, str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "assertion failed"
    except Exception as exc:  # noqa: BLE001 - any crash of a check is its failure, named
        ok, detail = False, f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return Check(name, ok, detail or "", round(time.perf_counter() - start, 3))


def kernel_checks(device: str) -> list[Check]:
    """Each kernel against its plain reference on the shared test cases: fp32 to the tests'
    tolerance, bf16 within max|kernel - ref32| <= 2 max|torch_bf16 - ref32| + 1e-5."""
    import torch
    from tte_kernels import info_nce, info_nce_ref, pool, pool_ref
    from tte_kernels.dispatch import triton_available
    from tte_kernels.testing import (INFONCE_CASES, assert_close32, assert_within_budget, infonce_grads,
                                     infonce_inputs, pool_grads, pool_inputs)

    backend = "triton" if device == "cuda" and triton_available() else "chunked"
    checks = []
    for dtype in (torch.float32, torch.bfloat16):
        tag = f"{backend} {str(dtype).replace('torch.', '')}"
        for kind in ("last", "mean"):
            def run_pool(kind=kind, dtype=dtype):
                hidden, where = pool_inputs(70, 33, 96, kind, dtype=dtype, device=device)
                got = pool_grads(pool, hidden, backend=backend, **where)
                ref32 = pool_grads(pool_ref, hidden.float(), **where)
                if dtype == torch.float32:
                    assert_close32(got, ref32, where=f"pool {kind}: ")
                else:
                    assert_within_budget(got, ref32, pool_grads(pool_ref, hidden, upcast=False, **where),
                                         where=f"pool {kind}: ")
                return f"output and gradient match the reference ({kind} pooling, B=70 T=33 D=96)"
            checks.append(_timed(f"kernel pool/{kind} {tag}", run_pool))
        for case in (c for c in INFONCE_CASES if c.name in ("hard_negatives", "padding_rows_symmetric")):
            def run_infonce(case=case, dtype=dtype):
                q, t, labels = infonce_inputs(case, dtype=dtype, device=device)
                got = infonce_grads(info_nce, q, t, labels, 0.05, case.symmetric, backend=backend)
                ref32 = infonce_grads(info_nce_ref, q.float(), t.float(), labels, 0.05, case.symmetric)
                if dtype == torch.float32:
                    assert_close32(got, ref32, where=f"info_nce {case.name}: ")
                else:
                    lowp = infonce_grads(info_nce_ref, q, t, labels, 0.05, case.symmetric, upcast=False)
                    assert_within_budget(got, ref32, lowp, where=f"info_nce {case.name}: ")
                return f"loss, dq, dt match the reference (B={case.B} N={case.N} D={case.D})"
            checks.append(_timed(f"kernel info_nce/{case.name} {tag}", run_infonce))
    return checks


def forward_checks(device: str) -> list[Check]:
    """The unified forward path on a tiny Qwen2-VL in the device's precision, and on CUDA the
    CUDA-graph decode against the eager loop."""
    import torch
    import torch.nn.functional as F

    from PIL import Image

    from ..model import TTEInput, UnifiedTTE, zoo

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    gradient = Image.linear_gradient("L").convert("RGB")  # patches that differ from each other
    inputs = [TTEInput("Which digit is shown?", [gradient.resize((56, 56))]),
              TTEInput("Describe the picture in a few careful words.", [gradient.resize((112, 84))]),
              TTEInput("no image")]
    checks = []
    state = {}

    def build():
        tte = UnifiedTTE(zoo.load("tiny", dtype=dtype, device=device), mode="activated")
        generator = torch.Generator(device=device).manual_seed(1)
        with torch.no_grad():  # a fresh LoRA is zero; give both adapters a delta of a trained size
            for name in ("think", "embed"):
                for p in tte.adapter_params(name).values():
                    p.copy_(torch.randn(p.shape, generator=generator, device=device) * 0.05)
        state["tte"] = tte.to(device=device, dtype=dtype)
        return f"tiny Qwen2-VL on {device}, {precision}, attention {tte.stack.attn_implementation}"
    checks.append(_timed("forward: build a tiny model", build))
    if not checks[-1].ok:
        return checks
    tte = state["tte"]

    def fast_equals_recompute():
        emb, traces = tte.think_then_embed(inputs, max_new_tokens=6)
        recomputed = tte.embed_recompute(inputs, traces)
        assert emb.dtype == torch.float32, f"embeddings come out {emb.dtype}, not fp32"
        if dtype == torch.float32:
            err = float((emb - recomputed).abs().max())
            assert err <= 1e-5, f"fast path vs recompute: max abs diff {err:.3g} > 1e-5"
            return f"max abs diff {err:.2g} <= 1e-5 ({tte.engine.last_decode_mode} decode)"
        cosine = F.cosine_similarity(emb, recomputed, dim=-1)
        assert cosine.min() >= 0.999, f"cosine(fast, recompute) per row {cosine.tolist()} < 0.999"
        return f"min cosine {float(cosine.min()):.5f} >= 0.999 ({tte.engine.last_decode_mode} decode)"
    checks.append(_timed(f"forward: fast path == recompute ({precision})", fast_equals_recompute))

    if device == "cuda":
        def graph_equals_eager():
            # fp32, where the two loops agree bit for bit in practice; in bf16 CUDA's attention
            # kernels split the static cache differently and a near-tie may pick another token.
            exact = UnifiedTTE(zoo.load("tiny", dtype=torch.float32, device=device, attn_implementation="sdpa"),
                               mode="activated")
            exact.to(device)
            tokens = {}
            for mode in ("eager", "graph"):
                exact.engine.decode_mode = mode
                tokens[mode] = [t.token_ids for t in exact.think(inputs, max_new_tokens=12).traces]
                assert exact.engine.last_decode_mode == mode, f"the {mode} loop did not run"
            assert tokens["graph"] == tokens["eager"], "CUDA-graph decode chose other tokens than the eager loop"
            return "12 tokens per row, identical (fp32)"
        checks.append(_timed("decode: CUDA graph == eager loop", graph_equals_eager))
    return checks


# ---------------------------------------------------------------------------------------- report
def notes(vers: dict, devs: dict, device: str) -> list[str]:
    """Findings that are not failures but change what runs (fallbacks, unchecked versions)."""
    from ..model.adapters import peft_version_checked

    out = []
    if vers.get("peft", "").startswith("not installed"):
        out.append("peft is not installed: pip install 'peft>=0.18' (the core needs it)")
    elif not peft_version_checked():
        out.append(f"peft {vers['peft']} is not among the versions the adapter switch was checked "
                   f"against ({vers['peft versions checked']}); run the tests before trusting it")
    if device == "cuda":
        if vers.get("triton", "").startswith("not installed"):
            out.append("triton is not installed: the kernels run their chunked PyTorch path on CUDA")
        if vers.get("flash-attn", "").startswith("not installed"):
            out.append("flash-attn is not installed: backbones use SDPA (pip install 'unified_tte[gpu]')")
    if vers.get("deepspeed", "").startswith("not installed"):
        out.append("deepspeed is not installed: `tte train` needs it (pip install 'unified_tte[train]')")
    if device == "cpu" and devs["cpu"]["usable_cores"] <= 2:
        out.append("2 or fewer cores: pass --threads 1 to `tte bench` when the machine is shared")
    return out


def render(vers: dict, devs: dict, device: str, checks: list[Check], found: list[str]) -> str:
    lines = ["tte doctor", "", "versions"]
    width = max(len(k) for k in vers) + 2
    lines += [f"  {k:<{width}}{v}" for k, v in vers.items()]
    lines += ["", "devices"]
    for gpu in devs["cuda"]:
        lines.append(f"  cuda:{gpu['index']}  {gpu['name']} (sm {gpu['capability']}, {gpu['multiprocessors']} SMs), "
                     f"{gpu['memory_gib']} GiB, {gpu['free_gib']} GiB free, bf16 {'yes' if gpu['bf16'] else 'no'}")
    if not devs["cuda"]:
        lines.append("  cuda    none")
    cpu = devs["cpu"]
    lines.append(f"  cpu     {cpu['name']}, {cpu['usable_cores']} usable cores, {cpu['memory_gib']} GiB "
                 f"({cpu['available_gib']} available), bf16 instructions: {', '.join(cpu['bf16_instructions']) or 'none'}")
    lines += ["", f"self-test on {device}"]
    width = max(len(c.name) for c in checks) + 2
    for c in checks:
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}{c.detail}  [{c.seconds:.2f} s]")
    if found:
        lines += ["", "notes"] + [f"  - {n}" for n in found]
    lines += ["", verdict(checks, devs, device)]
    return "\n".join(lines)


def verdict(checks: list[Check], devs: dict, device: str) -> str:
    where = devs["cuda"][0]["name"] if device == "cuda" and devs["cuda"] else devs["cpu"]["name"]
    failed = [c.name for c in checks if not c.ok]
    if failed:
        return f"tte doctor: FAILED: {len(failed)} of {len(checks)} checks failed on {where}: {'; '.join(failed)}"
    return f"tte doctor: OK: {len(checks)} checks passed on {where}"


def run(device: str) -> tuple[dict, str, int]:
    """Everything `tte doctor` does; returns (report dict, rendered text, exit code)."""
    shadow = shadow_check()   # first: a shadowed import breaks what follows in confusing ways
    vers, devs = versions(), devices()
    checks = [shadow, environment_check(device)] + kernel_checks(device) + forward_checks(device)
    found = notes(vers, devs, device)
    text = render(vers, devs, device, checks, found)
    code = RUN_FAILED if any(not c.ok for c in checks) else 0
    report = {"versions": vers, "devices": devs, "device": device, "checks": [asdict(c) for c in checks],
              "notes": found, "verdict": verdict(checks, devs, device), "exit_code": code}
    return report, text, code


@command("doctor")
def doctor_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tte doctor", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the self-test runs (default: cuda when available)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    args = p.parse_args(argv)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device (see the versions above: a CPU build of torch?)")
    report, text, code = run(device)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(doctor_main())
