"""`tte plan`'s report: the per-GPU table of each stage's parts against the plan's limit (and the
measured peaks beside it), and, for a stage that does not fit, the knobs to turn in order.

    print(render(recipe_path, shape, lengths, setup, plans, recipe, measured))
    print("\n".join(advice(recipe, shape, lengths, setup, plans)))
"""
from __future__ import annotations

from .plan_estimate import (GIB, Lengths, Setup, Shape, StagePlan, bytes_per_element, fitting_changes,
                            usable_bytes)


def render(recipe_path: str, shape: Shape, lengths: Lengths, setup: Setup, plans: list[StagePlan],
           recipe, measured: dict | None = None) -> str:
    e = bytes_per_element(recipe, setup)
    gib = lambda b: f"{b / GIB:.2f}" if b >= GIB else f"{b / GIB:.3g}"  # noqa: E731
    where = (f"{setup.world} GPU{'s' if setup.world > 1 else ''} ({setup.nodes} node{'s' if setup.nodes > 1 else ''} x "
             f"{setup.gpus_per_node})" if setup.device == "cuda" else "this CPU, one process")
    lines = [f"tte plan {recipe_path}",
             f"model    {shape.name}: {shape.params / 1e9:.2f}B params ({shape.vision_params / 1e9:.2f}B vision), "
             f"{shape.layers} layers, hidden {shape.hidden}, {shape.heads}/{shape.kv_heads} heads of {shape.head_dim}, "
             f"vocab {shape.vocab}; {shape.source}",
             f"setup    {where}, {setup.gpu_mem_gib:g} GiB each ({gib(usable_bytes(setup))} usable), "
             f"{'bf16' if e == 2 else 'fp32'}, ZeRO-{setup.zero} ({setup.ds_name})",
             f"rows     prompt {lengths.prompt} tokens ({lengths.text} text, {lengths.images} image(s) x "
             f"{lengths.image_tokens} tokens), trace {lengths.trace}, invocation {lengths.invocation}", ""]
    for p in plans:
        lines.append(f"{p.stage}: {p.rows}")
    lines.append("")
    names = list(dict.fromkeys(k for p in plans for k in p.parts))
    stages = [p.stage for p in plans]
    head = ["per GPU, GiB"] + stages + ["how"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(stages) + "---|"]
    for name in names:
        how = next(p.notes[name] for p in plans if name in p.notes)
        lines.append("| " + " | ".join([name] + [gib(p.parts[name]) if name in p.parts else "-" for p in plans]
                                       + [how]) + " |")
    lines.append("| **total** | " + " | ".join(f"**{gib(p.total)}**" for p in plans) + " | |")
    lines.append("| fits | " + " | ".join("yes" if p.total <= usable_bytes(setup) else "NO" for p in plans)
                 + f" | within {gib(usable_bytes(setup))} GiB |")
    if measured:
        lines.append("| measured peak | " + " | ".join(gib(measured[p.stage]) if p.stage in measured else "-"
                                                    for p in plans) + " | one step on this CPU, peak RSS |")
        lines.append("| plan / measured | " + " | ".join(
            f"{p.total / measured[p.stage]:.2f}" if measured.get(p.stage) else "-" for p in plans) + " | |")
    offload = [p for p in plans if p.cpu_bytes and (setup.offload("optimizer") or setup.offload("param"))]
    for p in offload:
        lines.append(f"\n{p.stage}: host memory for offloaded states (DeepSpeed's estimate): {gib(p.cpu_bytes)} GiB per node")
    return "\n".join(lines)


def advice(recipe, shape, lengths, setup, plans: list[StagePlan]) -> list[str]:
    """For each stage that does not fit: the knobs to turn, in order, with the total after each."""
    out = []
    for p in plans:
        limit = usable_bytes(setup)
        if p.total <= limit:
            continue
        line = f"{p.stage} does not fit: {p.total / GIB:.2f} GiB > {limit / GIB:.2f} GiB usable."
        changes = fitting_changes(recipe, shape, lengths, setup, p.stage)
        if changes:
            line += " Turn " + ", then ".join(f"{label} ({total / GIB:.2f} GiB)" for label, total in changes)
            line += ": fits." if changes[-1][1] <= limit else ": still too much; use more or larger GPUs."
        else:
            line += " Use more GPUs (--gpus / --nodes) or larger ones."
        out.append(line)
    return out
