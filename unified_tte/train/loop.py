"""Training: `tte train RECIPE.yaml [key=value ...] [--resume]` — the `think` SFT stage and the
`embed` contrastive stage on a DeepSpeed ZeRO engine (stage 0-3 from the recipe's JSON), in one
process or many (torchrun or the deepspeed launcher; gloo on CPU, NCCL on GPU).

    tte train recipes/tiny_cpu.yaml                                      # one process
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m unified_tte.cli train recipes/tiny_cpu.yaml
    deepspeed --num_gpus 8 --module unified_tte.train recipes/qwen2vl_2b.yaml  # DeepSpeed's launcher
    tte train recipes/tiny_cpu.yaml embed.steps=50 --resume               # continue from the newest checkpoint

Stages run in the recipe's order, each on a fresh model and engine (earlier stages' weights
are read back from the run folder, which is also how `--resume` restores them):

* think: mean cross-entropy on the trace tokens and the closing end-of-turn token only
  (`UnifiedTTE.sft_loss`); the `think` LoRA, or the whole language model (`think.method: full`,
  vision tower frozen by default). Micro-batches are accumulated into the global batch.
* embed: InfoNCE (`tte_kernels.info_nce`, temperature 0.02 by default) of query (+ trace)
  embeddings against positives and optional hard negatives, with `think` and the base frozen,
  through `UnifiedTTE.embed_with_grad` — the function `embed` serves, so what is trained is
  what is served (activated or top_k). Targets are gathered from every rank with gradient
  (train/losses.py). GradCache (`embed.gradcache_chunk`): embeddings of the whole batch without grad,
  chunk by chunk; the loss and its gradient w.r.t. the embeddings; then each chunk re-run with
  grad and backpropagated with those cached gradients. Its plain twin (`gradcache_chunk: null`)
  is one forward with grad; tests hold their gradients equal.

Every optimizer step: warmup + cosine learning rate, gradient clipping, bf16 on GPU and fp32 on
CPU, a non-finite loss check before the update and a finite gradient-norm and weight check after
it (either stops the run with a message naming the last good checkpoint, see the run folder
below), logging to wandb (offline unless configured), metrics.jsonl and a progress bar
on rank 0.

This module is the loop; its plumbing is beside it: recipe.py (the typed recipe), batches.py
(rows and batch order), steps.py (the two backward steps), engine.py (DeepSpeed), checkpointing.py
(the run folder), run_log.py (metrics, wandb), rng.py; the ranks and their collectives are
unified_tte/distributed.py's.

Run folder (RUN_DIR = the recipe's run_dir):

    .tte.lock                 while a process trains here: its host, pid and start time (locks.py);
                              a second `tte train` (or `tte export`) of the folder is refused
    recipe.yaml               the resolved recipe: overrides applied, absolute paths (rewritten by a
                              resume, so it holds the steps the run goes on with)
    tte_config.json           TTEConfig.to_dict() + "backbone" (the recipe's spec: tiny | smollm2 |
                              a folder) + "backbone_name"
    metrics.jsonl             one JSON object per logged step (rank 0); a fresh start (no good
                              checkpoint) moves an earlier run's log to metrics.jsonl.N first
    checkpoints/step_N/       DeepSpeed engine state (trainable weights, optimizer, LR scheduler)
                              + trainer_state.json {step, stage, stage_step, samples, zero_stage,
                              rng: {rank: ..}};
                              N counts optimizer steps over all stages, think first. It is written
                              with trainer_state.pending.json, renamed to trainer_state.json (a good
                              checkpoint, what --resume uses) once the next step's loss on its
                              weights is finite (at a stage's end: once they are checked finite)
    think/                    PEFT adapter folder: adapter_config.json, adapter_model.safetensors
                              (think.method full: model.safetensors, the trained language model
                              weights under their PEFT-wrapped names)
    embed/                    PEFT adapter folder
    wandb/                    the wandb run (offline: `wandb sync RUN_DIR/wandb/offline-run-*`)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.records import read_yaml_mapping
from ..distributed import Ranks, all_reduce, barrier, launch_rank
from ..errors import NonFiniteLoss, TrainError, command
from ..locks import lock_folder
from ..model import TTEConfig, UnifiedTTE, zoo
from ..model.environment import check_kernel_environment
from .batches import load_rows, split_holdout, stage_rows, stage_sampler, without_traces
from .checkpointing import (checkpoints, discard, discard_unfinished, load_stage_weights, promote, save_checkpoint,
                            save_stage, write_recipe, write_run_files)
from .engine import init_distributed, lr_lambda, make_engine, require_deepspeed, stage_shape, update_is_finite
from .gate import fit_gate_stage
from .recipe import Recipe, absolute_paths, check_inputs, dump_yaml, load_recipe, zero_stage
from .rng import seed_everything, set_rng_state
from .run_log import RunLog, memory_gb, set_aside_log, truncate_metrics
from .steps import embed_backward, think_backward


def load_backbone(spec: str, dtype: torch.dtype):
    return zoo.load(spec, dtype=dtype)


def uses_bf16(recipe: Recipe, device: torch.device) -> bool:
    """precision auto: bf16 on GPU (the published recipes), fp32 on CPU."""
    return recipe.precision == "bf16" or (recipe.precision == "auto" and device.type == "cuda")


def build_model(recipe: Recipe, dtype: torch.dtype) -> UnifiedTTE:
    return UnifiedTTE(load_backbone(recipe.backbone, dtype), TTEConfig(**recipe.model.to_dict()))


# What a run's checkpoints are made of: resuming under other values would load weights into a
# model they do not fit (or silently train another model). Schedules, data and logging may change.
IDENTITY_KEYS = ("backbone", "stages", "model", "think.method", "seed")


def check_resumable(recipe: Recipe, run_dir: Path, checkpoint: Path, state: dict, ds_json: dict) -> None:
    """Refuse --resume from `checkpoint` (its trainer_state.json is `state`) when the recipe changes
    what the run's checkpoints are made of, the ZeRO stage that wrote them, or their numbering."""
    saved_file = run_dir / "recipe.yaml"
    if not saved_file.is_file():
        return
    saved = read_yaml_mapping(saved_file, TrainError, "run recipe")
    now = recipe.to_dict()

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    changed = [(k, get(saved, k), get(now, k)) for k in IDENTITY_KEYS if get(saved, k) != get(now, k)]
    if changed:
        key, old, new = changed[0]
        raise TrainError(f"--resume: {key} was {old!r} in {saved_file} and is {new!r} now; a run "
                         f"resumes with the {', '.join(IDENTITY_KEYS)} it started with. Use another "
                         f"run_dir for a new run (changed: {[c[0] for c in changed]}).")
    written_by, stage_now = state.get("zero_stage"), zero_stage(ds_json)
    if written_by is not None and written_by != stage_now:
        raise TrainError(f"--resume: deepspeed: {checkpoint} was written under ZeRO stage {written_by} and "
                         f"{recipe.deepspeed} is stage {stage_now}; a DeepSpeed checkpoint loads only under the "
                         f"stage that wrote it: resume with a stage-{written_by} config (the run's recipe.yaml "
                         f"names {get(saved, 'deepspeed')}).")
    # Global step N counts every earlier stage's steps, so those are fixed once a stage is done;
    # the stage the checkpoint is in may grow, but not end before the step the checkpoint holds.
    current, done = state["stage"], state["stage_step"]
    allowed = (f"the steps of the stages after {current}, and {current}.steps (to {done} or more) while "
               f"{current} is unfinished")
    for name in recipe.stages[:recipe.stages.index(current) + 1]:
        before, after = get(saved, f"{name}.steps"), recipe.stage(name).steps
        finished = name != current or done >= before
        if finished and after != before:
            raise TrainError(f"--resume: {name}.steps was {before} in {saved_file} and is {after} now, but stage "
                             f"{name} has finished (the newest checkpoint, {checkpoint.name}, is {current} step "
                             f"{done}): a finished stage's steps number every checkpoint after it. A resume may "
                             f"change {allowed}; use another run_dir to train {name} again.")
        if name == current and after < done:
            raise TrainError(f"--resume: {name}.steps={after} ends stage {name} before step {done}, which "
                             f"{checkpoint.name} has already done; a resume may change {allowed}.")


def train(recipe: Recipe, resume: bool = False, progress=None) -> dict:
    """Run the recipe's stages. Returns {"run_dir", "losses": {stage: [(step, loss), ...]},
    "stopped": True if stop_after ended the run early}. `progress`: a caller's progress line
    (`console.Progress`, updated once per step) in place of the run's own bar and messages."""
    require_deepspeed()
    recipe = absolute_paths(recipe)
    ds_json = check_inputs(recipe)
    check_kernel_environment()
    # One process per run folder, refused here before it loads any data; rank 0 holds the lock
    # for every rank of its launch.
    with lock_folder(recipe.run_dir, "tte train") if launch_rank() == 0 else contextlib.nullcontext():
        return _train_locked(recipe, ds_json, resume, progress)


def _train_locked(recipe: Recipe, ds_json: dict, resume: bool, progress) -> dict:
    rows, held_out = split_holdout(recipe, load_rows(recipe))   # held-out rows: the gate stage's
    per_stage = {s: stage_rows(recipe, s, rows) for s in recipe.training_stages}
    d = init_distributed()
    for i, s in enumerate(recipe.training_stages):
        stage_shape(recipe, s, d.world)  # batch shapes that do not split fail here
        stage_sampler(recipe, s, i, per_stage[s])  # subsets that cannot fill a same-task batch too
        if len(per_stage[s]) < recipe.stage(s).batch_size:
            raise TrainError(f"{s}.batch_size={recipe.stage(s).batch_size} is more than the "
                             f"{len(per_stage[s])} rows the stage can use.")
    run_dir = Path(recipe.run_dir)
    found = checkpoints(run_dir)
    if found and not resume:
        raise TrainError(f"{run_dir} already holds checkpoints (newest {found[-1][1].name}); pass "
                         "--resume to continue that run, or set another run_dir.")
    state = None
    if resume and found:
        state = json.loads((found[-1][1] / "trainer_state.json").read_text())
        check_resumable(recipe, run_dir, found[-1][1], state, ds_json)
    bf16 = uses_bf16(recipe, d.device)
    dtype = torch.bfloat16 if bf16 else torch.float32

    seed_everything(recipe.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    earlier_log = None
    if d.rank == 0:
        discard_unfinished(run_dir)   # pending or cut checkpoints of a process that is gone
        if state:
            truncate_metrics(run_dir, state["step"])  # steps after the checkpoint run again
            write_recipe(recipe, run_dir)   # the schedule it goes on with, which the next resume checks
        else:
            earlier_log = set_aside_log(run_dir)   # a fresh start: one run's log holds one run
    log = RunLog(recipe, run_dir, d, initial=state["step"] if state else 0, progress=progress)
    if earlier_log is not None:
        log.message(f"no good checkpoint in {run_dir}: a new run starts; the earlier run's metrics are "
                    f"kept in {earlier_log.name}")
    if state:
        log.message(f"resuming {run_dir} from step {state['step']} ({state['stage']} step {state['stage_step']})")
    elif resume:
        log.message(f"no checkpoint in {run_dir}: starting from the beginning")
    losses: dict[str, list] = {s: [] for s in recipe.stages}
    step_offset = 0
    stopped = False
    try:
        for index, stage in enumerate(recipe.training_stages):
            spec = recipe.stage(stage)
            resumed_index = recipe.training_stages.index(state["stage"]) if state else -1
            if index < resumed_index:  # finished before the checkpoint: its weights are in RUN_DIR
                step_offset += spec.steps
                continue
            resumed = state if state and index == resumed_index else None
            run = StageRun(recipe=recipe, stage=stage, index=index, rows=per_stage[stage], ds_json=ds_json,
                           dist=d, dtype=dtype, bf16=bf16, run_dir=run_dir, step_offset=step_offset,
                           resume_state=resumed, log=log, losses=losses[stage])
            stopped = run.run()
            step_offset += spec.steps
            if stopped:
                break
        gate = None
        if "gate" in recipe.stages and not stopped:
            if d.rank == 0:   # a small head on held-out rows: one process fits it, the others wait
                gate = fit_gate_stage(recipe, run_dir, held_out, dtype, d.device, progress, log.message)
            barrier(d)
    finally:
        log.close()
    return {"run_dir": str(run_dir), "losses": losses, "stopped": stopped, "gate": gate}


@dataclass
class StageRun:
    """One stage of a run: a fresh model and engine, from step 0 or from a resume checkpoint."""
    recipe: Recipe
    stage: str                      # "think" | "embed"
    index: int                      # its position in recipe.stages (seeds its batch order)
    rows: list                      # the rows it can use (stage_rows)
    ds_json: dict                   # the recipe's DeepSpeed JSON as read
    dist: Ranks
    dtype: torch.dtype
    bf16: bool
    run_dir: Path
    step_offset: int                # global steps of the stages before it
    resume_state: dict | None = None    # trainer_state.json of the checkpoint to resume from
    log: RunLog | None = None
    losses: list = field(default_factory=list)   # (global step, loss), appended to

    @property
    def spec(self):
        return self.recipe.stage(self.stage)

    @property
    def start(self) -> int:
        return self.resume_state["stage_step"] if self.resume_state else 0

    def build(self):
        """The model with every earlier stage's weights, and its engine (state restored on resume)."""
        recipe, run_dir, d = self.recipe, self.run_dir, self.dist
        tte = build_model(recipe, self.dtype)
        if d.rank == 0 and self.index == 0 and self.start == 0:
            write_run_files(recipe, tte, run_dir)
        # Earlier stages' weights: this run's, or an adapter the recipe starts from.
        if recipe.think_adapter and "think" not in recipe.stages:
            load_stage_weights(tte, Path(recipe.think_adapter), "think")
        for earlier in recipe.stages[:self.index]:
            load_stage_weights(tte, run_dir / earlier, earlier,
                               full=earlier == "think" and recipe.think.method == "full")
        engine = make_engine(recipe, self.stage, tte, self.ds_json, d.world, self.bf16)
        if self.resume_state is not None:
            self._restore(engine)
        return tte, engine

    def _restore(self, engine) -> None:
        spec, state = self.spec, self.resume_state
        engine.load_checkpoint(str(self.run_dir / "checkpoints"), tag=f"step_{state['step']}",
                               load_module_strict=False)
        set_rng_state(state["rng"][str(self.dist.rank)])
        # The schedule follows the recipe as given now (a lower lr after a non-finite loss takes
        # effect); unchanged, this recomputes exactly the values the checkpoint holds.
        sched, factor = engine.lr_scheduler, lr_lambda(spec.warmup_steps, spec.steps, spec.min_lr_ratio)
        sched.base_lrs = [spec.lr for _ in sched.base_lrs]
        for group in engine.optimizer.param_groups:
            group["lr"] = spec.lr * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in engine.optimizer.param_groups]

    def backward(self, engine, rows: list, micro: int, step: int) -> tuple[float, int, bool]:
        if self.stage == "think":
            return think_backward(engine, rows, micro)
        e = self.recipe.embed
        rows = without_traces(rows, e.no_trace_fraction, self.recipe.seed, step)
        return embed_backward(engine, rows, e.gradcache_chunk, e.temperature, e.use_traces,
                              e.hard_negatives, e.gather_negatives, e.gradcache_keep_prefix)

    def run(self) -> bool:
        """Train the stage's remaining steps; True when stop_after ended the run here."""
        recipe, spec, stage, d, run_dir, log = self.recipe, self.spec, self.stage, self.dist, self.run_dir, self.log
        full = stage == "think" and recipe.think.method == "full"
        tte, engine = self.build()
        local, micro, _ = stage_shape(recipe, stage, d.world)
        found = checkpoints(run_dir)
        last_good = found[-1][1] if found else None
        sampler = stage_sampler(recipe, stage, self.index, self.rows)
        pending = None   # saved after the last step, promoted once the next step's loss is finite

        def stop_run(what: str, step: int, s: int):
            discard(pending, d)
            where = f"the last good checkpoint is {last_good}" if last_good else "no good checkpoint was saved yet"
            raise NonFiniteLoss(
                f"{what} at step {step} ({stage} step {s + 1}); the run stopped and that state was not "
                f"kept; {where}. Lower {stage}.lr, raise {stage}.warmup_steps or check the data, "
                "then resume with --resume.")

        try:
            for s in range(self.start, spec.steps):
                step = self.step_offset + s + 1
                t0 = time.perf_counter()
                idx = sampler.batch(s)
                mine = [self.rows[i] for i in idx[d.rank * local:(d.rank + 1) * local]]
                lr = engine.lr_scheduler.get_last_lr()[0]
                loss, tokens, finite = self.backward(engine, mine, micro, step)
                loss_sum, tokens, bad = all_reduce([loss if finite else 0.0, tokens, 0.0 if finite else 1.0])
                if bad:
                    stop_run(f"non-finite loss on {int(bad)} rank(s)", step, s)
                if pending is not None:  # its weights gave this finite loss: resuming from it works
                    last_good, pending = promote(pending, run_dir, recipe.keep_checkpoints, d), None
                engine.step()  # the optimizer step (clipping, LR schedule) of the accumulated batch
                if all_reduce([0.0 if update_is_finite(engine) else 1.0])[0]:
                    stop_run("a non-finite gradient norm or weight after the update", step, s)
                dt = time.perf_counter() - t0
                norm = engine.get_global_grad_norm()
                record = {"step": step, "stage": stage, "stage_step": s + 1, "loss": loss_sum / d.world,
                          "lr": lr, "grad_norm": None if norm is None else float(norm),
                          "samples_per_s": spec.batch_size / dt, "tokens_per_s": tokens / dt,
                          "peak_memory_gb": memory_gb(d.device), "step_time_s": dt}
                self.losses.append((step, record["loss"]))
                if (s + 1) % recipe.log_every == 0 or s == 0 or s + 1 == spec.steps:
                    log.log(record)
                log.advance()
                stop = recipe.stop_after is not None and step >= recipe.stop_after
                every = recipe.checkpoint_every
                last = s + 1 == spec.steps or stop
                if (every and step % every == 0) or last:
                    pending = save_checkpoint(engine, run_dir, {"step": step, "stage": stage, "stage_step": s + 1,
                                                                "samples": (s + 1) * spec.batch_size,
                                                                "zero_stage": zero_stage(self.ds_json)}, d)
                    if last:  # no next step to vouch for it; its weights are finite (checked above)
                        last_good, pending = promote(pending, run_dir, recipe.keep_checkpoints, d), None
                if stop and s + 1 < spec.steps:
                    log.message(f"stopped after step {step} (stop_after); continue with --resume")
                    return True
            save_stage(tte, run_dir, stage, full, d)
            log.message(f"stage {stage} done: {run_dir / stage}")
            return recipe.stop_after is not None and self.step_offset + spec.steps >= recipe.stop_after \
                and stage != recipe.stages[-1]
        finally:
            engine.destroy()
            del engine, tte
            gc.collect()


# ----------------------------------------------------------------------------- command line

@command("train")
def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tte train", description="Train the unified TTE model from a YAML recipe (think SFT, "
        "embed contrastive) on DeepSpeed ZeRO. Launch with torchrun or deepspeed for many ranks.",
        epilog="Overrides use the recipe's dotted keys, e.g. embed.steps=50 think.lr=2e-4 "
               "deepspeed=recipes/deepspeed/zero3.json. See recipes/*.yaml and unified_tte/train/recipe.py.")
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in run_dir")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe (overrides applied) and exit")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(dump_yaml(absolute_paths(recipe)), end="")
        return 0
    result = train(recipe, resume=args.resume)
    for stage, values in result["losses"].items():
        if values and int(os.environ.get("RANK", "0")) == 0:
            print(f"{stage}: loss {values[0][1]:.4f} (step {values[0][0]}) -> {values[-1][1]:.4f} "
                  f"(step {values[-1][0]})")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
