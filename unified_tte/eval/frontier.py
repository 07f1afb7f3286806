"""The accuracy-versus-compute frontier of a think gate, from the per-query data of
`evaluate_model(..., frontier=True)`: every query embedded both ways (direct, and after its
trace) with the gate's score, so any threshold can be scored without running the model again.

    tte eval RUN_DIR --tasks knowledge --think auto --frontier     # writes frontier.json, frontier.png

The accuracy is each task's primary metric (Hit@1; NDCG@5 for visdoc), averaged over tasks as
the results are; the compute is the think rate (queries that decode) and the decoded tokens.
Marked on the curve: `never` (direct embeddings only), `always` (every query thinks), the
`oracle` (per query the better of the two: an upper bound no query-side gate reaches), and the
gate's operating points, each with whether it lies on or above the straight line from never to
always (what a gate that picked queries at random would give at its think rate).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import require
from ..model.gate import oracle, policy_curve


def _weights(data: dict) -> tuple[dict, np.ndarray]:
    """Concatenated per-query arrays, and the weight that makes a mean over queries the mean over
    tasks (every task counts once, whatever its size)."""
    names = list(data)
    cat = {k: np.concatenate([np.asarray(data[t][k], dtype=np.float64) for t in names])
           for k in ("score", "tokens", "direct", "tte", "direct_hit@1", "tte_hit@1")}
    sizes = [len(data[t]["score"]) for t in names]
    weight = np.concatenate([np.full(n, sum(sizes) / (n * len(names))) for n in sizes])
    cat["task"] = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return cat, weight


def score_rule(data: dict, think_of) -> dict:
    """Per task and overall: the metric, Hit@1, think rate and decoded tokens per query of the
    decision `think_of(task data) -> bool array`."""
    tasks = {}
    for name, d in data.items():
        think = np.asarray(think_of(d), dtype=bool)
        pick = lambda a, b: np.where(think, np.asarray(b, float), np.asarray(a, float))  # noqa: E731
        tasks[name] = {d["metric"]: float(pick(d["direct"], d["tte"]).mean()),
                       "hit@1": float(pick(d["direct_hit@1"], d["tte_hit@1"]).mean()),
                       "think_rate": float(think.mean()),
                       "decoded_tokens_per_query": float((np.asarray(d["tokens"], float) * think).mean())}
    overall = {k: float(np.mean([t[k] for t in tasks.values()])) for k in ("hit@1", "think_rate", "decoded_tokens_per_query")}
    overall["metric"] = float(np.mean([t[data[n]["metric"]] for n, t in tasks.items()]))
    return {"tasks": tasks, "overall": overall}


def build_frontier(data: dict, gate=None, threshold: float | None = None) -> dict:
    """{"curve": [{threshold, think_rate, metric, token_fraction, tokens_per_query}], "never",
    "always", "oracle", "points": {name: {threshold, overall, tasks, above_line}}, "metric"}."""
    cat, weight = _weights(data)
    curve = policy_curve(cat["score"], cat["direct"] * weight, cat["tte"] * weight, cat["tokens"])
    never = score_rule(data, lambda d: np.zeros(len(d["score"]), bool))
    always = score_rule(data, lambda d: np.ones(len(d["score"]), bool))
    best = oracle(cat["direct"] * weight, cat["tte"] * weight, cat["tokens"])
    points = {}
    thresholds = dict((name, p["threshold"]) for name, p in (gate.info.get("operating_points", {}).items()
                                                             if gate is not None else []))
    if threshold is not None:
        thresholds["requested"] = float(threshold)
    low, high = never["overall"]["metric"], always["overall"]["metric"]
    for name, t in thresholds.items():
        rule = score_rule(data, lambda d, t=t: np.asarray(d["score"]) > t)
        rate = rule["overall"]["think_rate"]
        rule.update(threshold=t, line=low + (high - low) * rate,
                    above_line=bool(rule["overall"]["metric"] >= low + (high - low) * rate - 1e-12))
        points[name] = rule
    return {"metric": sorted({d["metric"] for d in data.values()}),
            "curve": [{"threshold": p.threshold, "think_rate": p.think_rate, "metric": p.accuracy,
                       "token_fraction": p.token_fraction, "tokens_per_query": p.tokens_per_query} for p in curve],
            "never": never, "always": always,
            "oracle": {"metric": best.accuracy, "think_rate": best.think_rate, "token_fraction": best.token_fraction,
                       "tasks": score_rule(data, lambda d: np.asarray(d["tte"]) > np.asarray(d["direct"]))["tasks"]},
            "points": points}


def write_frontier(frontier: dict, folder: str | Path, title: str = "") -> tuple[Path, Path]:
    """frontier.json and frontier.png (matplotlib, the [bench] extra) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path_json = folder / "frontier.json"
    path_json.write_text(json.dumps(frontier, indent=1) + "\n")
    matplotlib = require("matplotlib", "bench", "the frontier plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    curve = frontier["curve"]
    ax.plot([p["think_rate"] for p in curve], [100 * p["metric"] for p in curve], "-", color="tab:blue",
            label="gate, every threshold")
    low, high = frontier["never"]["overall"]["metric"], frontier["always"]["overall"]["metric"]
    ax.plot([0, 1], [100 * low, 100 * high], ":", color="grey", label="never to always (random choice)")
    ax.plot([0], [100 * low], "s", color="black", label=f"never {100 * low:.1f}")
    ax.plot([1], [100 * high], "D", color="black", label=f"always {100 * high:.1f}")
    o = frontier["oracle"]
    ax.plot([o["think_rate"]], [100 * o["metric"]], "*", ms=12, color="tab:red", label=f"oracle {100 * o['metric']:.1f}")
    for name, p in frontier["points"].items():
        ax.plot([p["overall"]["think_rate"]], [100 * p["overall"]["metric"]], "o", ms=8,
                label=f"{name} {100 * p['overall']['metric']:.1f} at {p['overall']['think_rate']:.2f}")
    ax.set_xlabel("think rate (fraction of queries that decode a trace)")
    ax.set_ylabel(f"{'/'.join(frontier['metric'])} (%), mean over tasks")
    ax.set_title(title or "think gate: accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # outside: never over a point
    fig.tight_layout()
    path_png = folder / "frontier.png"
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
    return path_json, path_png
