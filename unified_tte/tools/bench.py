"""Latency and memory: the unified model (activated, top_k) against the two-model setup, one run.

    tte bench --quick                                   # one tiny case, seconds (smoke test)
    tte bench --backbone smollm2 --query-lens 512 --trace-lens 64 --batch-sizes 1
    tte bench --backbone smollm2                        # grid: query 64/256/1024 x trace 16/64/128 x batch 1/8
    tte bench --backbone qwen2vl-2b-shape --dtype bf16 --decode graph   # on a GPU: the CUDA-graph decode
    tte bench --backbone smollm2 --query-lens 512 --trace-lens 64 --batch-sizes 1 --threads 1 \
        --modes activated --decode eager,compiled     # both loops in one run, against generate and the bound

Writes `--out` (default bench_out/): results.jsonl (one line per mode x case), table.md, bench.png.

What is compared, per case (query length Q, trace length T, batch B; the same prompt B times):
- `activated`, `top_k`: one UnifiedTTE. think (prefill + decode with T), then `embed_from_state`
  reusing the cache: activated runs only the invocation (+ the last pending trace token and the
  end-of-turn) through every layer; top_k also re-runs the top K layers over the cached residuals.
- `two_model`: a reasoner (the same backbone + think LoRA) decodes the trace, then a second full copy
  of the backbone with one LoRA (`UnifiedTTE.separate_embedder(copy.deepcopy(backbone))`)
  re-encodes query + trace (`embed(inputs, traces)`). Its memory counts both copies.
- `merged`: the serving path of activated mode, `tte export --merge-think` loaded back: think is
  folded into the base weights, so decoding runs the plain base and the embed step one LoRA on a
  few tokens (the model plain PEFT serves as an activated LoRA, see export.py).
- `auto` (with `--think-rate R`): unified activated under the think gate, `think_then_embed(think=
  "auto")`: every query is prefilled and embedded directly, the gate scores it, and a fraction R
  of the queries then decode and embed again (a query that thinks pays one extra invocation step).
  The bench's prompts are synthetic, so a stand-in gate (ThinkGate's scoring with zero weights)
  takes its decision from the threshold: the queries of a block of 10 consecutive batches that
  think are spread evenly, round(10 R) of them. Its step is that block: the end-to-end time per
  batch is the block's time / 10 (p50 over the repeats); its phases are not split.

How it is measured:
- Lengths are forced: the prompt text is built to encode to exactly Q tokens (chat markup included)
  and `stop_ids` is emptied so every row decodes exactly T tokens.
- Phases: `think` is timed whole; its `_prefill` call is wrapped with a timer, so prefill is the
  prompt's forward pass and decode is the rest of `think` (T token choices, T-1 one-token steps).
  embed is `embed_from_state` (unified) or the embedder's `embed` (two-model); end to end is
  think + embed under one timer. One warm-up run per case, then `--repeats` timed runs: p50/p90.
  On CUDA every timer edge calls `torch.cuda.synchronize()`.
- The measuring tools (fresh-process workers, peak memory, percentiles, the machine's name) are
  tools/measure.py, shared with train_bench, plan and doctor.
- Each mode runs in its own fresh subprocess (all alive at once, idle while another runs); per case
  every mode warms up, then the timed repeats alternate between modes, so drifts in machine load
  (a shared machine) hit every mode alike. Worker stderr goes to OUT/worker_<mode>.log.
- Decode speed (tools/decode_speed.py): tokens/s of the T - 1 one-token steps, against Hugging
  Face `generate` on the same reasoner and prompts (timed in the first mode's process once per
  round of the repeats, medians) and against the memory-bandwidth bound (B x copy bandwidth /
  bytes of weights a step reads). `--decode` picks the think loop (model/engine.py: eager,
  static, compiled, graph, auto); a comma list runs every mode once per loop, each pair in its
  own worker and all interleaved, so the loops are compared in one run. The embed step follows
  the loop (model/engine.py: `invocation_step`); `embed / step` is the embed time in decode
  steps of the same row (decode time / (T - 1)). A `compiled` worker compiles in its warm-up.
- No mode sees another's memory. Peak memory is reported
  above that process's own baseline after imports (torch, transformers, peft, unified_tte), so the
  model weights are counted. CPU: the kernel's resident high-water mark (VmHWM) is reset
  through /proc/self/clear_refs after the models are built and freed heap is returned (malloc_trim),
  then read after the case: peak RSS during the case minus the baseline RSS (loading transients,
  e.g. GGUF dequantisation, are not counted; the weights themselves are). Where clear_refs is not
  writable a 1 ms RSS sampling thread is used instead (recorded as mem_method). CUDA:
  `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the baseline
  allocation after imports.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from ..errors import RunError, command, require
from ..model.zoo import check_spec
from .measure import (PeakMemory, Worker, current_memory_mb, default_device, is_cuda, machine_name, read_commands,
                      reply, summary, sync, trim)
from .report import command_line, git_state, provenance
from .decode_speed import (add_decode_speed, copy_bandwidth_gb_s, decode_note, decode_weight_bytes, generate_decode_ms,
                           generate_times_ms)

MODES = ("activated", "top_k", "two_model", "merged", "auto")
DECODE_LOOPS = ("auto", "eager", "static", "compiled", "graph")
AUTO_BLOCK = 10   # batches per timed step of the `auto` mode
GRID = dict(query_lens=[64, 256, 1024], trace_lens=[16, 64, 128], batch_sizes=[1, 8])
QUICK = dict(backbone="tiny", query_lens=[64], trace_lens=[16], batch_sizes=[1], repeats=2, threads=1)
PHASES = ("prefill", "decode", "embed", "e2e")


# ---------------------------------------------------------------------------------------- inputs
def prompt_of_length(tte, n_tokens: int):
    """A text-only TTEInput whose encoded prompt (chat markup included) is exactly n_tokens long."""
    from ..model import TTEInput

    encode = lambda text: len(tte.encoder.encode([TTEInput(text)])[0].ids)  # noqa: E731
    markup = encode("")
    if n_tokens <= markup:
        raise ValueError(f"query length {n_tokens} is not above the chat markup's {markup} tokens")
    for word in (" the", " a", " one", " digit", " x", " and"):
        # A word that stays one token per repetition, so the length is linear in the count.
        if [encode(word * k) - markup for k in (1, 2, 3)] != [1, 2, 3]:
            continue
        count = n_tokens - markup
        for _ in range(4):
            got = encode(word * count)
            if got == n_tokens:
                return TTEInput(word * count)
            count += n_tokens - got
    raise ValueError(f"could not build a prompt of exactly {n_tokens} tokens with this tokenizer")


# ---------------------------------------------------------------------------------------- worker
class _Runner:
    """One mode's models and its timed think -> embed step."""

    def __init__(self, mode: str, spec: str, dtype: str, device: str, embed_layers: int | None,
                 decode: str = "auto"):
        import torch

        from ..model import UnifiedTTE
        from ..model.zoo import load as load_reasoner

        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        backbone = load_reasoner(spec, dtype=torch_dtype, device=device)
        self.mode, self.device, self.name = mode, device, backbone.name
        self.embedder = None
        self.think_rate = None
        if mode == "two_model":
            # Copy before wrapping: the reasoner's wrapping adds tokens and LoRA layers in place.
            self.embedder = UnifiedTTE.separate_embedder(copy.deepcopy(backbone)).eval()
            # The reasoner is base + think only: an unused embed LoRA would be charged to two-model.
            self.tte = UnifiedTTE.separate_reasoner(backbone).eval()
        elif mode == "merged":
            self.tte = merged_think(backbone, spec, dtype)
        elif mode == "auto":
            from ..model.gate import ThinkGate

            self.tte = UnifiedTTE(backbone, mode="activated").eval()
            n = 2 * self.tte.stack.config.hidden_size + 1
            # Scores 0.5 for every query: threshold 0 thinks, threshold 1 does not (see the docstring).
            self.tte.gate = ThinkGate(torch.zeros(n), torch.tensor(0.0), torch.zeros(n), torch.ones(n),
                                      {"operating_points": {"bench": {"threshold": 0.0}}})
        else:
            kwargs = {"embed_layers": embed_layers} if mode == "top_k" and embed_layers else {}
            self.tte = UnifiedTTE(backbone, mode=mode, **kwargs).eval()
        self.tte.engine.decode_mode = decode
        self.prefill_s = 0.0
        self._start = 0.0

    def _prefill_done(self) -> None:
        sync(self.device)
        self.prefill_s = time.perf_counter() - self._start

    def auto_step(self, inputs, trace_len: int) -> dict[str, float | None]:
        """A block of AUTO_BLOCK batches under the gate, round(AUTO_BLOCK x think rate) of them
        thinking (spread evenly); seconds per batch, end to end only."""
        rate = self.think_rate
        thinks = [int((i + 1) * rate + 1e-9) > int(i * rate + 1e-9) for i in range(AUTO_BLOCK)]
        sync(self.device)
        start = time.perf_counter()
        for think in thinks:
            emb, traces = self.tte.think_then_embed(inputs, max_new_tokens=trace_len, think="auto",
                                                    threshold=0.0 if think else 1.0, min_new_tokens=trace_len)
            if [len(t.token_ids) for t in traces] != [trace_len if think else 0] * len(inputs):
                raise RuntimeError(f"auto: decoded {[len(t.token_ids) for t in traces]}, wanted "
                                   f"{trace_len if think else 0} per row")
        sync(self.device)
        self.decode_loop = self.tte.engine.last_decode_mode
        return {"prefill": None, "decode": None, "embed": None, "e2e": (time.perf_counter() - start) / AUTO_BLOCK}

    def step(self, inputs, trace_len: int) -> dict[str, float]:
        """One think -> embed that decodes exactly `trace_len` tokens per row; seconds per phase."""
        if self.think_rate is not None:
            return self.auto_step(inputs, trace_len)
        import torch

        sync(self.device)
        start = self._start = time.perf_counter()
        out = self.tte.think(inputs, max_new_tokens=trace_len, min_new_tokens=trace_len,
                             on_prefill=self._prefill_done)
        sync(self.device)
        thought = time.perf_counter()
        traces = out.traces
        if self.embedder is None:
            with torch.no_grad():   # as think_then_embed runs it (with grad, the eager feed runs)
                emb = self.tte.embed_from_state(out.state)
        else:
            del out  # the embedder does not use the reasoner's cache: free it first
            emb = self.embedder.embed(inputs, traces)
        sync(self.device)
        end = time.perf_counter()
        lengths = {len(t.token_ids) for t in traces}
        if lengths != {trace_len} or emb.shape[0] != len(inputs):
            raise RuntimeError(f"{self.mode}: decoded trace lengths {lengths}, wanted {trace_len}")
        self.decode_loop = self.tte.engine.last_decode_mode
        self.embed_loop = self.tte.engine.last_invocation_mode if self.embedder is None else "eager"
        return {"prefill": self.prefill_s, "decode": thought - start - self.prefill_s,
                "embed": end - thought, "e2e": end - start}


def merged_think(backbone, spec: str, dtype: str):
    """Activated mode as it is served: exported with --merge-think and loaded back (what
    `tte export --merge-think` writes; the base itself is the reasoner, one LoRA embeds)."""
    import gc
    import tempfile

    from ..export import export_model, load_checkpoint
    from ..model import UnifiedTTE

    pristine = copy.deepcopy(backbone)   # before wrapping, which adds tokens and LoRA layers in place
    trained = UnifiedTTE(backbone, mode="activated").eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_model(trained, Path(tmp) / "merged", dtype=dtype, merge_think=True, backbone_spec=spec)
        del trained, backbone
        gc.collect()
        return load_checkpoint(folder, backbone=pristine).eval()


def run_worker(job: dict, commands=None) -> None:
    """One mode's models in this process, driven by JSON commands on stdin (one per line):

        {"cmd": "begin", "batch": B, "query_len": Q, "trace_len": T}  build inputs, reset the peak, warm up
        {"cmd": "step"}                                               one timed think -> embed
        {"cmd": "generate"}                                           HF generate(T) and generate(1), ms
        {"cmd": "end"}                                                peak memory of the case
        {"cmd": "quit"}

    bench_main drives every mode's worker in turn, so the modes share the same moments of machine load.
    """
    import torch
    import transformers
    import peft  # noqa: F401 - part of the baseline, imported before it is taken

    from .. import model  # noqa: F401

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = job["device"]
    trim()
    baseline = current_memory_mb(device)
    runner = _Runner(job["mode"], job["backbone"], job["dtype"], device, job.get("embed_layers"),
                     job.get("decode", "auto"))
    if job["mode"] == "auto":
        runner.think_rate = job["think_rate"]
    trim()
    reply({"backbone": job["backbone"], "backbone_name": runner.name, "mode": job["mode"],
            "device": device, "device_name": machine_name(device), "dtype": job["dtype"],
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "baseline_mb": baseline,
            "weights_mb": current_memory_mb(device) - baseline, "decode": job.get("decode", "auto"),
            "decode_weights_bytes": decode_weight_bytes(runner.tte),
            "copy_bandwidth_gb_s": copy_bandwidth_gb_s(device)})
    mem = inputs = None
    for message in read_commands(commands):
        with torch.no_grad():
            if message["cmd"] == "begin":
                trace_len = message["trace_len"]
                inputs = [prompt_of_length(runner.tte, message["query_len"])] * message["batch"]
                mem = PeakMemory(device, baseline).__enter__()
                runner.step(inputs, trace_len)  # warm-up (allocator, kernels, caches)
                reply({"ok": True})
            elif message["cmd"] == "step":
                reply({k: None if v is None else v * 1000 for k, v in runner.step(inputs, trace_len).items()})
            elif message["cmd"] == "generate":
                reply(generate_times_ms(runner.tte, inputs, trace_len, device))
            elif message["cmd"] == "end":
                mem.__exit__(None, None, None)
                reply({"peak_mem_mb": mem.peak_mb, "mem_method": mem.method,
                       "decode_loop": getattr(runner, "decode_loop", None),
                       "embed_loop": getattr(runner, "embed_loop", None)})
            elif message["cmd"] == "quit":
                return


def run_modes(args, out: Path) -> list[dict]:
    """One fresh process per mode, all alive at once; each case's warm-ups and timed repeats run
    round-robin over the modes so slow drifts in machine load hit every mode alike."""
    workers: dict[str, Worker] = {}
    meta: dict[str, dict] = {}
    try:
        for decode in args.decode:
            for mode in args.modes:
                # One worker per (mode, loop); named by the mode alone when one loop runs.
                name = mode if len(args.decode) == 1 else f"{mode}/{decode}"
                print(f"[bench] starting {name} ({args.backbone} on {args.device})", file=sys.stderr, flush=True)
                job = {"mode": mode, "backbone": args.backbone, "device": args.device, "dtype": args.dtype,
                       "threads": args.threads, "embed_layers": args.embed_layers, "decode": decode,
                       "think_rate": args.think_rate}
                workers[name] = Worker("unified_tte.tools.bench", job, name=name,
                                       log=out / f"worker_{name.replace('/', '_')}.log",
                                       env={"TOKENIZERS_PARALLELISM": "false"})
                meta[name] = {**workers[name].read(), "label": name}
        rows = []
        for batch in args.batch_sizes:
            for query_len in args.query_lens:
                for trace_len in args.trace_lens:
                    case = {"batch": batch, "query_len": query_len, "trace_len": trace_len}
                    print(f"[bench] B={batch} Q={query_len} T={trace_len}", file=sys.stderr, flush=True)
                    for w in workers.values():
                        w.ask(cmd="begin", **case)
                    times = {mode: {p: [] for p in PHASES} for mode in workers}
                    pairs = []
                    for _ in range(args.repeats):
                        for mode, w in workers.items():
                            for phase, ms in w.ask(cmd="step").items():
                                times[mode][phase].append(ms)
                        if args.generate and trace_len > 1:
                            pairs.append(next(iter(workers.values())).ask(cmd="generate"))
                    generate = generate_decode_ms(pairs) if pairs else {}
                    for mode, w in workers.items():
                        row = {**meta[mode], **case, "repeats": args.repeats, **w.ask(cmd="end"), **generate,
                               "think_rate": args.think_rate if mode == "auto" else 1.0}
                        for phase in PHASES:
                            values = [v for v in times[mode][phase] if v is not None]
                            spread = summary(values) if values else {"p50": None, "p90": None}
                            row[f"{phase}_p50_ms"], row[f"{phase}_p90_ms"] = spread["p50"], spread["p90"]
                        if row["decode_p50_ms"] is not None:
                            add_decode_speed(row)
                            step_ms = row["decode_p50_ms"] / (trace_len - 1) if trace_len > 1 else None
                            row["embed_decode_steps"] = row["embed_p50_ms"] / step_ms if step_ms else None
                        rows.append(row)
        return rows
    finally:
        for w in workers.values():
            w.close()


# ---------------------------------------------------------------------------------------- report
def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's embed / end-to-end / peak memory as a fraction of two_model on the same case, and
    its end to end as a fraction of always-think unified activated."""
    key = lambda r: (r["backbone"], r["device"], r.get("decode"), r["batch"], r["query_len"], r["trace_len"])  # noqa: E731
    base = {key(r): r for r in rows if r["mode"] == "two_model"}
    always = {key(r): r for r in rows if r["mode"] == "activated"}
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    for r in rows:
        ref = base.get(key(r), {})
        for name, field in (("embed", "embed_p50_ms"), ("e2e", "e2e_p50_ms"), ("mem", "peak_mem_mb")):
            r[f"{name}_vs_two_model"] = ratio(r[field], ref.get(field))
        r["e2e_vs_activated"] = ratio(r["e2e_p50_ms"], always.get(key(r), {}).get("e2e_p50_ms"))
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)\n"
    r0 = rows[0]
    head = (f"Backbone {r0['backbone_name']} ({r0['backbone']}), {r0['device_name']}, {r0['dtype']}, "
            f"{r0['threads']} threads, torch {r0['torch']}; p50/p90 over {r0['repeats']} runs after one "
            f"warm-up; peak memory above the process baseline after imports ({r0['mem_method']}); "
            "ratios are p50 (and peak) against two_model on the same case.\n\n")
    auto = any(r["mode"] == "auto" for r in rows)
    cols = ["mode", "loop", "B", "Q", "T", "prefill ms", "decode ms", "embed ms", "end-to-end ms", "peak MB",
            "embed / 2m", "e2e / 2m", "mem / 2m", "embed / step", "decode tok/s", "vs generate", "of bound"]
    cols += ["think rate", "e2e / activated"] if auto else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fmt = lambda r, p: "—" if r[p + "_p50_ms"] is None else f"{r[p + '_p50_ms']:.1f} / {r[p + '_p90_ms']:.1f}"  # noqa: E731
    ratio = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    order = {m: i for i, m in enumerate(MODES)}
    loops = {m: i for i, m in enumerate(DECODE_LOOPS)}
    key = lambda r: (r["batch"], r["query_len"], r["trace_len"], loops.get(r.get("decode"), 9),  # noqa: E731
                     order.get(r["mode"], 9))
    for r in sorted(rows, key=key):
        loop = r.get("decode_loop") or r.get("decode") or "—"
        lines.append("| " + " | ".join([
            r["mode"], loop, str(r["batch"]), str(r["query_len"]), str(r["trace_len"]),
            fmt(r, "prefill"), fmt(r, "decode"), fmt(r, "embed"), fmt(r, "e2e"), f"{r['peak_mem_mb']:.0f}",
            ratio(r["embed_vs_two_model"]), ratio(r["e2e_vs_two_model"]), ratio(r["mem_vs_two_model"]),
            "—" if r.get("embed_decode_steps") is None else f"{r['embed_decode_steps']:.2f}",
            "—" if not r.get("decode_tok_s") else f"{r['decode_tok_s']:.1f}",
            ratio(r.get("decode_vs_generate")), ratio(r.get("decode_vs_bound")),
        ] + ([f"{r['think_rate']:.2f}", ratio(r.get("e2e_vs_activated"))] if auto else [])) + " |")
    return head + "\n".join(lines) + "\n" + decode_note(r0)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["batch"], r["query_len"], r["trace_len"]) for r in rows})
    label = lambda r: r.get("label", r["mode"])  # noqa: E731 - the mode, and its loop when several ran
    modes = list(dict.fromkeys(label(r) for r in sorted(rows, key=lambda r: MODES.index(r["mode"]))))
    by = {(label(r), r["batch"], r["query_len"], r["trace_len"]): r for r in rows}
    width = 0.8 / max(1, len(modes))
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(6, 1.3 * len(cases) + 3), 7), sharex=True)
    colors = {"prefill": "#4c72b0", "decode": "#dd8452", "embed": "#55a868", "e2e": "#999999"}
    hatches = {"activated": "", "top_k": "//", "two_model": "...", "merged": "\\\\", "auto": "xx"}
    hatches.update({name: hatches.get(name.split("/")[0], "") for name in modes})
    for j, mode in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(cases))]
        got = [by.get((mode, *c)) for c in cases]
        bottom = [0.0] * len(cases)
        for phase in ("prefill", "decode", "embed", "e2e"):   # e2e: a row whose phases are not split (auto)
            vals = [(r[f"{phase}_p50_ms"] or 0.0) if r and (phase == "e2e") == (r["prefill_p50_ms"] is None)
                    else 0.0 for r in got]
            ax_t.bar(xs, vals, width, bottom=bottom, color=colors[phase], hatch=hatches.get(mode, ""),
                     edgecolor="black", linewidth=0.4, label=phase if j == 0 else None)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax_m.bar(xs, [r["peak_mem_mb"] if r else 0.0 for r in got], width, hatch=hatches.get(mode, ""),
                 color="#8172b3", edgecolor="black", linewidth=0.4)
        for x, b in zip(xs, bottom):
            ax_t.text(x, b, f" {mode}", ha="center", va="bottom", rotation=90, fontsize=7)
    from matplotlib.patches import Patch
    handles = [Patch(facecolor=c, edgecolor="black", label=p) for p, c in colors.items()]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=hatches.get(m, ""), label=m) for m in modes]
    r0 = rows[0]
    ax_t.set_ylabel("p50 latency, ms (stacked phases)")
    ax_t.set_title(f"{r0['backbone_name']}, {r0['device_name']}, {r0['dtype']}", fontsize=9)
    ax_t.legend(handles=handles, fontsize=7, ncol=2)
    ax_t.set_ylim(0, 1.3 * max(r["e2e_p50_ms"] for r in rows))
    ax_m.set_ylabel("peak memory above baseline, MB")
    ax_m.set_xticks(range(len(cases)))
    ax_m.set_xticklabels([f"B{b} Q{q} T{t}" for b, q, t in cases], rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tte bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="smollm2", help="tiny | tiny-llama | smollm2 | a local folder")
    p.add_argument("--query-lens", type=_ints, default=GRID["query_lens"], help="prompt tokens, e.g. 64,256,1024")
    p.add_argument("--trace-lens", type=_ints, default=GRID["trace_lens"], help="decoded trace tokens")
    p.add_argument("--batch-sizes", type=_ints, default=GRID["batch_sizes"], help="e.g. 1,8")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per case after one warm-up (p50/p90 over them; 3 is noisy on a shared machine)")
    p.add_argument("--modes", default=None, help="comma list of activated, top_k, two_model, merged, auto "
                   "(default: all but auto, and auto with --think-rate)")
    p.add_argument("--think-rate", type=float, default=None,
                   help="also bench unified activated under the think gate with this fraction of queries "
                        "thinking (the `auto` mode), e.g. the gate's measured compute-point rate")
    p.add_argument("--embed-layers", type=int, default=None, help="K for top_k (default L // 4)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="model dtype (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a shared machine use 1: with more threads "
                        "than free cores every parallel region waits on a descheduled thread")
    p.add_argument("--decode", default="auto",
                   help="think's decode loop, or a comma list of them (each mode runs once per loop, in one "
                        "run): eager (a growing cache), static (preallocated cache), compiled (static + "
                        "torch.compile; the warm-up compiles), graph (static + CUDA-graph replay, CUDA only), "
                        "auto (graph on CUDA, else eager)")
    p.add_argument("--no-generate", dest="generate", action="store_false",
                   help="skip timing Hugging Face generate (the decode tok/s comparison)")
    p.add_argument("--out", default="bench_out", help="folder for results.jsonl, table.md, bench.png")
    p.add_argument("--quick", action="store_true",
                   help="one small case on the tiny model (query 64, trace 16, batch 1, 2 repeats, 1 thread)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv or []) if a.startswith("--")}
        for name, value in QUICK.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    if args.think_rate is not None and not 0.0 <= args.think_rate <= 1.0:
        p.error(f"--think-rate is a fraction of queries in [0, 1], got {args.think_rate}")
    default = MODES if args.think_rate is not None else [m for m in MODES if m != "auto"]
    args.modes = [m.strip() for m in (args.modes or ",".join(default)).split(",") if m.strip()]
    if "auto" in args.modes and args.think_rate is None:
        p.error("mode auto needs --think-rate R (the fraction of queries that think)")
    bad = sorted(set(args.modes) - set(MODES))
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    args.decode = [d.strip() for d in args.decode.split(",") if d.strip()]
    bad = [d for d in args.decode if d not in DECODE_LOOPS] or ([] if args.decode else ["(none)"])
    if bad:
        p.error(f"unknown decode loop(s) {bad}; choose from {', '.join(DECODE_LOOPS)}")
    for name in ("query_lens", "trace_lens", "batch_sizes"):
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive integers, got {getattr(args, name)}")
    for name in ("repeats", "threads", "embed_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def resolve_device(args) -> None:
    """Fill in what was left to the machine: --device is cuda when torch sees a GPU, --dtype bf16
    on CUDA and fp32 on CPU."""
    args.device = args.device or default_device()
    args.dtype = args.dtype or ("bf16" if is_cuda(args.device) else "fp32")


@command("bench")
def bench_main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0
    require("matplotlib", "bench", "tte bench (its plot)")  # before minutes of measuring, not after
    check_spec(args.backbone)
    resolve_device(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = git_state()
    try:
        rows = run_modes(args, out)
    except RuntimeError as exc:  # a worker died: its log's tail is in the message
        raise RunError(str(exc)) from exc
    add_ratios(rows)
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table = markdown_table(rows)
    (out / "table.md").write_text(table)
    (out / "provenance.json").write_text(json.dumps(provenance(
        command_line("tte bench", argv if argv is not None else sys.argv[1:]),
        rows[0]["device_name"] if rows else machine_name(args.device), args.threads, started), indent=2) + "\n")
    plot(rows, out / "bench.png")
    print(table)
    print(f"wrote {out / 'results.jsonl'}, {out / 'table.md'}, {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(bench_main())
