"""Stage `gate`, after embed: fit the think gate (model/gate.py) on the train rows the recipe held
out of think and embed training (`data.holdout`), never on eval rows.

    gate_report = fit_gate_stage(recipe, run_dir, held_out_rows, dtype, device)   # -> RUN_DIR/gate/

1. Every held-out query is embedded both ways from one prefill (`UnifiedTTE.embed_both`): direct,
   and after the think adapter's greedy trace. Its candidates are its positive, its hard negative
   and the positives of its task's other held-out rows with another answer (distinct contents,
   embedded once, no trace; `gate.answer_key` says what "the same answer" is where the content
   does not, e.g. two images of one digit).
2. Label: the trace helped when it raised the positive's rank (ties ranked against it), or, at
   the same rank, its margin over the best other candidate. Weight: 1 for a rank change, else
   the margin change relative to the median one (at most 1): a tie that barely moved counts little.
3. Every task weighs the same (rows are weighted by 1 / their task's size), in the fit and in the
   held-out Hit@1 the thresholds are picked on, as results average over tasks.
   A logistic regression on the standardised gate features, its L2 strength picked by K-fold
   cross-validated log-loss; thresholds are picked on the out-of-fold scores (the rows a fold's
   model never saw): `quality` (best held-out Hit@1), `compute` (best Hit@1 within
   gate.token_budget of the decoded tokens), or the recipe's target think rate / threshold.
4. The answer fallback's threshold: on the rows the default point thinks on, the answer
   log-probability below which keeping the direct embedding maximises held-out Hit@1.
5. The final gate is fitted on all held-out rows and saved with the model's fingerprint.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainError
from ..model import TTEConfig, UnifiedTTE, zoo
from ..model.gate import (GATE_CONFIG, ThinkGate, oracle, pick_compute, pick_quality, policy_curve)
from ..model.inputs import content_key
from .checkpointing import load_stage_weights
from .recipe import GateConfig, Recipe

L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


# ----------------------------------------------------------------------------- measurements
def heldout_measurements(tte: UnifiedTTE, rows: list, batch_size: int, max_new_tokens: int,
                         progress=None, answer_key: str | None = None) -> dict:
    """Per held-out row: gate features, rank / margin / hit of the direct and the TTE embedding
    among its task's held-out candidates, decoded tokens and the answer's log-probability."""
    features, direct, after, traces = [], [], [], []
    for a in range(0, len(rows), batch_size):
        both = tte.embed_both([r.qry for r in rows[a:a + batch_size]], max_new_tokens=max_new_tokens)
        features.append(both.features.cpu())
        direct.append(both.direct.cpu())
        after.append(both.tte.cpu())
        traces += both.traces
        if progress is not None:
            progress.update(len(both.traces))
    features, direct, after = torch.cat(features), torch.cat(direct), torch.cat(after)
    # Candidates of a row: its positive, its hard negative and the positives of its task's other
    # held-out rows with another answer (`answer_key`: a meta key naming what counts as the same
    # answer, e.g. the digit an image shows; default: the positive's content). Other rows'
    # negatives are left out: nothing says whether one of them shows this row's answer.
    memo: dict = {}
    answer = (lambda r: ("content", content_key(r.pos, memo))) if answer_key is None \
        else (lambda r: ("meta", repr(r.meta.get(answer_key))))
    items: dict[tuple, object] = {}
    for r in rows:
        for item in (r.pos, r.neg):
            if item is not None:
                items.setdefault(content_key(item, memo), item)
    keys = list(items)
    embedded = {}
    for a in range(0, len(keys), batch_size):
        for k, e in zip(keys[a:a + batch_size], tte.embed([items[k] for k in keys[a:a + batch_size]]).cpu()):
            embedded[k] = e
    by_task: dict[str, list] = {}
    for r in rows:
        by_task.setdefault(r.task, []).append(r)
    out = {key: [] for key in ("rank_direct", "rank_tte", "margin_direct", "margin_tte")}
    for i, r in enumerate(rows):
        mine = answer(r)
        pool = [content_key(r.pos, memo)] + ([content_key(r.neg, memo)] if r.neg is not None else [])
        pool += [content_key(s.pos, memo) for s in by_task[r.task] if answer(s) != mine]
        pool = list(dict.fromkeys(pool))           # each content once; the positive first
        matrix = torch.stack([embedded[k] for k in pool])
        positive = 0
        for name, query in (("direct", direct[i]), ("tte", after[i])):
            sims = matrix @ query
            others = torch.cat([sims[:positive], sims[positive + 1:]])
            if len(others) == 0:
                raise TrainError(f"gate: task {r.task!r} has one distinct held-out candidate; hold out more "
                                 "rows (data.holdout) or add hard negatives")
            out[f"rank_{name}"].append(1 + int((others >= sims[positive]).sum()))
            out[f"margin_{name}"].append(float(sims[positive] - others.max()))
    out = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    out.update(features=features.double().numpy(), tasks=[r.task for r in rows],
               hit_direct=(out["rank_direct"] == 1).astype(np.float64),
               hit_tte=(out["rank_tte"] == 1).astype(np.float64),
               tokens=np.asarray([len(t.token_ids) + int(t.finished) for t in traces], dtype=np.float64),
               answer_logprob=np.asarray([t.answer_logprob for t in traces], dtype=np.float64),
               traces=[t.text for t in traces])
    return out


def task_weights(tasks) -> np.ndarray:
    """Per row, the weight that makes a mean over rows the mean over tasks (as results average):
    a task with many held-out rows (a comparison has one per pair) counts as much as a small one."""
    tasks = np.asarray(tasks)
    names, counts = np.unique(tasks, return_counts=True)
    size = dict(zip(names, counts))
    return np.asarray([len(tasks) / (size[t] * len(names)) for t in tasks], dtype=np.float64)


def labels(m: dict) -> tuple[np.ndarray, np.ndarray]:
    """(1 where the trace helped, the weight of each row) - see the module docstring, step 2."""
    rank_gain = m["rank_direct"] - m["rank_tte"]
    margin_gain = m["margin_tte"] - m["margin_direct"]
    y = np.where(rank_gain != 0, rank_gain > 0, margin_gain > 0).astype(np.float64)
    scale = np.median(np.abs(margin_gain)) + 1e-12
    w = np.where(rank_gain != 0, 1.0, np.minimum(1.0, np.abs(margin_gain) / scale))
    return y, np.maximum(w, 1e-3)


# ----------------------------------------------------------------------------- fitting
def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> tuple:
    """Weighted logistic regression on standardised features, L2 on the weights (not the bias),
    by L-BFGS in float64 from zero: deterministic. Returns (weight, bias, mean, std) tensors."""
    x = torch.as_tensor(x, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    if len(set(np.asarray(y).tolist())) < 2:   # one outcome only: a constant gate (0.99 or 0.01)
        bias = torch.tensor(4.6 if float(np.asarray(y)[0]) > 0.5 else -4.6)
        return torch.zeros(x.shape[1]), bias, mean.float(), std.float()
    z = (x - mean) / std
    yt, wt = torch.as_tensor(y, dtype=torch.float64), torch.as_tensor(w, dtype=torch.float64)
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, yt,
                                                                          reduction="none")).sum() / wt.sum()
        loss = loss + 0.5 * l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().float(), bias.detach().float(), mean.float(), std.float()


def _score(params, x: np.ndarray) -> np.ndarray:
    weight, bias, mean, std = (p.double() for p in params)
    return torch.sigmoid(((torch.as_tensor(x) - mean) / std) @ weight + bias).numpy()


def cross_fit(x, y, w, folds: int, seed: int) -> tuple[np.ndarray, float]:
    """Out-of-fold scores under the L2 strength with the best cross-validated weighted log-loss;
    returns (scores, l2)."""
    n = len(y)
    fold = np.empty(n, dtype=int)
    fold[np.random.default_rng([seed, 13]).permutation(n)] = np.arange(n) % folds
    best = None
    for l2 in L2_GRID:
        scores = np.empty(n)
        for k in range(folds):
            train = fold != k
            scores[~train] = _score(fit_logistic(x[train], y[train], w[train], l2), x[~train])
        p = np.clip(scores, 1e-6, 1 - 1e-6)
        loss = float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())
        if best is None or loss < best[0] - 1e-12:
            best = (loss, l2, scores)
    return best[2], best[1]


def _point(p, **extra) -> dict:
    return {"threshold": float(p.threshold), "think_rate": p.think_rate, "hit@1": p.accuracy,
            "token_fraction": p.token_fraction, "tokens_per_query": p.tokens_per_query, **extra}


def fallback_threshold(think: np.ndarray, logprob: np.ndarray, hit_direct, hit_tte) -> float | None:
    """The answer log-probability below which a thinking row keeps its direct embedding, chosen to
    maximise held-out Hit@1 (None: falling back never helps there)."""
    base = np.where(think, hit_tte, hit_direct)
    best_gain, best = 0.0, None
    for t in np.unique(logprob[think & np.isfinite(logprob)]):
        switched = think & (logprob < t)
        gain = float((hit_direct[switched] - base[switched]).sum())
        if gain > best_gain + 1e-12:
            best_gain, best = gain, float(t)
    return best


def fit_gate(m: dict, g: GateConfig, seed: int) -> tuple[ThinkGate, dict]:
    """The gate, its operating points and a held-out summary, from `heldout_measurements`."""
    x = m["features"]
    y, w = labels(m)
    balance = task_weights(m["tasks"])
    w = w * balance
    n = len(y)
    if n < 2 * g.folds:
        raise TrainError(f"gate: {n} held-out rows; the gate needs at least {2 * g.folds} (2 x gate.folds): "
                         "raise data.holdout or gate.max_rows, or lower gate.folds")
    if len(set(y.tolist())) < 2:
        warnings.warn(f"gate: on all {n} held-out rows the trace {'helped' if y[0] else 'did not help'}; "
                      "the gate is constant (it thinks on every query or on none)")
    oof, l2 = cross_fit(x, y, w, g.folds, seed)
    hd, ht, tokens = m["hit_direct"] * balance, m["hit_tte"] * balance, m["tokens"]   # task-averaged Hit@1
    curve = policy_curve(oof, hd, ht, tokens)
    points = {"quality": _point(pick_quality(curve)), "compute": _point(pick_compute(curve, g.token_budget),
                                                                        token_budget=g.token_budget)}
    default = g.operating_point
    custom = None
    if g.target_think_rate is not None:
        custom = min(curve, key=lambda p: (abs(p.think_rate - g.target_think_rate), p.think_rate))
    elif g.threshold is not None:
        think = oof > g.threshold
        custom = next((p for p in curve if abs(p.think_rate - think.mean()) < 1e-12), None)
        custom = custom if custom is not None else curve[0]
    if custom is not None:
        points["custom"] = _point(custom, requested={"target_think_rate": g.target_think_rate,
                                                     "threshold": g.threshold})
        if g.threshold is not None:
            points["custom"]["threshold"] = float(g.threshold)
        default = "custom"
    think = oof > points[default]["threshold"]
    fallback = fallback_threshold(think, m["answer_logprob"], hd, ht)
    best = oracle(hd, ht, tokens)
    params = fit_logistic(x, y, w, l2)
    summary = {
        "rows": n, "trace_helped": int(y.sum()), "l2": l2, "folds": g.folds,
        "never": {"hit@1": float(hd.mean()), "think_rate": 0.0},
        "always": {"hit@1": float(ht.mean()), "think_rate": 1.0, "tokens_per_query": float(tokens.mean())},
        "oracle": {"hit@1": best.accuracy, "think_rate": best.think_rate, "token_fraction": best.token_fraction},
        "curve": [{"threshold": p.threshold, "think_rate": p.think_rate, "hit@1": p.accuracy,
                   "token_fraction": p.token_fraction} for p in curve],
        "per_task": _per_task(m, oof, points),
    }
    info = {"operating_point": default, "operating_points": points,
            "answer_logprob_threshold": fallback, "features": "direct embedding, think hidden state, log prompt length",
            "label": "the trace raised the positive's rank (margin on a tie) among the task's held-out candidates",
            "heldout": {k: v for k, v in summary.items() if k != "curve"}}
    return ThinkGate(*params, info=info), summary


def _per_task(m: dict, scores: np.ndarray, points: dict) -> dict:
    tasks = np.asarray(m["tasks"])
    out = {}
    for task in sorted(set(m["tasks"])):
        sel = tasks == task
        row = {"rows": int(sel.sum()), "never": float(m["hit_direct"][sel].mean()),
               "always": float(m["hit_tte"][sel].mean())}
        for name, point in points.items():
            think = scores[sel] > point["threshold"]
            row[name] = float(np.where(think, m["hit_tte"][sel], m["hit_direct"][sel]).mean())
            row[f"{name}_think_rate"] = float(think.mean())
        out[task] = row
    return out


# ----------------------------------------------------------------------------- the stage
def gate_model(recipe: Recipe, run_dir: Path, dtype: torch.dtype) -> UnifiedTTE:
    """The run's model as the embed stage left it: think (this run's or think_adapter) + embed."""
    tte = UnifiedTTE(zoo.load(recipe.backbone, dtype=dtype), TTEConfig(**recipe.model.to_dict()))
    if recipe.think.method == "full" and "think" in recipe.stages:
        load_stage_weights(tte, run_dir / "think", "think", full=True)
    elif recipe.model.think == "lora":
        load_stage_weights(tte, run_dir / "think" if "think" in recipe.stages else Path(recipe.think_adapter), "think")
    load_stage_weights(tte, run_dir / "embed", "embed")
    return tte.eval()


def fit_gate_stage(recipe: Recipe, run_dir: Path, rows: list, dtype: torch.dtype, device: torch.device,
                   progress=None, message=print) -> dict:
    """Fit and save RUN_DIR/gate (written to a temporary folder, then renamed into place);
    returns the held-out summary (also in gate/gate_config.json and gate/heldout.json)."""
    g = recipe.gate
    if g.max_rows is not None and len(rows) > g.max_rows:
        order = np.random.default_rng([recipe.seed, 17]).permutation(len(rows))[:g.max_rows]
        rows = [rows[i] for i in sorted(order)]
    tte = gate_model(recipe, run_dir, dtype).to(device)
    if g.answer_key is not None:
        missing = [r.id for r in rows if g.answer_key not in r.meta]
        if missing:
            raise TrainError(f"gate.answer_key={g.answer_key!r}: {len(missing)} held-out rows have no such meta key "
                             f"(first: {missing[:3]}); name a key every row has, or leave it null")
    measured = heldout_measurements(tte, rows, g.batch_size, g.max_new_tokens, answer_key=g.answer_key)
    gate, summary = fit_gate(measured, g, recipe.seed)
    gate.info["fingerprint"] = tte.fingerprint()
    final, tmp = run_dir / "gate", run_dir / "gate.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    gate.save(tmp)
    (tmp / "heldout.json").write_text(json.dumps(
        {**summary, "rows": [{"task": t, "rank_direct": int(a), "rank_tte": int(b), "tokens": int(c),
                              "answer_logprob": None if not math.isfinite(d) else float(d), "trace": tr}
                             for t, a, b, c, d, tr in zip(measured["tasks"], measured["rank_direct"],
                                                          measured["rank_tte"], measured["tokens"],
                                                          measured["answer_logprob"], measured["traces"])]},
        indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    points = gate.info["operating_points"]
    message(f"stage gate done: {final} ({summary['rows']} held-out rows; Hit@1 never "
            f"{summary['never']['hit@1']:.3f}, always {summary['always']['hit@1']:.3f}, quality "
            f"{points['quality']['hit@1']:.3f} at think rate {points['quality']['think_rate']:.2f}, compute "
            f"{points['compute']['hit@1']:.3f} at {points['compute']['think_rate']:.2f})")
    return summary
