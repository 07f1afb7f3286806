"""`tte demo`: the whole product on the built-in CPU default, in one command.

    tte demo            # ~10 minutes on 2 CPU cores
    tte demo --quick    # ~2 minutes: fewer steps and queries (CI runs it; numbers are not meaningful)

On the built-in digits task (scikit-learn's real handwritten digits, see unified_tte/digits.py):

1. base: a tiny random Qwen2-VL learns to read digits (full fine-tuning on "the image shows a
   3" captions). It stands in for a pretrained MLLM, so every system below starts from a base
   that can see, as published TTE starts from Qwen2-VL.
2. think: the `think` LoRA learns the teacher's ECR traces (`tte train`, stage think).
3. embed, four ways (`tte train`, stage embed, same data, steps and batch):
   - unified TTE, activated: an `embed` LoRA on the same backbone, think frozen, KV reuse;
   - unified TTE, top_k: the embed LoRA on the top K layers only;
   - two-model TTE: a separate embedder copy with its own LoRA over query + trace
     (the reasoner is the same base + think);
   - no-think embedder: the separate embedder trained and queried without traces.
4. evaluate all four on the held-out test images (Hit@1 per sub-task, `tte eval`'s code),
5. export unified-activated to checkpoints/digits-tte and check the round trip,
6. a short latency/memory bench (`tte bench --quick`),
7. print one summary table; everything is written under --out (default runs/demo).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SYSTEMS = ("no-think embedder", "two-model TTE", "unified TTE (activated)", "unified TTE (top_k)")


@dataclass
class DemoSettings:
    hidden_size: int = 128
    train_per_task: int = 400      # train rows per digits sub-task
    eval_queries: int = 100        # eval queries per sub-task (10 candidates each)
    base_steps: int = 160          # full fine-tuning of the tiny base on captions
    think_steps: int = 120
    embed_steps: int = 100         # per embedder
    batch_size: int = 32
    max_new_tokens: int = 40
    top_k_layers: int = 2
    temperature: float = 0.05


FULL = DemoSettings()
QUICK = DemoSettings(train_per_task=64, eval_queries=12, base_steps=12, think_steps=8,
                     embed_steps=6, batch_size=16, max_new_tokens=24)


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. the base
def build_base(settings: DemoSettings, rows, out: Path, seed: int) -> Path:
    """Teach a tiny random Qwen2-VL to read digits and save it as a local checkpoint folder."""
    from tqdm.auto import tqdm

    from . import UnifiedTTE
    from .testing import tiny_qwen2vl

    folder = out / "base"
    if (folder / "config.json").is_file():
        log(f"base: reusing {folder}")
        return folder
    captions = [r for r in rows if r.task == "digits/classify"]
    tte = UnifiedTTE(tiny_qwen2vl(seed=seed, hidden_size=settings.hidden_size), think="none")
    params = [p for n, p in tte.peft_model.named_parameters() if "lora_" not in n]
    for p in params:
        p.requires_grad_(True)
    lr = 3e-3
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=settings.base_steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(settings.base_steps), desc="base: read digits", unit="step")
    for _ in bar:
        pick = torch.randperm(len(captions), generator=gen)[:settings.batch_size].tolist()
        batch = [captions[i] for i in pick]
        loss = tte.sft_loss([r.qry for r in batch], [r.trace for r in batch])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    base = tte.peft_model.unload()  # drop the (untrained) LoRA layers, keep the trained weights
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base.save_pretrained(tmp)
    tte.tokenizer.save_pretrained(tmp)
    tte.backbone.image_processor.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# ----------------------------------------------------------------------------- 2-3. training
def train_runs(settings: DemoSettings, base: Path, out: Path, seed: int) -> dict[str, Path]:
    """think once, then the four embedders, each a `tte train` recipe run."""
    from .recipe import recipe_from_dict
    from .train import train

    common = dict(
        backbone=str(base), deepspeed=str(Path(__file__).resolve().parent.parent / "recipes/deepspeed/zero0.json"),
        data={"train": "digits", "digits": {"seed": seed, "max_train_per_task": settings.train_per_task}},
        seed=seed, precision="fp32", checkpoint_every=0, keep_checkpoints=1, log_every=10,
        wandb={"mode": "disabled"},
    )
    lora = dict(pooling="last", lora_r=16, lora_alpha=32)
    embed = dict(steps=settings.embed_steps, batch_size=settings.batch_size, lr=2e-3,
                 warmup_steps=max(1, settings.embed_steps // 10), temperature=settings.temperature,
                 hard_negatives=True, gradcache_chunk=None)
    n_layers = 4
    think_dir = out / "think"
    runs = {
        "think": (think_dir, dict(stages=["think"], model={"mode": "activated", **lora},
                                  think=dict(steps=settings.think_steps, batch_size=settings.batch_size,
                                             micro_batch_size=settings.batch_size, lr=2e-3,
                                             warmup_steps=max(1, settings.think_steps // 10)))),
        "unified TTE (activated)": (out / "unified_activated", dict(
            stages=["embed"], think_adapter=str(think_dir / "think"),
            model={"mode": "activated", **lora}, embed=embed)),
        "unified TTE (top_k)": (out / "unified_top_k", dict(
            stages=["embed"], think_adapter=str(think_dir / "think"),
            model={"mode": "top_k", "embed_layers": settings.top_k_layers, **lora}, embed=embed)),
        "two-model TTE": (out / "two_model_embedder", dict(
            stages=["embed"], model={"mode": "top_k", "embed_layers": n_layers, "think": "none", **lora},
            embed=embed)),
        "no-think embedder": (out / "no_think_embedder", dict(
            stages=["embed"], model={"mode": "top_k", "embed_layers": n_layers, "think": "none", **lora},
            embed={**embed, "use_traces": False})),
    }
    dirs = {}
    for name, (run_dir, spec) in runs.items():
        dirs[name] = run_dir
        if (run_dir / spec["stages"][-1] / "adapter_model.safetensors").is_file():
            log(f"{name}: reusing {run_dir}")
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        log(f"training {name} -> {run_dir}")
        recipe = recipe_from_dict({**common, "run_dir": str(run_dir), **spec}, source=f"demo:{name}")
        result = train(recipe)
        stage = spec["stages"][-1]
        losses = [loss for _, loss in result["losses"][stage]]
        log(f"{name}: {stage} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return dirs


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


def load_system(name: str, dirs: dict[str, Path], base: Path):
    from . import TTEConfig, UnifiedTTE
    from .backbones import load
    from .export import load_adapter

    def with_adapters(run_dir: Path, think: bool):
        saved = json.loads((run_dir / "tte_config.json").read_text())
        config = TTEConfig(**{k: v for k, v in saved.items() if k in TTEConfig.__dataclass_fields__})
        tte = UnifiedTTE(load(base), config)
        if think:
            load_adapter(tte, "think", dirs["think"] / "think")
        load_adapter(tte, "embed", run_dir / "embed")
        return tte.eval()

    if name == "two-model TTE":
        reasoner = UnifiedTTE(load(base), mode="activated", lora_r=16, lora_alpha=32)
        load_adapter(reasoner, "think", dirs["think"] / "think")
        return TwoModelTTE(reasoner.eval(), with_adapters(dirs[name], think=False))
    return with_adapters(dirs[name], think=name.startswith("unified"))


def answer_accuracy(traces: list[str], tasks) -> float:
    """Fraction of traces whose final answer word is the right number word."""
    from .digits import WORDS

    rows = [r for t in tasks for r in t.rows]
    right = sum(t.split("</think>")[-1].strip().lower() == WORDS[r.meta["answer"]]
                for t, r in zip(traces, rows))
    return right / max(1, len(rows))


def evaluate_systems(settings, dirs, base, tasks) -> dict:
    from .evaluate import evaluate_model

    results = {}
    for name in SYSTEMS:
        log(f"evaluating {name}")
        model = load_system(name, dirs, base)
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
def export_and_check(dirs, base: Path, tasks, checkpoint: Path) -> float:
    from . import UnifiedTTE
    from .backbones import load
    from .export import export_model

    tte = load_system("unified TTE (activated)", dirs, base)
    export_model(tte, checkpoint, dtype="fp32", backbone_spec=str(base))
    queries = [r.query for t in tasks for r in t.rows[:2]]
    traces = ["<think>The image shows a 3. Three plus two is five.</think> five"] * len(queries)
    before = tte.embed(queries, traces)
    after = UnifiedTTE.from_checkpoint(checkpoint, backbone=load(base)).embed(queries, traces)
    return float((before - after).abs().max())


# ----------------------------------------------------------------------------- main
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

    from .digits import build_digits
    digits = build_digits(seed=args.seed, max_train_per_task=settings.train_per_task,
                          max_eval_per_task=settings.eval_queries)
    log(f"digits: {len(digits.train_rows)} train rows ({len(digits.train_indices)} train images), "
        f"{len(digits.eval_tasks)} eval tasks x {settings.eval_queries} queries on "
        f"{len(digits.test_indices)} held-out images")
    base = build_base(settings, digits.train_rows, out, args.seed)
    dirs = train_runs(settings, base, out, args.seed)
    results = evaluate_systems(settings, dirs, base, digits.eval_tasks)
    table = summary_table(results, digits.eval_tasks)

    round_trip = export_and_check(dirs, base, digits.eval_tasks, Path(args.checkpoint))
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
    import os
    import platform
    return f"{platform.machine()} CPU, {os.cpu_count()} cores" if not torch.cuda.is_available() \
        else torch.cuda.get_device_name(0)
