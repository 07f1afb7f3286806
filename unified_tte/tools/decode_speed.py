"""Decode speed for `tte bench`: tokens/s of the think loop against Hugging Face `generate` on the
same reasoner, and against the memory-bandwidth bound of a decode step.

    pairs = [generate_times_ms(tte, inputs, new_tokens=64, device="cpu") for _ in range(3)]
    ms = generate_decode_ms(pairs)["generate_decode_ms"]
    row = add_decode_speed(row)          # decode_tok_s, generate_tok_s, decode_vs_generate, ...

Definitions (the bench's docstring states them for its table):
- decode tokens/s = B x (T - 1) / decode time: the T - 1 one-token steps after the prefill.
- generate: the reasoner (base + think LoRA) decoding exactly T tokens from the same prompts;
  its decode time is generate(T) minus generate(1) (the latter is the prefill and first token),
  medians over the repeats, each pair timed in a round of the bench's repeats.
- bound: every decode step reads every weight of the text stack once, so B x (copy bandwidth /
  weight bytes) tokens/s is the most a memory-bound step can do; copy bandwidth is bytes read +
  written per second of the best of 5 copies of a large tensor on the device.
"""
from __future__ import annotations

import statistics
import time


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def generate_s(tte, inputs, new_tokens: int, device: str) -> float:
    """Seconds of one Hugging Face `generate` of exactly `new_tokens` tokens per row on the
    reasoner (base + think LoRA), from the prompts `think` encodes."""
    import torch

    from ..model.inputs import left_pad

    prompts = tte.encoder.encode(inputs, reserve=new_tokens + 1 + len(tte.invocation_ids))
    ids, mask = (x.to(device) for x in left_pad([p.ids for p in prompts], tte.pad_id))
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), tte.switch.use(tte.think_adapters):
        out = tte.peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=tte.pad_id)
    _sync(device)
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, wanted {new_tokens}")
    return time.perf_counter() - start


def generate_times_ms(tte, inputs, new_tokens: int, device: str) -> dict:
    """One generate(T) and one generate(1), in ms; the bench times a pair in every round of its
    repeats, so generate sees the same stretches of machine load as the think loop."""
    return {"full": generate_s(tte, inputs, new_tokens, device) * 1000,
            "first": generate_s(tte, inputs, 1, device) * 1000}


def generate_decode_ms(pairs: list[dict]) -> dict:
    """{"generate_decode_ms": median generate(T) - median generate(1)} over the timed pairs."""
    full = statistics.median(p["full"] for p in pairs)
    first = statistics.median(p["first"] for p in pairs)
    return {"generate_decode_ms": full - first}


def copy_bandwidth_gb_s(device: str, mbytes: int | None = None) -> float:
    """Bytes read + written per second (GB/s) of the best of 5 copies of a large tensor."""
    import torch

    mbytes = mbytes or (1024 if device == "cuda" else 256)  # well past the caches
    src = torch.ones(mbytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def decode_weight_bytes(tte) -> int:
    """Bytes one decode step reads: the text stack, its norm and head (tied weights once) and the
    think LoRA (the embed LoRA is inactive while decoding)."""
    seen = {}
    for module in (tte.stack.lm, tte.stack.lm_head):
        for name, p in module.named_parameters():
            if "lora_" in name and ".think." not in name:
                continue
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def add_decode_speed(row: dict) -> dict:
    """Add decode_tok_s, generate_tok_s, decode_vs_generate, bandwidth_bound_tok_s and
    decode_vs_bound to a bench row (see the module docstring)."""
    steps = row["batch"] * (row["trace_len"] - 1)
    decode_s = row["decode_p50_ms"] / 1000
    row["decode_tok_s"] = steps / decode_s if steps and decode_s > 0 else None
    gen = row.get("generate_decode_ms")
    row["generate_tok_s"] = steps / (gen / 1000) if steps and gen and gen > 0 else None
    row["decode_vs_generate"] = (row["decode_tok_s"] / row["generate_tok_s"]
                                 if row["decode_tok_s"] and row["generate_tok_s"] else None)
    bound = row["batch"] * row["copy_bandwidth_gb_s"] * 1e9 / row["decode_weights_bytes"]
    row["bandwidth_bound_tok_s"] = bound
    row["decode_vs_bound"] = row["decode_tok_s"] / bound if row["decode_tok_s"] else None
    return row


def decode_note(r0: dict) -> str:
    """The line under the bench table that says what its decode columns are."""
    generate = r0.get("generate_tok_s")
    return (f"\nDecode: `loop` is the decode loop that ran (the embed step runs as that loop runs a step). "
            f"`embed / step`: the embed time in decode steps of the same row. tok/s = B x (T - 1) one-token "
            f"steps per second of decode; `vs generate`: against Hugging Face generate on the same reasoner "
            f"({'—' if not generate else f'{generate:.1f}'} tok/s in the first case); `of bound`: against "
            f"B x {r0['copy_bandwidth_gb_s']:.1f} GB/s copy bandwidth / {r0['decode_weights_bytes'] / 2**20:.0f} MB "
            "of weights read per step.\n")
