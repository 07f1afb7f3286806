"""The `think` and `embed` LoRA adapters on one backbone: the only module that touches PEFT's
internals (the active-adapter flag of each LoRA layer, a forward hook on `lora_B`, state dicts).

    from unified_tte.model.adapters import AdapterSwitch, wrap
    peft_model = wrap(hf_model, config, num_layers)              # think LoRA (all layers) + embed LoRA
    switch = AdapterSwitch(peft_model, think_adapters=["think"])
    with switch.use(["think", "embed"], gate=gate):              # gate: [B, t, 1], E only where 1
        ...

Why touch internals: PEFT's `set_adapter` also flips `requires_grad`, which training owns, and
it has no per-position switch. Setting each layer's `_active_adapter` list and multiplying the
embed adapter's `lora_B` output by a 0/1 gate gives exactly the recompute semantics of the
forward path (activated: E from the invocation on; top_k: E on the top K layers). That only
holds for plain LoRA layers that are not merged, so anything else (DoRA, a merged adapter,
another LoRA variant) is refused. Checked against the PEFT versions in PEFT_VERSIONS_CHECKED
(tests/test_adapters.py pins them).

The embed step's own path, `switch.fused(names, tail=n)`: PEFT runs each active adapter as its
own chain of module calls (dropout, A, B, scale, add) and the gate as one more hook, which at
decode-sized inputs costs more than the matmuls. `fused` runs every LoRA layer's active adapters
as one low-rank product, base(x) + ((x A^T) * mask) B^T with A the adapters' A stacked and B
their scaled B side by side, and with `tail` the embed adapter's columns of the mask are 1 only
on the last n columns (the invocation). Same semantics as `use(names, gate)`; held equal to it
through embed == embed_recompute (tests/test_forward_path.py, tests/test_embed_step.py).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedBackbone

# The projection layers both adapters target, in every decoder layer of Llama/Qwen-family models.
LORA_TARGETS = r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
# PEFT releases whose LoRA layer internals (`_active_adapter`, `lora_B`, `merged_adapters`,
# `use_dora`) this module was checked against.
PEFT_VERSIONS_CHECKED = ("0.18", "0.19", "0.20", "0.21", "0.22")


class AdapterError(UnsupportedBackbone):
    """An adapter configuration the forward path cannot gate correctly."""


def wrap(hf_model: nn.Module, cfg, num_layers: int) -> nn.Module:
    """Inject the think LoRA (every layer; unless cfg.think == "none") and the embed LoRA
    (every layer in activated mode, the top cfg.embed_layers in top_k) into `hf_model`."""
    from peft import LoraConfig, get_peft_model

    all_layers = r"\d+"
    top = "|".join(str(i) for i in range(num_layers - (cfg.embed_layers or 0), num_layers))
    embed_layers = all_layers if cfg.mode == "activated" else f"(?:{top})"

    def lora(layers: str) -> LoraConfig:
        return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=rf".*\.layers\.{layers}\.{LORA_TARGETS}")

    with warnings.catch_warnings():
        # PEFT calls a transformers helper that transformers 5 deprecates; not actionable here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        if cfg.think == "none":
            return get_peft_model(hf_model, lora(embed_layers), adapter_name="embed")
        peft_model = get_peft_model(hf_model, lora(all_layers), adapter_name="think")
        peft_model.add_adapter("embed", lora(embed_layers))
    return peft_model


class _Gate:
    """Per-position switch for the embed adapter, multiplied into its LoRA output: a [B, t, 1]
    tensor, or an int n (1 on the last n columns of whatever comes, 0 before)."""

    def __init__(self):
        self.value: torch.Tensor | int | None = None

    def hook(self, module, args, output):
        if self.value is None:
            return output
        if isinstance(self.value, int):
            keep = torch.zeros(output.shape[-2], 1, dtype=output.dtype, device=output.device)
            keep[-self.value:] = 1
            return output * keep
        return output * self.value.to(output.dtype)


def lora_layers(peft_model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every PEFT LoRA layer (holding `adapter`, when given)."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and (adapter is None or adapter in module.lora_A):
            yield name, module


def check_gateable(peft_model: nn.Module) -> None:
    """Refuse LoRA layers the switch cannot gate per position: DoRA (its magnitude rescales the
    whole output, not only the LoRA branch), merged adapters (the delta is inside the base
    weight, so deactivating it does nothing) and layer types other than plain LoRA linears."""
    for name, layer in lora_layers(peft_model):
        if getattr(layer, "merged_adapters", []):
            raise AdapterError(f"{name}: adapter(s) {layer.merged_adapters} are merged into the base "
                               "weight; the think/embed switch cannot turn a merged adapter off. "
                               "Unmerge them (peft_model.unmerge_adapter()) or load the checkpoint "
                               "with --merge-think's own format.")
        dora = getattr(layer, "use_dora", {})
        if any(dora.values()):
            raise AdapterError(f"{name}: DoRA adapters {sorted(k for k, v in dora.items() if v)} are "
                               "not supported: DoRA rescales the whole layer output, so the embed "
                               "adapter cannot be gated per position. Use plain LoRA (use_dora=False).")
        if not isinstance(layer.lora_B, nn.ModuleDict) or not hasattr(layer, "_active_adapter"):
            raise AdapterError(f"{name}: {type(layer).__name__} is not a plain PEFT LoRA layer; "
                               f"only LoRA on linear layers is supported (checked with PEFT "
                               f"{', '.join(PEFT_VERSIONS_CHECKED)}).")
        variants = getattr(layer, "lora_variant", {})
        if variants:
            raise AdapterError(f"{name}: adapter(s) {sorted(variants)} are a PEFT LoRA variant "
                               f"({', '.join(sorted({type(v).__name__ for v in variants.values()}))}); the "
                               "think/embed switch gates plain LoRA only (an aLoRA's activation is the "
                               "switch's own job: mode='activated').")


class AdapterSwitch:
    """Which adapters are active, and the embed adapter's per-position gate."""

    def __init__(self, peft_model: nn.Module, think_adapters: list[str], embed: str = "embed"):
        check_gateable(peft_model)
        self.peft_model = peft_model
        self.think_adapters = list(think_adapters)
        self.embed_adapters = self.think_adapters + [embed]
        self.embed_name = embed
        self._layers = [layer for _, layer in lora_layers(peft_model)]
        self._fused_setups: dict[tuple, _FusedSetup] = {}   # (names, tail) -> its forwards and weights
        # Kept for as long as the switch: a CUDA graph captured through `fused` reads these tensors.
        self._masks: dict[tuple, torch.Tensor] = {}   # the tail masks, one per shape
        self.fused_path: str | None = None   # inside `fused`: "fused", or "peft" where it falls back
        self._gate = _Gate()
        for layer in self._layers:
            if embed in layer.lora_B:
                layer.lora_B[embed].register_forward_hook(self._gate.hook)
        self._set_active(self.think_adapters)

    def _set_active(self, names: list[str]) -> None:
        # Set the flag directly: PEFT's set_adapter also flips requires_grad, which training owns.
        # (Through __dict__: a plain attribute, and nn.Module.__setattr__ costs microseconds a layer.)
        for layer in self._layers:
            layer.__dict__["_active_adapter"] = list(names)

    @contextlib.contextmanager
    def use(self, names: list[str], gate: torch.Tensor | None = None):
        """Activate `names` (and the gate, [B, t, 1] over the positions of the coming forward)
        for the duration; think alone is active outside."""
        self._refuse_merged()
        self._set_active(names)
        self._gate.value = gate
        try:
            yield
        finally:
            self._gate.value = None
            self._set_active(self.think_adapters)

    @contextlib.contextmanager
    def fused(self, names: list[str], tail: int | None = None):
        """`use(names)` with each LoRA layer's active adapters run as one low-rank product (the
        module docstring); with `tail`, the embed adapter reaches only the last `tail` columns of
        the coming forward, exactly as `use(names, gate)` with the gate 1 there. Where the product
        would differ from PEFT's own forward (an adapter's dropout in train mode), this is that
        `use`, gate included."""
        self._refuse_merged()
        setup = self._fused_setups.get((tuple(names), tail))
        if setup is None:
            setup = self._fused_setups[(tuple(names), tail)] = _FusedSetup(self, names, tail)
        plain = any(_dropout_active(dropout) for dropout in setup.dropouts)
        self.fused_path = "peft" if plain else "fused"   # which forward the context runs (a graph's key)
        if plain:
            try:
                with self.use(names, gate=tail if tail is not None and self.embed_name in names else None):
                    yield
            finally:
                self.fused_path = None
            return
        self._set_active(names)
        setup.refresh()
        for layer, forward in setup.forwards:
            layer.__dict__["forward"] = forward
        try:
            yield
        finally:
            for layer, _ in setup.forwards:
                layer.__dict__.pop("forward", None)
            self._set_active(self.think_adapters)
            self.fused_path = None

    def _refuse_merged(self) -> None:
        # Cheap (one attribute per layer) and needed at every switch: a user can merge an
        # adapter at any time through PEFT's own API, after which gating it does nothing.
        for layer in self._layers:
            if layer.merged_adapters:
                check_gateable(self.peft_model)

    def remove(self, adapter: str) -> None:
        """Delete an adapter's weights (e.g. a reasoner that never embeds)."""
        self.peft_model.base_model.delete_adapter(adapter)
        self._layers = [layer for _, layer in lora_layers(self.peft_model)]
        self._fused_setups.clear()
        if adapter in self.embed_adapters:
            self.embed_adapters.remove(adapter)
        self._set_active(self.think_adapters)


def _dropout_active(dropout: nn.Module) -> bool:
    return dropout.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0) > 0


class _FusedSetup:
    """One `fused` setup (which adapters, which tail): each LoRA layer's forward, made once, and
    the stacked weights they use: A stacked ([R, in]) and the scaled B side by side ([out, R]) per
    layer. Those are checked once per context against every adapter weight of the setup (data
    pointer and in-place version, one pass over a flat list) and rebuilt when any changed; while
    a weight is trainable they are stacked afresh at every call instead (with grad where it is
    enabled): an optimizer may update a weight through `.data`, which its version does not see.
    Kept for as long as the switch: a CUDA graph captured through `fused` reads these tensors."""

    def __init__(self, switch: "AdapterSwitch", names: list[str], tail: int | None):
        self.switch, self.tail = switch, tail
        self.layers = []      # (layer, the adapters of `names` it holds)
        for layer in switch._layers:
            present = [name for name in names if name in layer.lora_A]
            if present:
                self.layers.append((layer, present))
        self.weights = [t for layer, present in self.layers for n in present
                        for t in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
        self.dropouts = [layer.lora_dropout[n] for layer, present in self.layers for n in present]
        self.stacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.key = None
        self.trainable = False
        self.forwards = [(layer, self._forward(layer, present)) for layer, present in self.layers]

    def refresh(self) -> None:
        self.trainable = any(t.requires_grad for t in self.weights)
        if self.trainable:
            return
        key = (tuple((t.data_ptr(), t._version) for t in self.weights),
               tuple(layer.scaling[n] for layer, present in self.layers for n in present))
        if key != self.key:
            with torch.no_grad():
                self.stacked = {id(layer): self._stack(layer, present) for layer, present in self.layers}
            self.key = key

    @staticmethod
    def _stack(layer: nn.Module, present: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([layer.lora_A[n].weight for n in present]),
                torch.cat([layer.lora_B[n].weight * layer.scaling[n] for n in present], 1))

    def _forward(self, layer: nn.Module, present: list[str]):
        base = layer.get_base_layer()
        plain_linear = type(base) is nn.Linear
        tail, embed, masks = self.tail, self.switch.embed_name, self.switch._masks
        # Columns of the stacked rank that belong to the gated (embed) adapter.
        gated = None
        if tail is not None and embed in present:
            start = sum(layer.r[name] for name in present[:present.index(embed)])
            gated = (start, start + layer.r[embed])

        def forward(x, *args, **kwargs):
            result = F.linear(x, base.weight, base.bias) if plain_linear and not args and not kwargs \
                else base(x, *args, **kwargs)
            if torch.compiler.is_compiling():
                # Compiled, there is no per-call overhead to save: each adapter on its own, the
                # gated one masked (nothing taken from outside the compiled graph).
                return result + _separate(layer, present, x, tail, embed).to(result.dtype)
            a, b = self._stack(layer, present) if self.trainable else self.stacked[id(layer)]
            cast = a.dtype != x.dtype
            h = F.linear(x.to(a.dtype) if cast else x, a)                # [B, t, R]
            if gated is not None:
                h = h * _tail_mask(masks, h, gated, tail)
            delta = F.linear(h, b)
            return result + (delta.to(result.dtype) if cast else delta)
        return forward


def _separate(layer: nn.Module, present: list[str], x: torch.Tensor, tail: int | None, embed: str) -> torch.Tensor:
    delta = 0
    for name in present:
        weight_a = layer.lora_A[name].weight
        part = F.linear(F.linear(x.to(weight_a.dtype), weight_a), layer.lora_B[name].weight) * layer.scaling[name]
        if tail is not None and name == embed:
            width = x.shape[-2]
            part = part * (torch.arange(width, device=x.device) >= width - tail).to(part.dtype)[:, None]
        delta = delta + part
    return delta


def _tail_mask(masks: dict, h: torch.Tensor, gated: tuple[int, int], tail: int) -> torch.Tensor:
    """[t, R]: 1, except 0 in the gated adapter's rank columns before the last `tail` positions;
    one per shape (every layer of a model has the same ranks)."""
    key = (h.shape[-2], h.shape[-1], gated, tail, h.dtype, h.device)
    mask = masks.get(key)
    if mask is None:
        mask = torch.ones(h.shape[-2], h.shape[-1], dtype=h.dtype, device=h.device)
        mask[:h.shape[-2] - tail, gated[0]:gated[1]] = 0
        masks[key] = mask
    return mask


def set_trainable(peft_model: nn.Module, adapter: str | None) -> list[nn.Parameter]:
    """Make exactly one adapter's LoRA weights trainable (or none) and return them."""
    params = []
    for name, p in peft_model.named_parameters():
        train = adapter is not None and "lora_" in name and f".{adapter}." in name
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def adapter_params(peft_model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n and f".{adapter}." in n}


def dropout_train_mode(peft_model: nn.Module, adapter: str) -> None:
    """Put only `adapter`'s LoRA dropout in train mode (everything frozen stays deterministic)."""
    for name, module in peft_model.named_modules():
        if name.endswith(f"lora_dropout.{adapter}"):
            module.train()


def adapter_state(peft_model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's weights keyed as PEFT saves them (adapter name stripped)."""
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers=False: "auto" may look the base config up on the hub.
    return get_peft_model_state_dict(peft_model, adapter_name=adapter, save_embedding_layers=False)


def load_adapter_state(peft_model: nn.Module, adapter: str, state: dict[str, torch.Tensor]) -> list[str]:
    """Load PEFT-keyed weights into `adapter`; returns the unexpected keys."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter)
    return list(getattr(result, "unexpected_keys", []))


def adapter_config(peft_model: nn.Module, adapter: str):
    return peft_model.peft_config[adapter]


def save_adapter(peft_model: nn.Module, adapter: str, folder) -> None:
    """PEFT's own folder layout (adapter_config.json + adapter_model.safetensors) in `folder`."""
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # PEFT writes a non-default adapter to <dir>/<name>/ (plus a model card in <dir>).
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter], save_embedding_layers=False)
        saved = Path(tmp) / adapter if (Path(tmp) / adapter).is_dir() else Path(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(str(saved), str(folder))


def base_name(name: str) -> str:
    """A parameter name as in the plain Hugging Face model (PEFT's wrapper prefixes removed)."""
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def merged_weights(peft_model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """W + delta for every linear `adapter` touches, keyed by the plain HF parameter name."""
    out = {}
    with torch.no_grad():
        for name, layer in lora_layers(peft_model, adapter):
            weight = layer.get_base_layer().weight
            out[base_name(f"{name}.base_layer.weight")] = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return out


def unload(peft_model: nn.Module) -> nn.Module:
    """The base model with every adapter removed (nothing merged)."""
    return peft_model.unload()


def peft_version_checked() -> bool:
    import peft

    return any(peft.__version__ == v or peft.__version__.startswith(v + ".") for v in PEFT_VERSIONS_CHECKED)



# Module paths of Qwen2-VL under transformers 4 -> 5: adapters saved against 4 (VLM2Vec's
# checkpoints) name the language model `model.layers`, 5 names it `model.language_model.layers`.
_V4_TO_V5 = (("base_model.model.model.layers.", "base_model.model.model.language_model.layers."),
             ("base_model.model.visual.", "base_model.model.model.visual."))


def merge_lora_folder(hf_model: nn.Module, folder) -> nn.Module:
    """Merge a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors, e.g. a VLM2Vec
    checkpoint) into `hf_model`'s weights and return the plain model. Keys saved under
    transformers 4's module names are mapped to 5's; a key that still matches nothing is an error."""
    import json
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..errors import CheckpointError

    folder = Path(folder)
    try:
        raw = json.loads((folder / "adapter_config.json").read_text())
        state = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: not a PEFT LoRA folder (adapter_config.json + "
                              f"adapter_model.safetensors): {exc}") from exc
    keep = {k: raw[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora") if k in raw}
    if raw.get("use_dora"):
        raise CheckpointError(f"{folder}: a DoRA adapter; only plain LoRA folders can be merged.")
    peft_model = get_peft_model(hf_model, LoraConfig(**keep), adapter_name="merge")
    names = {n for n, _ in peft_model.named_parameters()}

    def rename(key: str) -> str:
        key = key.replace(".lora_A.weight", ".lora_A.merge.weight").replace(".lora_B.weight", ".lora_B.merge.weight")
        if key not in names:
            for old, new in _V4_TO_V5:
                if key.startswith(old) and key.replace(old, new, 1) in names:
                    return key.replace(old, new, 1)
        return key

    state = {rename(k): v for k, v in state.items()}
    unknown = [k for k in state if k not in names]
    if unknown:
        raise CheckpointError(f"{folder}: {len(unknown)} adapter weight(s) match no module of this base "
                              f"model (first: {unknown[0]}); is it an adapter for another backbone?")
    set_peft_model_state_dict(peft_model, {k.replace(".merge.", "."): v for k, v in state.items()},
                              adapter_name="merge")
    return peft_model.merge_and_unload()
