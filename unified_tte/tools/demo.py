"""`tte demo`: the whole product on the built-in CPU default, in one command.

    tte demo            # the README's main job; its run time and table are in the README
    tte demo --quick    # fewer steps and queries (CI runs it; its numbers are not meaningful)

On the built-in digits task (scikit-learn's real handwritten digits, see unified_tte/digits.py):

1. think: a tiny random Qwen2-VL (hidden 128, 4 layers) is fully fine-tuned on the rule-based
   teacher's ECR traces (`tte train`, stage think, `think.method: full`). A tiny random model
   has no pretrained knowledge for a LoRA to steer, so the backbone itself becomes the reasoner
   (`think="none"`); every embedder below starts from this same backbone, as published TTE's
   reasoner and embedder start from the same MLLM.
2. embed, four ways (`tte train`, stage embed; same data, steps, batch and LoRA):
   - unified TTE, activated: an `embed` LoRA on the reasoner's backbone, KV reuse;
   - unified TTE, top_k: the embed LoRA on the top K layers only;
   - two-model TTE: a second copy of the backbone with one LoRA over query + trace (VLM2Vec
     style), queried with the reasoner's traces;
   - no-think embedder: the same second copy trained and queried without traces.
3. evaluate all four on held-out test images (Hit@1 per sub-task, `tte eval`'s code), and how
   often the reasoner's trace ends in the right answer,
4. export unified-activated to checkpoints/digits-tte and check the round trip,
5. a short latency/memory bench (`tte bench --quick`),
6. print one summary table; everything is written under --out (default runs/demo).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import command

SYSTEMS = ("no-think embedder", "two-model TTE", "unified TTE (activated)", "unified TTE (top_k)")


@dataclass
class DemoSettings:
    hidden_size: int = 128
    train_per_task: int = 400      # train rows per digits sub-task
    eval_queries: int = 100        # eval queries per sub-task (10 candidates each)
    think_steps: int = 250         # full fine-tuning on the teacher's traces
    embed_steps: int = 200         # per embedder
    batch_size: int = 32
    max_new_tokens: int = 40
    top_k_layers: int = 2
    temperature: float = 0.05


FULL = DemoSettings()
QUICK = DemoSettings(train_per_task=64, eval_queries=12, think_steps=10,
                     embed_steps=6, batch_size=16, max_new_tokens=24)


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1-3. training
def save_backbone(backbone, folder: Path) -> Path:
    """Write a Hugging Face checkpoint folder (weights, tokenizer, image processor) atomically."""
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.model.save_pretrained(tmp)
    backbone.tokenizer.save_pretrained(tmp)
    backbone.image_processor.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def train_runs(settings: DemoSettings, out: Path, seed: int) -> tuple[Path, dict[str, Path]]:
    """think (full fine-tuning of the tiny backbone), then the four embedders; each a `tte train`
    recipe run. Finished runs in --out are reused. Returns the reasoner folder and the run dirs."""
    from ..model.zoo import load, tiny_qwen2vl
    from ..train import load_stage_weights, recipe_from_dict, train

    init = out / "init"
    if not (init / "config.json").is_file():
        save_backbone(tiny_qwen2vl(seed=seed, hidden_size=settings.hidden_size), init)
    common = dict(
        deepspeed=str(Path(__file__).resolve().parents[2] / "recipes/deepspeed/zero0.json"),
        data={"train": "digits", "digits": {"seed": seed, "max_train_per_task": settings.train_per_task}},
        seed=seed, precision="fp32", checkpoint_every=0, keep_checkpoints=1, log_every=10,
        wandb={"mode": "disabled"},
    )
    lora = dict(pooling="last", lora_r=16, lora_alpha=32, think="none")
    embed = dict(steps=settings.embed_steps, batch_size=settings.batch_size, lr=2e-3,
                 warmup_steps=max(1, settings.embed_steps // 10), temperature=settings.temperature,
                 hard_negatives=True, gradcache_chunk=None)
    think = dict(method="full", freeze_vision=False, steps=settings.think_steps,
                 batch_size=settings.batch_size, micro_batch_size=settings.batch_size, lr=3e-3,
                 warmup_steps=max(1, settings.think_steps // 10))
    n_layers = 4
    reasoner = out / "reasoner"
    runs = {
        "think": (out / "think", init, dict(stages=["think"], model={"mode": "activated", **lora}, think=think)),
        "unified TTE (activated)": (out / "unified_activated", reasoner, dict(
            stages=["embed"], model={"mode": "activated", **lora}, embed=embed)),
        "unified TTE (top_k)": (out / "unified_top_k", reasoner, dict(
            stages=["embed"], model={"mode": "top_k", "embed_layers": settings.top_k_layers, **lora},
            embed=embed)),
        "two-model TTE": (out / "two_model_embedder", reasoner, dict(
            stages=["embed"], model={"mode": "top_k", "embed_layers": n_layers, **lora}, embed=embed)),
        "no-think embedder": (out / "no_think_embedder", reasoner, dict(
            stages=["embed"], model={"mode": "top_k", "embed_layers": n_layers, **lora},
            embed={**embed, "use_traces": False})),
    }
    dirs = {}
    for name, (run_dir, backbone, spec) in runs.items():
        dirs[name] = run_dir
        stage = spec["stages"][-1]
        weights = "model.safetensors" if stage == "think" else "adapter_model.safetensors"
        if (run_dir / stage / weights).is_file():
            log(f"{name}: reusing {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            log(f"training {name} -> {run_dir}")
            recipe = recipe_from_dict({**common, "backbone": str(backbone), "run_dir": str(run_dir), **spec},
                                      source=f"demo:{name}")
            losses = [loss for _, loss in train(recipe)["losses"][stage]]
            log(f"{name}: {stage} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        if name == "think" and not (reasoner / "config.json").is_file():
            # The fully fine-tuned backbone is the reasoner (think="none") every embedder starts from.
            from ..model import UnifiedTTE
            tte = UnifiedTTE(load(init), think="none")
            load_stage_weights(tte, run_dir / "think", "think", full=True)
            bb = tte.backbone
            bb.model = tte.peft_model.unload()
            save_backbone(bb, reasoner)
    return reasoner, dirs


# ----------------------------------------------------------------------------- 4. evaluation
class TwoModelTTE:
    """A reasoner and a separate embedder: traces are re-encoded with query by the second model."""

    def __init__(self, reasoner, embedder):
        self.reasoner, self.embedder = reasoner, embedder

    def think_then_embed(self, inputs, max_new_tokens=64):
        traces = self.reasoner.think(inputs, max_new_tokens=max_new_tokens).traces
        return self.embedder.embed(inputs, traces), traces

    def embed(self, inputs, traces=None):
        return self.embedder.embed(inputs, traces)


class RecordingModel:
    """Keeps the traces a model writes, to score the reasoner's answers."""

    def __init__(self, model):
        self.model, self.traces = model, []

    def think_then_embed(self, inputs, max_new_tokens=64):
        emb, traces = self.model.think_then_embed(inputs, max_new_tokens=max_new_tokens)
        self.traces += [t.text for t in traces]
        return emb, traces

    def embed(self, inputs, traces=None):
        return self.model.embed(inputs, traces)


def load_system(name: str, dirs: dict[str, Path], reasoner: Path):
    """One of SYSTEMS, built from its run dir on a fresh copy of the reasoner backbone."""
    from ..model import TTEConfig, UnifiedTTE
    from ..model.checkpoint import load_adapter
    from ..model.zoo import load

    def with_embed_adapter(run_dir: Path):
        saved = json.loads((run_dir / "tte_config.json").read_text())
        config = TTEConfig(**{k: v for k, v in saved.items() if k in TTEConfig.__dataclass_fields__})
        tte = UnifiedTTE(load(reasoner), config)
        load_adapter(tte, "embed", run_dir / "embed")
        return tte.eval()

    if name == "two-model TTE":
        # The reasoner is the fine-tuned backbone itself; the embedder is a second full copy.
        return TwoModelTTE(UnifiedTTE(load(reasoner), think="none").eval(), with_embed_adapter(dirs[name]))
    return with_embed_adapter(dirs[name])


def answer_accuracy(traces: list[str], tasks) -> float:
    """Fraction of traces whose final answer word is the right number word."""
    from ..data.digits import WORDS

    rows = [r for t in tasks for r in t.rows]
    right = sum(t.split("</think>")[-1].strip().lower() == WORDS[r.meta["answer"]]
                for t, r in zip(traces, rows))
    return right / max(1, len(rows))


def evaluate_systems(settings, dirs, reasoner, tasks) -> dict:
    from ..eval import evaluate_model

    results = {}
    for name in SYSTEMS:
        log(f"evaluating {name}")
        model = load_system(name, dirs, reasoner)
        think = name != "no-think embedder"
        recorder = RecordingModel(model)
        results[name] = evaluate_model(recorder, tasks, batch_size=50, use_think=think,
                                       max_new_tokens=settings.max_new_tokens)
        if think:
            results[name]["answer_accuracy"] = answer_accuracy(recorder.traces, tasks)
    return results


def summary_table(results: dict, tasks) -> str:
    names = [t.name.split("/")[-1] for t in tasks]
    reasoning = [t.name for t in tasks if t.needs_reasoning]
    head = ["system"] + names + ["reasoning avg", "all avg", "trace answers right"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for system, res in results.items():
        hits = {n: 100 * m["hit@1"] for n, m in res["tasks"].items()}
        reason = sum(hits[n] for n in reasoning) / max(1, len(reasoning))
        acc = res.get("answer_accuracy")
        cells = [system] + [f"{hits[t.name]:.1f}" for t in tasks]
        cells += [f"{reason:.1f}", f"{sum(hits.values()) / len(hits):.1f}",
                  "-" if acc is None else f"{100 * acc:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 5. export
def export_and_check(dirs, reasoner: Path, tasks, checkpoint: Path) -> float:
    from ..export import export_model
    from ..model import UnifiedTTE
    from ..model.zoo import load

    tte = load_system("unified TTE (activated)", dirs, reasoner)
    export_model(tte, checkpoint, dtype="fp32", backbone_spec=str(reasoner))
    queries = [r.query for t in tasks for r in t.rows[:2]]
    traces = ["<think>The image shows a 3. Three plus two is five.</think> five"] * len(queries)
    before = tte.embed(queries, traces)
    after = UnifiedTTE.from_checkpoint(checkpoint, backbone=load(reasoner)).embed(queries, traces)
    return float((before - after).abs().max())


# ----------------------------------------------------------------------------- main
@command("demo")
def demo_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tte demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast run (CI); numbers are not meaningful")
    parser.add_argument("--out", default="runs/demo", help="folder for runs, results and bench output")
    parser.add_argument("--checkpoint", default="checkpoints/digits-tte", help="where the export lands")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bench", action="store_true", help="skip the latency/memory bench")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing finished runs")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    start = time.time()

    from ..data.digits import build_digits
    digits = build_digits(seed=args.seed, max_train_per_task=settings.train_per_task,
                          max_eval_per_task=settings.eval_queries)
    log(f"digits: {len(digits.train_rows)} train rows ({len(digits.train_indices)} train images), "
        f"{len(digits.eval_tasks)} eval tasks x {settings.eval_queries} queries on "
        f"{len(digits.test_indices)} held-out images")
    reasoner, dirs = train_runs(settings, out, args.seed)
    results = evaluate_systems(settings, dirs, reasoner, digits.eval_tasks)
    table = summary_table(results, digits.eval_tasks)

    round_trip = export_and_check(dirs, reasoner, digits.eval_tasks, Path(args.checkpoint))
    log(f"exported unified TTE (activated) to {args.checkpoint}; reloaded embeddings differ by {round_trip:.1e}")

    bench_table = ""
    if not args.no_bench:
        from .bench import bench_main
        log("bench: unified vs two-model latency and memory (tiny, quick)")
        bench_main(["--quick", "--out", str(out / "bench")])
        bench_table = (out / "bench" / "table.md").read_text()

    elapsed = time.time() - start
    summary = {"settings": asdict(settings), "quick": args.quick, "seed": args.seed,
               "results": results, "export_round_trip_max_diff": round_trip,
               "elapsed_s": elapsed, "machine": _machine()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(f"# tte demo ({_machine()})\n\nHit@1 (%) on held-out digits\n\n"
                                    f"{table}\n\n{bench_table}\n")
    print()
    print(f"Hit@1 (%) on held-out handwritten digits, {settings.eval_queries} queries x 10 candidates per task")
    print(table)
    if bench_table:
        print()
        print(bench_table)
    print(f"\nwrote {out / 'summary.md'} and {out / 'summary.json'}; checkpoint {args.checkpoint}; "
          f"{elapsed / 60:.1f} min on {_machine()}")
    return 0


def _machine() -> str:
    from tte_kernels.measure import machine_name
    return machine_name()
