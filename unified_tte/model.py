"""UnifiedTTE: one backbone, a `think` LoRA and an `embed` LoRA, and the forward path.

The whole forward-path contract of DESIGN.md lives in this file:

    sequence  = [prompt: chat template, images, text] [trace] [end-of-turn] [invocation]
    embedding = L2-normalised final hidden state at the last invocation token (or their mean)

    mode="activated": positions before the invocation see base+T; from it on base+T+E, every layer.
    mode="top_k":     layers [0, L-K) see base+T everywhere; layers [L-K, L) see base+T+E everywhere.

Fast path (`think`, `embed`, `think_then_embed`): prefill + decode with T, keep the KV cache (and in
top_k the residual entering layer L-K); then run only the invocation tokens against the cache
(activated), or the invocation through the lower layers and the top K layers over the cached
residuals (top_k). Plain twin (`embed_recompute`): one full Hugging Face forward of the whole
sequence under the recompute semantics. Tests hold the two equal.

    from unified_tte import UnifiedTTE, TTEInput
    from unified_tte.testing import tiny_qwen2vl
    tte = UnifiedTTE(tiny_qwen2vl(), mode="activated")
    emb, traces = tte.think_then_embed([TTEInput("Which digit?", images=[img])], max_new_tokens=32)
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, DecoderStack
from .inputs import EncodedPrompt, PromptEncoder, Trace, TTEInput, left_pad, stack_images

LORA_TARGETS = r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


@dataclass
class TTEConfig:
    """How the unified model is wired; saved as tte_config.json on export."""
    mode: Literal["activated", "top_k"] = "activated"
    embed_layers: int | None = None          # K for top_k; default L // 4
    think: Literal["lora", "none"] = "lora"   # "none": the backbone itself is the reasoner
    invocation: tuple[str, ...] = ("<|embed|>",)
    pooling: Literal["last", "mean"] = "last"
    lora_r: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    max_length: int | None = None            # default: the backbone's max_position_embeddings
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("activated", "top_k"):
            raise ValueError(f"mode must be 'activated' or 'top_k', got {self.mode!r}")
        if self.think not in ("lora", "none"):
            raise ValueError(f"think must be 'lora' or 'none', got {self.think!r}")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")
        if isinstance(self.invocation, str):
            self.invocation = (self.invocation,)
        self.invocation = tuple(self.invocation)
        if not self.invocation:
            raise ValueError("invocation needs at least one token, e.g. ('<|embed|>',)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["invocation"] = list(self.invocation)
        return d


@dataclass
class ThinkState:
    """What the embed step reuses after decoding: the KV cache and where each row stands."""
    cache: object
    attention_mask: torch.Tensor          # [B, T] 0/1 over everything in the cache
    positions: list                       # per fed chunk: [B, t] or [3, B, t]
    delta: torch.Tensor                   # [B]: text position = real-token index + delta
    real_len: torch.Tensor                # [B]: real tokens fed so far per row
    pending: list[list[int]]              # per row: tokens decided but not yet fed (trace end + EOS)
    residuals: list | None = None         # top_k: residual entering layer L-K per fed chunk


@dataclass
class ThinkOutput:
    traces: list[Trace]
    state: ThinkState
    prompts: list[EncodedPrompt] = field(repr=False, default_factory=list)


class _Gate:
    """Per-position switch for the embed adapter: a [B, t, 1] tensor multiplied into its LoRA output."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def hook(self, module, args, output):
        return output if self.value is None else output * self.value.to(output.dtype)


def add_invocation_tokens(backbone: Backbone, tokens: Sequence[str]) -> list[int]:
    """Add the invocation tokens to the backbone's tokenizer; new embedding rows start at the mean
    row. Idempotent: tokens already present keep their rows. Returns their ids.

    The mean row is deterministic (so the base weight hash is reproducible: export pins it) and
    sits inside the distribution the model has seen, unlike a random row."""
    tok = backbone.tokenizer
    before = len(tok)
    tok.add_tokens(list(tokens), special_tokens=True)
    ids = tok.convert_tokens_to_ids(list(tokens))
    new_ids = [i for i in ids if i >= before]
    model = backbone.model
    emb = model.get_input_embeddings()
    if max(ids) >= emb.weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = model.get_input_embeddings()
    if new_ids:
        with torch.no_grad():
            emb.weight[new_ids] = emb.weight[:before].mean(0, keepdim=True)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
                out.weight[new_ids] = out.weight[:before].mean(0, keepdim=True)
    return ids


class UnifiedTTE(nn.Module):
    """One backbone with a `think` and an `embed` adapter (see the module docstring)."""

    def __init__(self, backbone: Backbone, config: TTEConfig | None = None, **overrides):
        super().__init__()
        self.config = config or TTEConfig(**overrides)
        if config is not None and overrides:
            self.config = TTEConfig(**{**config.to_dict(), **overrides})
        cfg = self.config
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        hf_model = backbone.model
        self.stack = DecoderStack(hf_model)
        L = self.stack.num_layers
        if cfg.mode == "top_k":
            if cfg.embed_layers is None:
                cfg.embed_layers = max(1, L // 4)
            if not 1 <= cfg.embed_layers <= L:
                raise ValueError(f"embed_layers must be in [1, {L}] for this {L}-layer backbone, "
                                 f"got {cfg.embed_layers}")
        self.invocation_ids = add_invocation_tokens(backbone, cfg.invocation)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        gen_eos = getattr(hf_model.generation_config, "eos_token_id", None)
        gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        self.stop_ids = {self.eos_id, *gen_eos}  # decoding stops at any of these
        max_pos = getattr(self.stack.config, "max_position_embeddings", 4096)
        self.encoder = PromptEncoder(self.tokenizer, backbone.image_processor,
                                     max_length=cfg.max_length or max_pos)

        for p in hf_model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        all_layers = r"\d+"
        top_layers = "|".join(str(i) for i in range(L - (cfg.embed_layers or 0), L))
        embed_layers = all_layers if cfg.mode == "activated" else f"(?:{top_layers})"
        with warnings.catch_warnings():
            # PEFT calls a transformers helper that transformers 5 deprecates; not actionable here.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self.peft_model = self._wrap(hf_model, cfg, all_layers, embed_layers)
        self.think_adapters = ["think"] if cfg.think == "lora" else []
        self.embed_adapters = self.think_adapters + ["embed"]

        from peft.tuners.lora import LoraLayer
        self._lora_layers = [m for m in self.peft_model.modules() if isinstance(m, LoraLayer)]
        self._gate = _Gate()
        for layer in self._lora_layers:
            if "embed" in layer.lora_B:
                layer.lora_B["embed"].register_forward_hook(self._gate.hook)
        self._set_active(self.think_adapters)
        self.set_trainable(None)

    @classmethod
    def separate_embedder(cls, backbone: Backbone, **overrides) -> "UnifiedTTE":
        """The two-model baseline's embedder: its own backbone copy with one LoRA over every layer
        and every position (VLM2Vec style), re-encoding query + trace. Expressed as top_k with
        K = L and no think adapter, so it runs through the same forward path."""
        L = DecoderStack(backbone.model).num_layers
        return cls(backbone, **{**overrides, "think": "none", "mode": "top_k", "embed_layers": L})

    @classmethod
    def from_checkpoint(cls, path, backbone: Backbone | None = None, **kwargs) -> "UnifiedTTE":
        """Load an exported checkpoint (see unified_tte.export): verifies every file's sha256 and
        the base model's weight hash; `backbone` defaults to the one the checkpoint names."""
        from .export import load_checkpoint
        return load_checkpoint(path, backbone=backbone, **kwargs)

    @staticmethod
    def _wrap(hf_model, cfg: TTEConfig, all_layers: str, embed_layers: str):
        from peft import LoraConfig, get_peft_model

        embed_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=rf".*\.layers\.{embed_layers}\.{LORA_TARGETS}")
        if cfg.think == "none":
            return get_peft_model(hf_model, embed_cfg, adapter_name="embed")
        think_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=rf".*\.layers\.{all_layers}\.{LORA_TARGETS}")
        peft_model = get_peft_model(hf_model, think_cfg, adapter_name="think")
        peft_model.add_adapter("embed", embed_cfg)
        return peft_model

    # ------------------------------------------------------------------ setup helpers

    def _set_active(self, names: list[str]) -> None:
        # Set the flag directly: PEFT's set_adapter also flips requires_grad, which training owns.
        for layer in self._lora_layers:
            layer._active_adapter = list(names)

    @contextlib.contextmanager
    def _adapters(self, names: list[str], gate: torch.Tensor | None = None):
        self._set_active(names)
        self._gate.value = gate
        try:
            yield
        finally:
            self._gate.value = None
            self._set_active(self.think_adapters)

    def set_trainable(self, stage: Literal["think", "embed"] | None) -> list[nn.Parameter]:
        """Make exactly one adapter trainable (or none) and return its parameters."""
        params = []
        for name, p in self.peft_model.named_parameters():
            train = stage is not None and "lora_" in name and f".{stage}." in name
            p.requires_grad_(train)
            if train:
                params.append(p)
        return params

    def adapter_params(self, adapter: str) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.peft_model.named_parameters() if "lora_" in n and f".{adapter}." in n}

    @property
    def device(self) -> torch.device:
        return self.stack.device

    @property
    def num_layers(self) -> int:
        return self.stack.num_layers

    @property
    def split_layer(self) -> int:
        """First layer that sees the embed adapter in top_k (L - K); L in activated mode."""
        return self.num_layers - self.config.embed_layers if self.config.mode == "top_k" else self.num_layers

    # ------------------------------------------------------------------ token helpers
    def trace_ids(self, trace: str | Trace | None) -> list[int]:
        if trace is None:
            return []
        if isinstance(trace, Trace):
            return list(trace.token_ids)
        return self.tokenizer(trace, add_special_tokens=False)["input_ids"]

    def _tails(self, n: int, traces) -> list[list[int]]:
        """Token ids after the prompt and before the invocation: trace + end-of-turn, or nothing."""
        if traces is None:
            return [[] for _ in range(n)]
        if len(traces) != n:
            raise ValueError(f"got {len(traces)} traces for {n} inputs; pass one trace per input "
                             "(None for the whole batch embeds without traces)")
        return [self.trace_ids(t) + [self.eos_id] for t in traces]

    def _to_device(self, *tensors):
        return [t.to(self.device) if t is not None else None for t in tensors]

    # ------------------------------------------------------------------ fast path
    def _prefill(self, prompts: list[EncodedPrompt], tails: list[list[int]], stop: int) -> tuple:
        """Run prompt + tail through layers [0, stop) into a fresh cache (adapters as set by caller)."""
        ids, mask = left_pad([p.ids + t for p, t in zip(prompts, tails)], self.pad_id)
        pixel_values, grid = stack_images(prompts)
        ids, mask, pixel_values, grid = self._to_device(ids, mask, pixel_values, grid)
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.stack.dtype)
        positions, delta = self.stack.prompt_positions(ids, mask, grid)
        hidden = self.stack.embed_inputs(ids, pixel_values, grid)
        cache = self.stack.new_cache()
        capture = self.split_layer if self.config.mode == "top_k" else None
        hidden, residual = self.stack.run_layers(hidden, mask, positions, cache, 0, stop, capture_at=capture)
        state = ThinkState(cache=cache, attention_mask=mask, positions=[positions], delta=delta,
                           real_len=mask.sum(1), pending=[[] for _ in prompts],
                           residuals=[residual] if capture is not None else None)
        return hidden, state

    def _feed(self, state: ThinkState, chunks: list[list[int]], stop: int):
        """Append left-padded token chunks to the state's cache through layers [0, stop)."""
        ids, chunk_mask = left_pad(chunks, self.pad_id)
        ids, chunk_mask = self._to_device(ids, chunk_mask)
        real_index = state.real_len.view(-1, 1) + chunk_mask.cumsum(1) - 1
        positions = self.stack.text_positions(real_index.clamp(min=0), state.delta)
        state.attention_mask = torch.cat([state.attention_mask, chunk_mask], 1)
        capture = self.split_layer if self.config.mode == "top_k" else None
        hidden, residual = self.stack.run_layers(self.stack.embed_inputs(ids), state.attention_mask,
                                                 positions, state.cache, 0, stop, capture_at=capture)
        state.positions.append(positions)
        state.real_len = state.real_len + chunk_mask.sum(1)
        if capture is not None:
            state.residuals.append(residual)
        return hidden

    def _next_tokens(self, hidden_last, do_sample, temperature, top_p, generator):
        logits = self.stack.lm_head(self.stack.norm(hidden_last)).float()
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / max(temperature, 1e-5), -1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def think(self, inputs: Sequence[TTEInput], max_new_tokens: int = 128, do_sample: bool = False,
              temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> ThinkOutput:
        """Decode a trace per input, as one left-padded batch, with the think adapter.

        Stops a row at the end-of-turn token. Returns the traces and the state (cache, positions,
        residuals) that `embed_from_state` reuses; the state is consumed by that call.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        prompts = self.encoder.encode(inputs, reserve=max_new_tokens + 1 + len(self.invocation_ids))
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._adapters(self.think_adapters):
            hidden, state = self._prefill(prompts, [[] for _ in prompts], self.num_layers)
            batch = len(prompts)
            traces = [[] for _ in range(batch)]
            finished = [False] * batch
            last = hidden[:, -1]
            for step in range(max_new_tokens):
                tokens = self._next_tokens(last, do_sample, temperature, top_p, generator).tolist()
                for row in range(batch):
                    if finished[row]:
                        continue
                    if tokens[row] in self.stop_ids:
                        # Any stop id closes the turn with the canonical end-of-turn token, the
                        # same token `embed` appends after a given trace.
                        finished[row] = True
                        state.pending[row] = [self.eos_id]
                    else:
                        traces[row].append(tokens[row])
                        state.pending[row] = [tokens[row]]
                if all(finished) or step == max_new_tokens - 1:
                    break
                # Rows that already stopped feed nothing: left_pad gives them a masked pad.
                fed = self._feed(state, [p[:1] for p in state.pending], self.num_layers)
                state.pending = [[] for _ in range(batch)]
                last = fed[:, -1]
        for row in range(batch):
            if not finished[row]:  # hit max_new_tokens: the last token is pending; close the turn
                state.pending[row] = state.pending[row] + [self.eos_id]
        out = [Trace(self.tokenizer.decode(ids, skip_special_tokens=True), ids, finished[r])
               for r, ids in enumerate(traces)]
        return ThinkOutput(out, state, prompts)

    def embed_from_state(self, state: ThinkState) -> torch.Tensor:
        """The embed step of the fast path: invocation tokens against the cache. Grad flows only
        through what the embed adapter touches, so a no-grad prefix costs no activation memory."""
        n_inv = len(self.invocation_ids)
        chunks = [p + self.invocation_ids for p in state.pending]
        state.pending = [[] for _ in chunks]
        if self.config.mode == "activated":
            width = max(len(c) for c in chunks)
            gate = torch.zeros(len(chunks), width, 1, device=self.device)
            gate[:, width - n_inv:] = 1.0  # E only from the invocation on; pending trace tokens see T
            with self._adapters(self.embed_adapters, gate):
                hidden = self._feed(state, chunks, self.num_layers)
        else:
            with self._adapters(self.think_adapters):
                self._feed(state, chunks, self.split_layer)
            residual = torch.cat(state.residuals, 1)
            positions = torch.cat(state.positions, -1)
            with self._adapters(self.embed_adapters):
                hidden, _ = self.stack.run_layers(residual, state.attention_mask, positions, None,
                                                  self.split_layer, self.num_layers)
        return self._pool(self.stack.norm(hidden), n_inv)

    @torch.no_grad()
    def embed(self, inputs: Sequence[TTEInput], traces: Sequence[str | Trace] | None = None) -> torch.Tensor:
        """Embed without decoding: candidates (no trace) or queries with given traces. fp32 [B, D]."""
        return self.embed_with_grad(inputs, traces)

    def embed_with_grad(self, inputs, traces=None, prompts: list[EncodedPrompt] | None = None):
        """`embed` without the no_grad guard: training calls this, so it trains what is served.
        The prefix runs without grad (base and think are frozen); only the embed step keeps it."""
        return self.embed_from_state(self.prefix_state(inputs, traces, prompts))

    @torch.no_grad()
    def prefix_state(self, inputs, traces=None, prompts: list[EncodedPrompt] | None = None) -> ThinkState:
        """The first half of `embed`: prompt + trace + end-of-turn through the layers below the
        embed adapter's reach, under the frozen think adapter, without grad. GradCache keeps
        these states so its pass with grad runs only `embed_from_state`."""
        tails = self._tails(len(inputs), traces)
        if prompts is None:
            prompts = self.encoder.encode(inputs, reserve=[len(t) + len(self.invocation_ids) for t in tails])
        with self._adapters(self.think_adapters):
            return self._prefill(prompts, tails, self.split_layer)[1]

    @torch.no_grad()
    def think_then_embed(self, inputs: Sequence[TTEInput], max_new_tokens: int = 128,
                         **sampling) -> tuple[torch.Tensor, list[Trace]]:
        """The single fast path: decode with think, then embed reusing the cache. fp32 [B, D]."""
        out = self.think(inputs, max_new_tokens=max_new_tokens, **sampling)
        return self.embed_from_state(out.state), out.traces

    # ------------------------------------------------------------------ think SFT
    def sft_loss(self, inputs: Sequence[TTEInput], traces: Sequence[str | Trace],
                 prompts: list[EncodedPrompt] | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy on the trace tokens and the closing end-of-turn token only,
        with the think adapter (the prompt is context, not target)."""
        tails = self._tails(len(inputs), traces)
        if prompts is None:
            prompts = self.encoder.encode(inputs, reserve=[len(t) for t in tails])
        ids, mask = left_pad([p.ids + t for p, t in zip(prompts, tails)], self.pad_id)
        targets, _ = left_pad([[-100] * len(p.ids) + t for p, t in zip(prompts, tails)], -100)
        ids, mask, targets = self._to_device(ids, mask, targets)
        with self._adapters(self.think_adapters):
            hidden = self._outer_forward(ids, mask, prompts)
        # Logits only where a target follows: a 150k-entry vocabulary over every prompt token
        # would dominate memory for nothing.
        predict = targets[:, 1:] != -100
        logits = self.stack.lm_head(hidden[:, :-1][predict]).float()
        return F.cross_entropy(logits, targets[:, 1:][predict])

    def _outer_forward(self, ids, mask, prompts) -> torch.Tensor:
        """The backbone's own Hugging Face forward (vision merge, M-RoPE) -> final normed hidden."""
        kwargs = {}
        if self.stack.is_vl:
            pixel_values, grid = self._to_device(*stack_images(prompts))
            kwargs = dict(pixel_values=None if pixel_values is None else pixel_values.to(self.stack.dtype),
                          image_grid_thw=grid,
                          mm_token_type_ids=(ids == self.backbone.model.config.image_token_id).int())
        return self.stack.outer(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state

    # ------------------------------------------------------------------ plain twin
    @torch.no_grad()
    def embed_recompute(self, inputs: Sequence[TTEInput], traces: Sequence[str | Trace] | None = None) -> torch.Tensor:
        """One full Hugging Face forward of prompt + trace + invocation, no cache reuse."""
        tails = self._tails(len(inputs), traces)
        n_inv = len(self.invocation_ids)
        prompts = self.encoder.encode(inputs, reserve=[len(t) + n_inv for t in tails])
        ids, mask = left_pad([p.ids + t + self.invocation_ids for p, t in zip(prompts, tails)], self.pad_id)
        ids, mask = self._to_device(ids, mask)
        gate = None
        if self.config.mode == "activated":
            gate = torch.zeros(*ids.shape, 1, device=self.device)
            gate[:, -n_inv:] = 1.0  # left padding puts every row's invocation in the last columns
        with self._adapters(self.embed_adapters, gate):
            hidden = self._outer_forward(ids, mask, prompts)
        return self._pool(hidden, n_inv)

    # ------------------------------------------------------------------ pooling
    def _pool(self, hidden: torch.Tensor, n_inv: int) -> torch.Tensor:
        """Pool the invocation tokens (always the last n_inv columns) and L2-normalise, fp32."""
        from tte_kernels import pool  # fused gather/mean + L2 norm (Triton on CUDA)
        batch, width = hidden.shape[:2]
        if self.config.pooling == "last":
            positions = torch.full((batch,), width - 1, dtype=torch.long, device=hidden.device)
            return pool(hidden, positions=positions)
        mask = torch.zeros(batch, width, dtype=torch.bool, device=hidden.device)
        mask[:, width - n_inv:] = True
        return pool(hidden, mask=mask)

