"""`tte demo`: the whole product in one command, on a built-in task.

    tte demo                              # the README's main job: tiny random Qwen2-VL on digits
    tte demo --quick                      # CI: the wiring, with numbers that are not meaningful
    tte demo --backbone smollm2           # real SmolLM2-135M-Instruct, think + embed LoRA
    tte demo --backbone smollm2 --quick   # the wiring of the above (slow tier), not the claim

(Run times and tables: docs/results/, rendered from the runs.)

Every step is the product's own code: each training is a `tte train` recipe run (DeepSpeed),
evaluation is `tte eval`'s, the export `tte export`'s, the bench `tte bench`'s.

1. think. tiny, on digits (data/digits.py, scikit-learn's handwritten digits): a tiny random model
   has no knowledge for a LoRA to steer, so the backbone is fully fine-tuned on the teacher's ECR
   traces and becomes the reasoner (think="none"). smollm2, on knowledge (data/knowledge.py,
   countries and elements from installed packages): a `think` LoRA on the real pretrained weights,
   SFT on the teacher's traces; the base stays as shipped.
2. embed, four ways, with the same data, steps, batch, learning rate, LoRA and seed:
   - unified TTE, activated: an `embed` LoRA beside `think` on the one backbone, KV-cache reuse;
   - unified TTE, top_k: the embed LoRA on the top K layers only;
   - two-model TTE: a second copy of the backbone (tiny: of the reasoner) with one LoRA over
     query + trace (VLM2Vec style), fed the reasoner's traces;
   - no-think embedder: the same second copy, trained and queried without traces.
3. evaluate on held-out images / entities (Hit@1 per sub-task): with the traces the reasoner
   writes (the unified models decode them with `think_then_embed`; the two-model embedder is fed
   the same greedy traces), how often a trace ends in the right answer, and with the teacher's
   traces (an upper bound: what a perfect reasoner would give each embedder);
4. export unified-activated and check the reload; smollm2: the exported think adapter loads in
   plain PEFT on the plain Hugging Face SmolLM2 and `generate` writes the traces `think` does;
5. a latency/memory bench: tiny, `tte bench --quick` (per-call overhead at tiny shapes, see the
   note it prints); smollm2, one SmolLM2 case (the product's figure);
6. summary tables and the acceptance claims, in --out (summary.md, summary.json).

Finished runs in --out are reused (the settings are checked); --fresh starts over.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import console
from ..errors import InputError, RunError, command
from .report import command_line, git_state, provenance

SYSTEMS = ("no-think embedder", "two-model TTE", "unified TTE (activated)", "unified TTE (top_k)")
TTE_SYSTEMS = SYSTEMS[1:]
RUN_DIRS = {"unified TTE (activated)": "unified_activated", "unified TTE (top_k)": "unified_top_k",
            "two-model TTE": "two_model_embedder", "no-think embedder": "no_think_embedder"}


@dataclass
class DemoSettings:
    """One demo configuration (see PRESETS)."""
    backbone: str = "tiny"            # tiny: a random Qwen2-VL, full FT reasoner; smollm2: think LoRA
    task: str = "digits"              # the built-in task (data/registry.py BUILTIN_TASKS)
    task_options: dict = field(default_factory=dict)   # its builder's options (the split's seed is --seed)
    precision: str = "fp32"           # of training and evaluation ("bf16": AMX matmuls on recent x86 CPUs)
    hidden_size: int = 128            # tiny only
    think_steps: int = 250
    think_batch_size: int = 32
    think_lr: float = 3e-3
    embed_steps: int = 200            # per embedder
    batch_size: int = 32              # embed
    embed_lr: float = 2e-3
    lora_r: int = 16
    lora_alpha: int = 32
    temperature: float = 0.05
    threads: int | None = 1           # torch CPU threads unless --threads (None: torch's default, all cores)
    top_k_layers: int = 2
    max_new_tokens: int = 40
    eval_batch_size: int = 50
    peft_check_queries: int = 0       # held-out queries decoded by plain PEFT + HF generate (smollm2)
    bench: list[str] = field(default_factory=lambda: ["--quick"])   # `tte bench` arguments
    holdout: float = 0.2              # train rows kept out of every training run, for the think gate
    holdout_by: str | None = "image_indices"   # ... by image (tiny) or by entity (smollm2)
    no_trace_fraction: float = 0.5    # unified activated: queries trained without their trace too
    gate_token_budget: float = 0.6    # the gate's compute point: this fraction of always-think's tokens
    gate_folds: int = 5
    gate_answer_key: str | None = "answer"   # digits: the digit; knowledge: the answer text (content)

    @property
    def eval_queries(self) -> int | None:
        return self.task_options.get("max_eval_per_task")


TINY = DemoSettings(task_options={"max_train_per_task": 400, "max_eval_per_task": 100})
TINY_QUICK = replace(TINY, task_options={"max_train_per_task": 64, "max_eval_per_task": 12},
                     think_steps=10, embed_steps=6, think_batch_size=16, batch_size=16, max_new_tokens=24,
                     gate_folds=3)
SMOLLM2 = DemoSettings(
    backbone="smollm2", task="knowledge", precision="bf16",
    task_options={"max_train_per_task": 256, "max_eval_per_task": None},
    think_steps=60, think_batch_size=8, think_lr=2e-3, embed_steps=40, batch_size=16, embed_lr=1e-3,
    lora_r=16, lora_alpha=32, temperature=0.05, threads=None, top_k_layers=8,
    max_new_tokens=64, eval_batch_size=32,
    peft_check_queries=32, holdout_by="entities", gate_answer_key=None,
    bench=["--backbone", "smollm2", "--query-lens", "256", "--trace-lens", "32", "--batch-sizes", "1",
           "--repeats", "3", "--threads", "1"])
SMOLLM2_QUICK = replace(
    SMOLLM2, task_options={"max_train_per_task": 12, "max_eval_per_task": 6},
    think_steps=4, think_batch_size=4, embed_steps=3, batch_size=4, max_new_tokens=40, peft_check_queries=4,
    gate_folds=2,
    bench=["--backbone", "smollm2", "--query-lens", "64", "--trace-lens", "4", "--batch-sizes", "1",
           "--repeats", "1", "--threads", "1"])
PRESETS = {("tiny", False): TINY, ("tiny", True): TINY_QUICK,
           ("smollm2", False): SMOLLM2, ("smollm2", True): SMOLLM2_QUICK}

TINY_BENCH_NOTE = (
    "At the tiny demo's shapes (hidden 64, 4 layers, a 64-token query) every phase takes a few "
    "milliseconds, most of it per-call Python and kernel-launch overhead, so these ratios compare "
    "overheads, not the compute the unified path saves; on a real model the two-model embed step "
    "re-encodes query + trace through a second copy of the weights. The product's figure is the "
    "SmolLM2 row (`tte demo --backbone smollm2`, or `tte bench --backbone smollm2`).")


def demo_phases(settings: DemoSettings, bench: bool) -> console.Phases:
    """The demo's numbered progress lines: think, the four embedders, their evaluation, the
    export, the bench."""
    return console.Phases("demo", total=1 + 2 * len(SYSTEMS) + 1 + int(bench))


def _machine() -> str:
    """What the figures were measured on (the benchmarks' shared name, tools/measure.py)."""
    from .measure import machine_name
    return machine_name()


def _bench(argv: list[str]) -> int:
    """`tte bench` with these arguments (one import: the bench module owns the run)."""
    from .bench import bench_main
    return bench_main(argv)


def _dtype(settings: DemoSettings) -> torch.dtype:
    return torch.bfloat16 if settings.precision == "bf16" else torch.float32


# ----------------------------------------------------------------------------- 1-2. training
def save_backbone(backbone, folder: Path) -> Path:
    """Write a Hugging Face checkpoint folder (weights, tokenizer, image processor) atomically."""
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.model.save_pretrained(tmp)
    backbone.tokenizer.save_pretrained(tmp)
    backbone.image_processor.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def _num_layers(spec: str) -> int:
    from ..model import zoo
    from ..model.backbones import DecoderStack
    return DecoderStack(zoo.load(spec).model).num_layers


def run_specs(settings: DemoSettings, out: Path, seed: int) -> tuple[str, dict]:
    """The reasoner's backbone spec and every training run: name -> (run dir, backbone, recipe)."""
    from ..model.zoo import tiny_qwen2vl

    s = settings
    if s.backbone == "tiny":
        init, reasoner = out / "init", out / "reasoner"
        if not (init / "config.json").is_file():
            save_backbone(tiny_qwen2vl(seed=seed, hidden_size=s.hidden_size), init)
        think_from, base, separate = str(init), str(reasoner), str(reasoner)
        think = dict(method="full", freeze_vision=False)
        unified = {"think": "none"}   # the fully fine-tuned backbone is the reasoner
    else:
        think_from = base = separate = s.backbone
        think = dict(method="lora")
        unified = {"think": "lora"}
    # Every run holds out the same train rows (same data, seed and holdout): the think gate of
    # unified activated is fitted on them, and no system trains on them.
    data = {"train": s.task, "options": {**s.task_options, "seed": seed}, "holdout": s.holdout,
            "holdout_by": s.holdout_by}
    common = dict(deepspeed=str(Path(__file__).resolve().parents[2] / "recipes/deepspeed/zero0.json"),
                  data=data, seed=seed, precision=s.precision, checkpoint_every=0, keep_checkpoints=1,
                  log_every=10, progress_bar=False, wandb={"mode": "disabled"})
    lora = dict(pooling="last", lora_r=s.lora_r, lora_alpha=s.lora_alpha)
    embed = dict(steps=s.embed_steps, batch_size=s.batch_size, lr=s.embed_lr,
                 warmup_steps=max(1, s.embed_steps // 10), temperature=s.temperature,
                 hard_negatives=True, gradcache_chunk=None)
    think.update(steps=s.think_steps, batch_size=s.think_batch_size, micro_batch_size=s.think_batch_size,
                 lr=s.think_lr, warmup_steps=max(1, s.think_steps // 10))
    n_layers = _num_layers(think_from)   # tiny: the reasoner is made from init, same shape
    start = {} if s.backbone == "tiny" else {"think_adapter": str(out / "think" / "think")}
    separate_model = {"mode": "top_k", "embed_layers": n_layers, "think": "none", **lora}
    specs = {
        "think": (out / "think", think_from, dict(
            stages=["think"], model={"mode": "activated", **unified, **lora}, think=think)),
        "unified TTE (activated)": (out / RUN_DIRS["unified TTE (activated)"], base, dict(
            stages=["embed", "gate"], model={"mode": "activated", **unified, **lora},
            embed={**embed, "no_trace_fraction": s.no_trace_fraction},
            gate={"token_budget": s.gate_token_budget, "max_new_tokens": s.max_new_tokens,
                  "batch_size": s.eval_batch_size, "folds": s.gate_folds, "answer_key": s.gate_answer_key},
            **start)),
        "unified TTE (top_k)": (out / RUN_DIRS["unified TTE (top_k)"], base, dict(
            stages=["embed"], model={"mode": "top_k", "embed_layers": s.top_k_layers, **unified, **lora},
            embed=embed, **start)),
        "two-model TTE": (out / RUN_DIRS["two-model TTE"], separate, dict(
            stages=["embed"], model=separate_model, embed=embed)),
        "no-think embedder": (out / RUN_DIRS["no-think embedder"], separate, dict(
            stages=["embed"], model=separate_model, embed={**embed, "use_traces": False})),
    }
    return {name: (run_dir, backbone, {**common, "backbone": backbone, "run_dir": str(run_dir), **spec})
            for name, (run_dir, backbone, spec) in specs.items()}


def train_runs(settings: DemoSettings, out: Path, seed: int, phases: console.Phases) -> dict[str, Path]:
    """think, then the four embedders, each a `tte train` recipe run; finished runs are reused.
    Returns the run dirs by name ("think" and SYSTEMS)."""
    from ..model import UnifiedTTE
    from ..model.zoo import load
    from ..train import load_stage_weights, recipe_from_dict, train

    dirs = {}
    for name, (run_dir, _, raw) in run_specs(settings, out, seed).items():
        dirs[name] = run_dir
        recipe = recipe_from_dict(raw, source=f"demo:{name}")
        stage = recipe.training_stages[-1]
        full = raw.get("think", {}).get("method") == "full"
        weights = "model.safetensors" if full else "adapter_model.safetensors"
        finished = [run_dir / stage / weights] + ([run_dir / "gate" / "gate_config.json"] if "gate" in recipe.stages else [])
        with phases.phase(f"training {name}", total=recipe.total_steps, unit="steps") as bar:
            if all(p.is_file() for p in finished):
                bar.total, bar.note = None, f"reused {run_dir}"
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
                (out / EVALUATION_FILE).unlink(missing_ok=True)   # it evaluated the run this replaces
                losses = [loss for _, loss in train(recipe, progress=bar)["losses"][stage]]
                bar.note = f"{stage} loss {losses[0]:.3f} -> {losses[-1]:.3f}, in {run_dir}"
        reasoner = out / "reasoner"
        if full and not (reasoner / "config.json").is_file():
            # The fully fine-tuned backbone is the reasoner every tiny embedder starts from.
            tte = UnifiedTTE(load(raw["backbone"]), think="none")
            load_stage_weights(tte, run_dir / "think", "think", full=True)
            bb = tte.backbone
            bb.model = tte.peft_model.unload()
            save_backbone(bb, reasoner)
    return dirs


# ----------------------------------------------------------------------------- 3. evaluation
def load_system(name: str, dirs: dict[str, Path], settings: DemoSettings, out: Path,
                dtype: torch.dtype | None = None):
    """One of SYSTEMS as a UnifiedTTE: the run's embed adapter (and, smollm2's unified models, the
    think adapter; a run with a gate stage, its think gate) on a fresh copy of its backbone.
    `dtype` defaults to the settings' precision."""
    from ..model import TTEConfig, UnifiedTTE
    from ..model.checkpoint import load_adapter
    from ..model.gate import GATE_CONFIG, ThinkGate
    from ..model.zoo import load

    run_dir = dirs[name]
    saved = json.loads((run_dir / "tte_config.json").read_text())
    tte = UnifiedTTE(load(saved["backbone"], dtype=dtype or _dtype(settings)), TTEConfig.from_dict(saved))
    if tte.config.think == "lora":
        load_adapter(tte, "think", dirs["think"] / "think")
    load_adapter(tte, "embed", run_dir / "embed")
    if (run_dir / "gate" / GATE_CONFIG).is_file() and (dtype or _dtype(settings)) == _dtype(settings):
        tte.set_gate(ThinkGate.load(run_dir / "gate"), where=str(run_dir / "gate"))
    return tte.eval()


def trace_answer(trace: str) -> str:
    """The final answer of an ECR trace, normalised for comparison."""
    return trace.split("</think>")[-1].strip().strip(".").strip().casefold()


def answers_right(traces: dict[str, str], tasks) -> dict[str, float]:
    """Per task: the fraction of traces ({row id: trace}) whose final answer is the row's
    `answer_text`."""
    return {t.name: sum(trace_answer(traces[r.id]) == r.meta["answer_text"].casefold() for r in t.rows) / len(t.rows)
            for t in tasks}


def evaluate_systems(settings: DemoSettings, dirs: dict[str, Path], out: Path, tasks,
                     phases: console.Phases) -> dict:
    """Every system on the held-out tasks: {"model traces": {system: results}, "teacher traces":
    {system: results}, "answers right": {task: fraction}, "same traces": whether unified top_k
    decoded exactly unified activated's traces, "frontier": unified activated's think gate swept
    (eval/frontier.py), "examples"}.

    Unified activated is evaluated once with `frontier=True`: every query embedded directly and
    after its trace from one prefill, so its always-think row, its direct (never) row, the gate's
    operating points and the oracle all come from the same embeddings."""
    from ..eval import evaluate_model
    from ..eval.cache import MemoryCache
    from ..eval.evaluate import TaskPlan

    items = sum(len(t.rows) + len(TaskPlan(t).distinct) for t in tasks)   # what one evaluation embeds
    teacher = {r.id: r.meta["teacher_trace"] for t in tasks for r in t.rows}
    kwargs = dict(batch_size=settings.eval_batch_size, max_new_tokens=settings.max_new_tokens)
    model_traces, teacher_traces, written, frontier = {}, {}, {}, None
    # Decoding systems first: the two-model embedder is fed the traces unified-activated decoded.
    for name in ("unified TTE (activated)", "unified TTE (top_k)", "two-model TTE", "no-think embedder"):
        runs = 1 if name == "no-think embedder" else 2   # with its own traces, with the teacher's
        with phases.phase(f"evaluating {name}", total=runs * items, unit="items") as bar:
            model, memo = load_system(name, dirs, settings, out), MemoryCache()
            common = dict(kwargs, progress=bar, candidate_memo=memo)
            if name == "no-think embedder":
                model_traces[name] = evaluate_model(model, tasks, use_think=False, **common)
            else:
                if name == "two-model TTE":
                    result = evaluate_model(model, tasks, traces=written["unified TTE (activated)"], **common)
                elif name == "unified TTE (activated)" and model.gate is not None:
                    result = evaluate_model(model, tasks, frontier=True, keep_traces=True, **common)
                    frontier = result.pop("frontier")
                else:
                    result = evaluate_model(model, tasks, keep_traces=True, **common)
                if name != "two-model TTE":
                    written[name] = {rid: tr for m in result["tasks"].values() for rid, tr in m.pop("traces").items()}
                model_traces[name] = result
                teacher_traces[name] = evaluate_model(model, tasks, traces=teacher, **common)
            del model
    if frontier is not None:   # the activated row is always-think; the gate's rows beside it
        rows = gate_rows(frontier, tasks)
        activated = model_traces["unified TTE (activated)"]
        # its own groups/overall followed the gate's default point: only the always-think tasks stay
        model_traces["unified TTE (activated)"] = {"settings": activated.get("settings"),
                                                   **rows.pop("unified TTE (activated)")}
        model_traces.update(rows)
    reasoner = written["unified TTE (activated)"]
    right = answers_right(reasoner, tasks)
    for name in TTE_SYSTEMS:   # the same reasoner serves all three
        model_traces[name]["answer_accuracy"] = averages(right, tasks)[1]
    examples = {t.name: [{"query": r.query.text, "trace": reasoner[r.id], "answer": r.meta["answer_text"]}
                         for r in t.rows[:3]] for t in tasks}   # what the reasoner wrote, to eyeball
    return {"model traces": {n: model_traces[n] for n in SYSTEMS + tuple(GATE_ROWS) if n in model_traces},
            "teacher traces": {n: teacher_traces[n] for n in TTE_SYSTEMS},
            "answers right": right, "frontier": frontier,
            "same traces": written["unified TTE (top_k)"] == reasoner,
            "examples": examples}


EVALUATION_FILE = "evaluation.json"


def evaluation(settings: DemoSettings, dirs: dict[str, Path], out: Path, tasks, phases: console.Phases) -> dict:
    """evaluate_systems, kept in OUT/evaluation.json: a rerun of a demo whose runs were all reused
    (a later step failed, say) reads it instead of evaluating again; retraining a run deletes it."""
    path = out / EVALUATION_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        phases.index += len(SYSTEMS)   # its evaluation phases, skipped
        phases.say(f"evaluations reused from {path}")
        return saved
    results = evaluate_systems(settings, dirs, out, tasks, phases)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, default=str))
    tmp.replace(path)
    return results


GATE_ROWS = {"unified TTE (direct)": "never", "unified TTE (auto, quality)": "quality",
             "unified TTE (auto, compute)": "compute", "oracle (per query)": "oracle"}


def gate_rows(frontier: dict, tasks) -> dict:
    """The think gate's rows in the results' shape ({"tasks": {name: {"hit@1", "think_rate",
    "decoded_tokens_per_query"}}}), from unified activated's frontier; its always-think row
    replaces the task results (which followed the gate's default point)."""
    def shaped(per_task: dict) -> dict:
        return {"tasks": {n: {"hit@1": m["hit@1"], "think_rate": m.get("think_rate"),
                              "decoded_tokens_per_query": m.get("decoded_tokens_per_query")}
                          for n, m in per_task.items()}}

    rows = {"unified TTE (activated)": shaped(frontier["always"]["tasks"])}
    for row, point in GATE_ROWS.items():
        source = frontier["oracle"] if point == "oracle" else frontier["never"] if point == "never" \
            else frontier["points"].get(point)
        if source is not None:
            rows[row] = shaped(source["tasks"])
    return rows


# ----------------------------------------------------------------------------- tables and claims
def _short(name: str) -> str:
    return name.split("/")[-1]


def averages(per_task: dict[str, float], tasks) -> tuple[float, float]:
    """(mean over the reasoning sub-tasks, mean over all) of a {task: value} map."""
    reasoning = [t.name for t in tasks if t.needs_reasoning]
    return (sum(per_task[n] for n in reasoning) / max(1, len(reasoning)),
            sum(per_task[t.name] for t in tasks) / len(tasks))


def hit_table(results: dict[str, dict], tasks, answers: dict[str, float] | None = None) -> str:
    """Hit@1 (%) per system and sub-task, the reasoning and overall averages, and (model traces)
    how often the reasoner's trace ends in the right answer."""
    head = ["system"] + [_short(t.name) for t in tasks] + ["reasoning avg", "all avg"]
    head += ["trace answers right"] if answers is not None else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    right = None if answers is None else 100 * averages(answers, tasks)[1]
    for system, res in results.items():
        hits = {n: 100 * m["hit@1"] for n, m in res["tasks"].items()}
        cells = [system] + [f"{hits[t.name]:.1f}" for t in tasks] + [f"{v:.1f}" for v in averages(hits, tasks)]
        if answers is not None:
            cells.append(f"{right:.1f}" if system in TTE_SYSTEMS else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def think_table(results: dict[str, dict], tasks) -> str:
    """Per sub-task, how often each gate row decoded a trace, and the decoded tokens per query."""
    rows = [(name, results[name]) for name in ("unified TTE (activated)", *GATE_ROWS) if name in results]
    head = ["system"] + [_short(t.name) for t in tasks] + ["all", "decoded tokens / query"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, res in rows:
        per = res["tasks"]
        if per[tasks[0].name].get("think_rate") is None:
            continue
        rates = [per[t.name]["think_rate"] for t in tasks]
        tokens = sum(per[t.name]["decoded_tokens_per_query"] for t in tasks) / len(tasks)
        lines.append("| " + " | ".join([name] + [f"{r:.2f}" for r in rates] +
                                       [f"{sum(rates) / len(rates):.2f}", f"{tokens:.1f}"]) + " |")
    return "\n".join(lines)


def answers_table(answers: dict[str, float], tasks, who: str) -> str:
    head = ["reasoner"] + [_short(t.name) for t in tasks] + ["reasoning avg", "all avg"]
    cells = [who] + [f"{100 * answers[t.name]:.1f}" for t in tasks] + [f"{100 * v:.1f}" for v in averages(answers, tasks)]
    return "\n".join(["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1),
                      "| " + " | ".join(cells) + " |"])


# The claims' thresholds, in Hit@1 points unless named otherwise (what the issues ask of the demos).
THRESHOLDS = {
    "trace accuracy": 60.0,          # % of held-out reasoning queries whose trace ends right
    "unified vs two-model": 2.0,     # |difference|, reasoning avg and overall
    "TTE over no-think": 5.0,        # reasoning avg, with no reasoning sub-task below no-think
    "quality over always": 1.0,      # the gate's quality point, overall
    "quality per sub-task": 1.5,     # ... and no sub-task below max(no-think, always) by more
    "compute tokens": 0.6,           # the compute point's decoded tokens / always-think's
    "compute below always": 0.5,     # ... while overall stays within this of always-think
    "direct vs no-think": 1.5,       # the mixed-trained direct embedding vs the no-think embedder
}


def claims(results: dict, tasks) -> list[dict]:
    """The acceptance claims, each with its numbers and whether it holds (thresholds: THRESHOLDS)."""
    T = THRESHOLDS
    hits = {s: {n: 100 * m["hit@1"] for n, m in r["tasks"].items()} for s, r in results["model traces"].items()}
    avg = {s: averages(h, tasks) for s, h in hits.items()}
    reasoning = [t for t in tasks if t.needs_reasoning]
    n = sum(len(t.rows) for t in reasoning)
    pooled = 100 * sum(results["answers right"][t.name] * len(t.rows) for t in reasoning) / max(1, n)
    two = avg["two-model TTE"]
    out = [{"claim": f"think traces end in the right answer on >= {T['trace accuracy']:.0f}% of held-out reasoning queries",
            "value": f"{pooled:.1f}% of {n} queries (" + ", ".join(
                f"{_short(t.name)} {100 * results['answers right'][t.name]:.1f}" for t in reasoning) + ")",
            "holds": pooled >= T["trace accuracy"]}]
    for s in ("unified TTE (activated)", "unified TTE (top_k)"):
        d_reason, d_all = avg[s][0] - two[0], avg[s][1] - two[1]
        limit = T["unified vs two-model"]
        out.append({"claim": f"{s} within {limit:g} points Hit@1 of two-model TTE (reasoning avg, overall)",
                    "value": f"{d_reason:+.1f}, {d_all:+.1f}", "holds": abs(d_reason) <= limit and abs(d_all) <= limit})
    base = hits["no-think embedder"]
    for s in TTE_SYSTEMS:
        gain = avg[s][0] - avg["no-think embedder"][0]
        per = {_short(t.name): hits[s][t.name] - base[t.name] for t in reasoning}
        out.append({"claim": f"{s} >= {T['TTE over no-think']:g} points Hit@1 above no-think on the reasoning "
                             "avg, no reasoning sub-task below",
                    "value": f"{gain:+.1f} (" + ", ".join(f"{k} {v:+.1f}" for k, v in per.items()) + ")",
                    "holds": gain >= T["TTE over no-think"] and min(per.values()) >= 0})
    return out + gate_claims(results, tasks, hits, avg)


def gate_claims(results: dict, tasks, hits: dict, avg: dict) -> list[dict]:
    """The think gate's claims (unified activated): its two operating points, its direct
    embedding against the no-think embedder, and each point against the never-always line."""
    T, rows = THRESHOLDS, results["model traces"]
    if "unified TTE (auto, quality)" not in rows:
        return []
    always, quality = "unified TTE (activated)", "unified TTE (auto, quality)"
    best = {t.name: max(hits["no-think embedder"][t.name], hits[always][t.name]) for t in tasks}
    worst = min(tasks, key=lambda t: hits[quality][t.name] - best[t.name])
    gain = avg[quality][1] - avg[always][1]
    out = [{"claim": f"auto (quality point) >= always-think + {T['quality over always']:g} overall, every sub-task "
                     f">= max(no-think, always-think) - {T['quality per sub-task']:g}",
            "value": f"{gain:+.1f} overall; weakest sub-task {_short(worst.name)} "
                     f"{hits[quality][worst.name]:.1f} vs {best[worst.name]:.1f}",
            "holds": gain >= T["quality over always"] and all(
                hits[quality][t.name] >= best[t.name] - T["quality per sub-task"] for t in tasks)}]

    def tokens(row):
        per = rows[row]["tasks"]
        return sum(per[t.name]["decoded_tokens_per_query"] for t in tasks) / len(tasks)

    compute = "unified TTE (auto, compute)"
    if compute in rows:
        ratio = tokens(compute) / max(tokens(always), 1e-9)
        drop = avg[compute][1] - avg[always][1]
        out.append({"claim": f"auto (compute point) decodes <= {T['compute tokens']:g}x always-think's tokens "
                             f"with overall Hit@1 >= always-think - {T['compute below always']:g}",
                    "value": f"{ratio:.2f}x tokens ({tokens(compute):.1f} vs {tokens(always):.1f} per query), "
                             f"{drop:+.1f} overall",
                    "holds": ratio <= T["compute tokens"] and drop >= -T["compute below always"]})
    direct = avg["unified TTE (direct)"][1] - avg["no-think embedder"][1]
    out.append({"claim": f"the mixed-trained direct embedding within {T['direct vs no-think']:g} points of the "
                         "no-think embedder (overall)",
                "value": f"{direct:+.1f}", "holds": abs(direct) <= T["direct vs no-think"] or direct > 0})
    frontier = results.get("frontier") or {}
    for name, point in frontier.get("points", {}).items():
        out.append({"claim": f"the gate's {name} point on or above the never-always line",
                    "value": f"{100 * point['overall']['metric']:.1f} at think rate "
                             f"{point['overall']['think_rate']:.2f} (line {100 * point['line']:.1f})",
                    "holds": point["above_line"]})
    return out


def claims_table(items: list[dict]) -> str:
    lines = ["| claim | figures | holds |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['value']} | {'yes' if c['holds'] else '**no**'} |" for c in items]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 4. export
def export_and_check(dirs, settings: DemoSettings, out: Path, tasks, checkpoint: Path) -> dict:
    """Export unified-activated (fp32) and reload it; smollm2: the plain-PEFT trace check.
    Returns {"round_trip_max_diff", ["peft_same_traces", "peft_queries"]}."""
    from ..export import export_model
    from ..model import UnifiedTTE
    from ..model.zoo import load

    tte = load_system("unified TTE (activated)", dirs, settings, out, dtype=torch.float32)
    spec = json.loads((dirs["unified TTE (activated)"] / "tte_config.json").read_text())["backbone"]
    export_model(tte, checkpoint, dtype="fp32", backbone_spec=spec)
    rows = [r for t in tasks for r in t.rows[:2]]
    queries, traces = [r.query for r in rows], [r.meta["teacher_trace"] for r in rows]
    before = tte.embed(queries, traces)
    reloaded = UnifiedTTE.from_checkpoint(checkpoint, backbone=load(spec))
    report = {"round_trip_max_diff": float((before - reloaded.embed(queries, traces)).abs().max())}
    if settings.peft_check_queries:
        per_task = max(1, settings.peft_check_queries // len(tasks))
        held_out = [r.query for t in tasks for r in t.rows[:per_task]]
        ours = [t.text for t in reloaded.think(held_out, max_new_tokens=settings.max_new_tokens).traces]
        theirs = peft_generate(checkpoint, held_out, settings.max_new_tokens)
        report.update(peft_queries=len(held_out), peft_same_traces=sum(a == b for a, b in zip(ours, theirs)),
                      peft_examples=[{"query": q.text, "think": a, "peft_generate": b}
                                     for q, a, b in list(zip(held_out, ours, theirs))[:3]])
    return report


def peft_generate(checkpoint: Path, queries, max_new_tokens: int) -> list[str]:
    """Greedy traces of the exported think adapter with plain PEFT and Hugging Face `generate` on
    the plain base (no unified_tte code on the generation path): the user's chat-template prompt,
    left-padded batch, stop at end-of-turn."""
    from peft import PeftModel

    from ..export import prepare_base
    from ..model.inputs import chat_messages
    from ..model.zoo import load

    info = json.loads((Path(checkpoint) / "tte_config.json").read_text())
    base = prepare_base(load(info["backbone"]), checkpoint)   # the invocation-token row, hash checked
    model = PeftModel.from_pretrained(base.model, str(Path(checkpoint) / "think")).eval()
    tok = base.tokenizer
    tok.padding_side = "left"
    system = info.get("system_prompt")   # as the exported model renders its prompts
    prompts = [tok.apply_chat_template(chat_messages(q.text, system), tokenize=False,
                                       add_generation_prompt=True) for q in queries]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in ids]


# ----------------------------------------------------------------------------- main
def check_out_folder(out: Path, settings: DemoSettings, seed: int) -> None:
    """Runs in --out are reused only when they were made with these settings."""
    want = {"settings": asdict(settings), "seed": seed}
    path = out / "settings.json"
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(want)):
            raise InputError(f"{out} holds runs made with other demo settings ({path}); pass --fresh "
                             "to start over or choose another --out.")
    else:
        path.write_text(json.dumps(want, indent=2) + "\n")


@command("demo")
def demo_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tte demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: a random Qwen2-VL on digits (default); smollm2: the real "
                             "SmolLM2-135M-Instruct with a think LoRA on knowledge")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (CI); numbers are not meaningful")
    parser.add_argument("--out", default=None, help="folder for runs, results and bench output "
                        "(default runs/demo, runs/demo-smollm2)")
    parser.add_argument("--checkpoint", default=None, help="where the export lands "
                        "(default checkpoints/digits-tte, checkpoints/smollm2-tte)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for tiny, whose ops are too small to split; "
                             "all cores for smollm2). On a shared machine use no more than the free "
                             "cores: a thread that waits on a busy core stalls every op, often 10x")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency/memory bench")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing finished runs")
    parser.add_argument("--verbose", action="store_true",
                        help="also show third-party progress bars and info logs (hidden by default)")
    args = parser.parse_args(argv)
    if args.verbose:
        console.set_verbose()
    settings = PRESETS[(args.backbone, args.quick)]
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    tiny = args.backbone == "tiny"
    out = Path(args.out or ("runs/demo" if tiny else "runs/demo-smollm2"))
    checkpoint = Path(args.checkpoint or ("checkpoints/digits-tte" if tiny else "checkpoints/smollm2-tte"))
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    check_out_folder(out, settings, args.seed)
    threads = torch.get_num_threads()
    args.threads = args.threads or settings.threads or threads
    torch.set_num_threads(args.threads)
    try:
        return run_demo(args, settings, out, checkpoint, argv)
    finally:
        torch.set_num_threads(threads)


def run_demo(args, settings: DemoSettings, out: Path, checkpoint: Path, argv) -> int:
    """Steps 1-6 of the module docstring."""
    tiny = settings.backbone == "tiny"
    torch.manual_seed(args.seed)
    start, started = time.time(), git_state()

    from ..data.registry import build_builtin
    from ..model import zoo

    task = build_builtin(settings.task, **{**settings.task_options, "seed": args.seed})
    tasks = task.eval_tasks
    phases = demo_phases(settings, bench=not args.no_bench)
    phases.say(f"{settings.task}: {len(task.train_rows)} train rows, {len(tasks)} eval tasks "
               f"({', '.join(f'{_short(t.name)} {len(t.rows)}' for t in tasks)} queries x "
               f"{len(tasks[0].rows[0].candidates)} candidates)")
    with zoo.reuse_built():   # the base is built once, then copied for every run and system
        dirs = train_runs(settings, out, args.seed, phases)
        results = evaluation(settings, dirs, out, tasks, phases)
        with phases.phase(f"exporting unified TTE (activated) to {checkpoint}") as bar:
            export = export_and_check(dirs, settings, out, tasks, checkpoint)
            bar.note = f"reloaded embeddings differ by {export['round_trip_max_diff']:.1e}"
            if "peft_queries" in export:
                bar.note += (f"; plain PEFT + generate wrote the same traces as UnifiedTTE.think on "
                             f"{export['peft_same_traces']}/{export['peft_queries']} held-out queries")

    bench_table = ""
    if not args.no_bench:
        bench_args = list(settings.bench)
        compute = (results.get("frontier") or {}).get("points", {}).get("compute")
        if compute is not None:   # the gate's compute point, at the think rate it had on the eval queries
            bench_args += ["--think-rate", f"{compute['overall']['think_rate']:.2f}"]
        with phases.phase(f"bench: tte bench {' '.join(bench_args)}") as bar:
            with contextlib.redirect_stdout(io.StringIO()):   # its table is printed below, once
                code = _bench([*bench_args, "--out", str(out / "bench")])
            if code:
                raise RunError(f"the bench failed (exit {code}; its error is above); rerun with "
                               "--no-bench to skip it, or `tte --debug demo` for the traceback")
            bar.note = f"in {out / 'bench'}"
        bench_table = (out / "bench" / "table.md").read_text()
        if tiny:
            bench_table = f"{TINY_BENCH_NOTE}\n\n{bench_table}"

    elapsed = time.time() - start
    machine = _machine()
    items = claims(results, tasks)
    reasoner = "think LoRA (greedy)" if settings.backbone != "tiny" else "fully fine-tuned reasoner (greedy)"
    what = "held-out handwritten digits" if settings.task == "digits" else "held-out countries and elements"
    n_q = "/".join(str(len(t.rows)) for t in tasks)
    tables = (
        f"Hit@1 (%) on {what} ({n_q} queries x {len(tasks[0].rows[0].candidates)} candidates per "
        f"sub-task), traces written by the reasoner\n\n{hit_table(results['model traces'], tasks, results['answers right'])}\n\n"
        f"Hit@1 (%) with the teacher's traces (an upper bound: a reasoner that is always right)\n\n"
        f"{hit_table(results['teacher traces'], tasks)}\n\n"
        f"How often the reasoner's trace ends in the right answer (%)\n\n"
        f"{answers_table(results['answers right'], tasks, reasoner)}\n\n"
        + (f"How often the think gate let a query decode (think rate), and decoded tokens per query "
           f"(unified activated: always-think, the direct embedding, the gate's two operating points "
           f"fitted on held-out train rows, and the per-query oracle; frontier: {out / 'frontier.png'})\n\n"
           f"{think_table(results['model traces'], tasks)}\n\n" if results.get("frontier") else "")
        + f"Claims\n\n{claims_table(items)}\n")
    if results.get("frontier"):
        from ..eval.frontier import write_frontier
        write_frontier(results["frontier"], out, title=f"tte demo --backbone {settings.backbone}: think gate")
    summary = {"backbone": settings.backbone, "settings": asdict(settings), "quick": args.quick, "seed": args.seed,
               "results": results["model traces"], "teacher_results": results["teacher traces"],
               "answers_right": results["answers right"], "same_traces": results["same traces"],
               "frontier": results.get("frontier"),
               "examples": results["examples"], "claims": items, "export": export,
               "export_round_trip_max_diff": export["round_trip_max_diff"],
               "elapsed_s": elapsed, "machine": machine, "threads": args.threads,
               "command": "tte demo " + " ".join(argv or []),
               "provenance": provenance(command_line("tte demo", argv or []), machine, args.threads, started),
               "headline_md": f"Hit@1 (%) on {what}, traces written by the reasoner\n\n"
                              + hit_table(results["model traces"], tasks, results["answers right"]),
               "tables_md": tables, "bench_md": bench_table}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(f"# tte demo --backbone {settings.backbone} ({machine}, {args.threads} "
                                    f"threads, {elapsed / 60:.1f} min)\n\n{tables}\n{bench_table}\n")
    print()
    print(tables)
    if bench_table:
        print(bench_table)
    print(f"\nwrote {out / 'summary.md'} and {out / 'summary.json'}; checkpoint {checkpoint}; "
          f"{elapsed / 60:.1f} min on {machine}, {args.threads} threads")
    return 0
