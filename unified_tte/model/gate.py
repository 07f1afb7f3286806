"""The think gate: per query, before any decoding, whether a trace is worth its decode.

After the think prefill the KV cache already holds the query, so the *direct* embedding (the
query with no trace, as `embed` gives it) costs only the invocation tokens. The gate reads
query-side signals of that prefill only (a retrieval query does not know its corpus):

    features = [direct embedding (D) | think adapter's final hidden state at the last prompt
                token, unit norm (D) | log(prompt tokens)]                              [B, 2D+1]
    score    = sigmoid(w . standardise(features) + b)     P(the trace helps this query)
    think    = score > threshold

It is a logistic regression trained by the recipe's `gate` stage (train/gate.py) on rows held
out from the train split, labelled by whether the trace raised the query's rank (margin on a
tie) over its direct embedding. A fitted gate carries its operating points (`quality`: the best
held-out Hit@1; `compute`: the best within a decoded-token budget), the answer fallback's
threshold (a decoded answer whose mean token log-probability is below it uses the direct
embedding instead), and the fingerprint of the model it was fitted for: the backbone's weight
hash, the TTEConfig fields that shape embeddings, and a content hash of the think and embed
adapters. `UnifiedTTE.set_gate` refuses a gate whose fingerprint differs.

Stored as a folder: gate/gate.safetensors (weight, bias, mean, std) and gate/gate_config.json.

    gate = ThinkGate.load("runs/x/gate")
    think = gate.decide(features)                  # bool [B], at the chosen operating point
    curve = policy_curve(scores, hit_direct, hit_tte, tokens)   # the accuracy / compute frontier
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, InputError

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate_config.json"
GATE_FORMAT = "unified_tte.gate/1"
OPERATING_POINTS = ("quality", "compute")
# TTEConfig fields a gate's features and labels depend on (the policy fields themselves do not).
FINGERPRINT_FIELDS = ("mode", "embed_layers", "think", "invocation", "pooling", "lora_r", "lora_alpha",
                      "max_length", "max_pixels", "min_pixels", "max_frames", "fps", "prompt_format",
                      "system_prompt")


def gate_features(direct: torch.Tensor, think_hidden: torch.Tensor, prompt_tokens: torch.Tensor) -> torch.Tensor:
    """The gate's input per query: fp32 [B, 2D+1] from the direct embedding [B, D] (unit norm),
    the think adapter's normed final hidden state at the last prompt token [B, D] and the prompt
    length in tokens [B]."""
    hidden = F.normalize(think_hidden.float(), dim=-1)
    length = prompt_tokens.float().clamp(min=1).log().view(-1, 1).to(direct.device)
    return torch.cat([direct.float(), hidden.to(direct.device), length], dim=-1)


def adapters_sha256(states: dict[str, dict[str, torch.Tensor]]) -> str:
    """A content hash of adapter weights ({adapter: {name: tensor}}), over fp32 copies in name
    order: the same for bf16 weights held in a bf16 or an fp32 model."""
    h = hashlib.sha256()
    for adapter in sorted(states):
        h.update(adapter.encode())
        for name in sorted(states[adapter]):
            h.update(name.encode())
            h.update(states[adapter][name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(tte) -> dict:
    """What a gate is only valid for: the embedding-shaping config and the adapters' values (the
    base's weight hash and dtype are added by `UnifiedTTE.fingerprint`)."""
    from .adapters import adapter_state

    config = tte.config.to_dict()
    states = {a: adapter_state(tte.peft_model, a) for a in tte.embed_adapters}   # think (a LoRA) and embed
    return {"config": {k: config[k] for k in FINGERPRINT_FIELDS}, "adapters_sha256": adapters_sha256(states)}


@dataclass
class ThinkGate:
    """A fitted gate (see the module docstring). `info` is gate_config.json."""
    weight: torch.Tensor        # [F]
    bias: torch.Tensor          # [] (a 0-d tensor)
    mean: torch.Tensor          # [F] feature standardisation
    std: torch.Tensor           # [F]
    info: dict = field(default_factory=dict)

    @property
    def operating_point(self) -> str:
        return self.info.get("operating_point", "quality")

    def threshold(self, point: str | None = None) -> float:
        point = point or self.operating_point
        points = self.info.get("operating_points", {})
        if point not in points:
            raise InputError(f"the gate has no operating point {point!r}; it has {sorted(points)}")
        return float(points[point]["threshold"])

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """P(the trace helps) per query, fp32 [B]."""
        if features.shape[-1] != self.weight.shape[0]:
            raise InputError(f"the gate reads {self.weight.shape[0]} features per query, got "
                             f"{features.shape[-1]}: it was fitted for another model")
        w, b, mean, std = (t.to(features.device) for t in (self.weight, self.bias, self.mean, self.std))
        return torch.sigmoid(((features.float() - mean) / std) @ w + b)

    def decide(self, features: torch.Tensor, threshold: float | None = None,
               point: str | None = None) -> torch.Tensor:
        """Which queries think (bool [B]) at `threshold`, else at the operating point `point`
        (default: the gate's own)."""
        t = self.threshold(point) if threshold is None else float(threshold)
        return self.score(features) > t

    @property
    def answer_logprob_threshold(self) -> float | None:
        value = self.info.get("answer_logprob_threshold")
        return None if value is None else float(value)

    # -------------------------------------------------------------------------------- storage
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.float().contiguous(), "bias": self.bias.float().reshape(1),
                   "mean": self.mean.float().contiguous(), "std": self.std.float().contiguous()},
                  str(folder / GATE_WEIGHTS))
        (folder / GATE_CONFIG).write_text(json.dumps({"format": GATE_FORMAT, **self.info}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ThinkGate":
        """Read a gate folder (safetensors only); the caller checks it fits its model (`check`)."""
        from .checkpoint import load_safetensors, read_json

        folder = Path(folder)
        info = read_json(folder / GATE_CONFIG)
        if info.pop("format", None) != GATE_FORMAT:
            raise CheckpointError(f"{folder / GATE_CONFIG}: not a {GATE_FORMAT} file; retrain the gate "
                                  "(recipe stage `gate`)")
        tensors = load_safetensors(folder / GATE_WEIGHTS)
        missing = {"weight", "bias", "mean", "std"} - tensors.keys()
        if missing:
            raise CheckpointError(f"{folder / GATE_WEIGHTS} lacks {sorted(missing)}; retrain the gate")
        n = tensors["weight"].shape[0]
        if tensors["mean"].shape != (n,) or tensors["std"].shape != (n,) or tensors["bias"].numel() != 1:
            raise CheckpointError(f"{folder / GATE_WEIGHTS}: tensor shapes disagree; the file is altered")
        for point in info.get("operating_points", {}).values():
            if not isinstance(point, dict) or not isinstance(point.get("threshold"), (int, float)):
                raise CheckpointError(f"{folder / GATE_CONFIG}: an operating point has no numeric threshold")
        return cls(tensors["weight"], tensors["bias"].reshape(()), tensors["mean"], tensors["std"], info)

    def check(self, fingerprint: dict, where: str) -> None:
        """Refuse to serve a model the gate was not fitted for, naming what differs."""
        saved = self.info.get("fingerprint", {})
        base, want = saved.get("base_weight_hash"), fingerprint.get("base_weight_hash")
        if saved.get("base_dtype") != fingerprint.get("base_dtype"):
            # the same base in another dtype hashes differently: then its name must agree
            base, want = saved.get("base_model"), fingerprint.get("base_model")
        if base and want and base != want:
            raise CheckpointError(f"{where}: the gate was fitted on a backbone with weight hash {base[:16]}…, "
                                  f"this model's is {want[:16]}…: a gate from another backbone; retrain it "
                                  "(recipe stage `gate`) on this model")
        fitted = saved.get("config", {})
        changed = sorted(k for k, v in fingerprint.get("config", {}).items()
                         if fitted.get(k) != (list(v) if isinstance(v, tuple) else v))
        if changed:
            what = ", ".join(f"{k} was {fitted.get(k)!r}" for k in changed)
            raise CheckpointError(f"{where}: the gate was fitted for another model config ({what}); "
                                  "retrain it (recipe stage `gate`) on this model")
        if saved.get("adapters_sha256") != fingerprint.get("adapters_sha256"):
            raise CheckpointError(f"{where}: the gate was fitted for other think/embed adapter weights "
                                  "(their content hash differs); retrain it (recipe stage `gate`) after "
                                  "the embed stage it should serve")


def load_gate(src):
    """A checkpoint or run folder's fitted think gate (its gate/ folder), or None when it has
    none. An export lists the gate's files in its manifest, so a tampered gate file was already
    refused by name when the source was opened (`checkpoint.verify_checkpoint`)."""
    from .checkpoint import MANIFEST_FILE, refuse_pickles

    folder = src.folder / "gate"
    if src.kind == "checkpoint":
        listed = {f"gate/{GATE_CONFIG}", f"gate/{GATE_WEIGHTS}"} & set(src.files)
        if not listed:
            return None
        if len(listed) < 2:
            raise CheckpointError(f"{src.folder / MANIFEST_FILE} lists only {sorted(listed)} of the gate's "
                                  "two files; re-export the checkpoint")
    elif not (folder / GATE_CONFIG).is_file():
        return None
    refuse_pickles(folder)
    return ThinkGate.load(folder)


# ------------------------------------------------------------------------------ operating points
@dataclass
class PolicyPoint:
    """One decision rule on a set of queries: think where score > threshold."""
    threshold: float
    think_rate: float           # fraction of queries that decode
    accuracy: float             # mean Hit@1 (or the metric given) under the rule
    token_fraction: float       # decoded tokens, relative to thinking on every query
    tokens_per_query: float


def policy_curve(scores, metric_direct, metric_tte, tokens) -> list[PolicyPoint]:
    """The accuracy / compute frontier of a gate: every distinct threshold, from thinking on
    every query (threshold below the lowest score) to none (at the highest score). Per-query
    inputs: the gate's score, the metric with the direct and with the TTE embedding, and the
    tokens that query's decode takes."""
    scores, direct, tte, tokens = (torch.as_tensor(x, dtype=torch.float64) for x in
                                   (scores, metric_direct, metric_tte, tokens))
    n = len(scores)
    if n == 0:
        return []
    order = torch.argsort(scores, descending=True, stable=True)
    gain, spent = (tte - direct)[order], tokens[order]
    total_tokens = max(float(tokens.sum()), 1e-12)
    base = float(direct.sum())
    points = [PolicyPoint(float(scores.max()) if n else 1.0, 0.0, base / n, 0.0, 0.0)]
    gains, costs = torch.cumsum(gain, 0), torch.cumsum(spent, 0)
    sorted_scores = scores[order]
    for k in range(1, n + 1):   # the top k scores think; a threshold between score k-1 and k
        if k < n and sorted_scores[k] == sorted_scores[k - 1]:
            continue            # ties think together
        below = float(sorted_scores[k]) if k < n else float(sorted_scores[-1]) - 1.0
        threshold = (float(sorted_scores[k - 1]) + below) / 2 if k < n else below
        points.append(PolicyPoint(threshold, k / n, (base + float(gains[k - 1])) / n,
                                  float(costs[k - 1]) / total_tokens, float(costs[k - 1]) / n))
    return points


def pick_quality(curve: list[PolicyPoint]) -> PolicyPoint:
    """The best accuracy; among equals, the lowest think rate."""
    best = max(p.accuracy for p in curve)
    return min((p for p in curve if p.accuracy >= best - 1e-12), key=lambda p: p.think_rate)


def pick_compute(curve: list[PolicyPoint], token_budget: float) -> PolicyPoint:
    """The best accuracy with decoded tokens <= `token_budget` x thinking on every query."""
    if not 0.0 <= token_budget <= 1.0 or math.isnan(token_budget):
        raise InputError(f"a token budget is a fraction in [0, 1], got {token_budget}")
    fits = [p for p in curve if p.token_fraction <= token_budget + 1e-12]
    return pick_quality(fits)


def oracle(metric_direct, metric_tte, tokens) -> PolicyPoint:
    """Per query the better of direct and TTE (thinking only where it strictly helps): an upper
    bound no query-side gate can pass."""
    direct, tte, tokens = (torch.as_tensor(x, dtype=torch.float64) for x in (metric_direct, metric_tte, tokens))
    think = tte > direct
    n = max(len(direct), 1)
    return PolicyPoint(float("nan"), float(think.double().mean()) if len(direct) else 0.0,
                       float(torch.where(think, tte, direct).sum()) / n,
                       float(tokens[think].sum()) / max(float(tokens.sum()), 1e-12), float(tokens[think].sum()) / n)
