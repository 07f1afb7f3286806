"""The KV-cache engine under UnifiedTTE: prefill, feeding token chunks, sampling, the decode loop.

    engine = Engine(stack, pad_id, capture_at=L - K)     # capture_at: top_k's split layer, else None
    hidden, state = engine.prefill(prompts, tails, stop=L)
    ids, finished = engine.decode(state, hidden[:, -1], max_new_tokens=64, stop_ids={eos}, eos_id=eos)
    hidden = engine.feed(state, chunks, stop=L)          # append left-padded chunks to the cache
    engine.decode_mode = "graph"                         # auto | eager | static | compiled | graph
    hidden = engine.invocation_step(state, chunks, stop=L, tag=...)   # the embed step, state untouched

Which adapters are active is the caller's business (UnifiedTTE switches them around these calls);
the engine only runs the decoder layers of a `DecoderStack` against a growing cache. A batch is
left-padded: every row's newest token sits in the last column, so decode and the invocation step
read `hidden[:, -1]` and the pooled positions are the last columns.

Decode loops (`decode_mode`), the same tokens and the same state afterwards:
- `eager`: each step feeds one token per row through `feed` (a growing DynamicCache): the plain twin.
- `static`: the KV cache is copied once into preallocated buffers (`DecoderStack.static_cache`) and
  each step runs a fixed-shape one-token forward against them (`StaticDecoder`).
- `compiled`: `static` with the one-token step compiled by torch.compile (inductor: C++ on CPU,
  Triton on CUDA, where it is also replayed as a CUDA graph); compiled once per engine and shape
  (the first decode of a new shape pays the compilation; `torch._dynamo` may recompile once with
  a dynamic length after a second length, then not again).
- `graph`: `static` with the one-token step captured once per decode as a CUDA graph and replayed,
  which removes per-token Python and kernel-launch overhead (CUDA only).
- `auto` (default): `graph` on CUDA when the backbone runs eager or SDPA attention, else `eager`;
  should capturing the graph fail, a warning says why and this engine decodes eagerly from then on.
  (`compiled` is not auto's pick on CPU: its compilation takes longer than most CPU decodes it
  would speed up; `tte bench --decode compiled` measures both.)
With `logprobs` asked for, every loop returns them (the token choice runs outside the step).
The embed step's forward (`invocation_step`) follows the same mode: eager feeds the DynamicCache;
static / graph (and compiled on CUDA) run the fixed-shape step over static buffers kept per shape,
with `graph` replaying a CUDA graph captured once per shape and weights (`InvocationStep`);
compiled on CPU feeds the DynamicCache (measured faster there than its compiled step).
Token equality: tests/test_decode.py (eager == static == compiled, CPU) and tests/gpu/ (eager ==
graph == compiled); the invocation step: tests/test_embed_step.py.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from .backbones import DecoderStack, StaticKV, crop_cache, select_cache_rows
from .inputs import EncodedPrompt, left_pad, stack_images, stack_videos


@dataclass
class ThinkState:
    """What the embed step reuses after decoding: the KV cache and where each row stands."""
    cache: object
    attention_mask: torch.Tensor          # [B, T] 0/1 over everything in the cache
    positions: list                       # per fed chunk: [B, t] or [3, B, t] (M-RoPE)
    delta: torch.Tensor                   # [B]: text position = real-token index + delta
    real_len: torch.Tensor                # [B]: real tokens fed so far per row
    pending: list[list[int]]              # per row: tokens decided but not yet fed (trace end + EOS)
    residuals: list | None = None         # top_k: residual entering layer L-K per fed chunk

    def snapshot(self) -> tuple:
        """Everything `restore` needs to undo later feeds (the cache is cropped, not copied)."""
        return (self.cache.get_seq_length(), self.attention_mask, len(self.positions), self.real_len,
                [list(p) for p in self.pending], None if self.residuals is None else len(self.residuals))

    def restore(self, snap: tuple) -> None:
        length, self.attention_mask, n_pos, self.real_len, self.pending, n_res = snap
        crop_cache(self.cache, length)
        del self.positions[n_pos:]
        if n_res is not None:
            del self.residuals[n_res:]

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these batch rows, in place (the rows a think gate lets decode): every row
        keeps its own cache, mask, positions and residuals, so what follows runs as if the batch
        had held those rows alone (left padding may leave masked columns, which change nothing)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.attention_mask.device)
        select_cache_rows(self.cache, index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        # positions are [B, t] or, with M-RoPE, [3, B, t]: the batch is the second-to-last axis
        self.positions = [p.index_select(-2, index.to(p.device)) for p in self.positions]
        self.delta = self.delta.index_select(0, index.to(self.delta.device))
        self.real_len = self.real_len.index_select(0, index.to(self.real_len.device))
        self.pending = [list(self.pending[r]) for r in rows]
        if self.residuals is not None:
            self.residuals = [r.index_select(0, index.to(r.device)) for r in self.residuals]


DECODE_MODES = ("auto", "eager", "static", "compiled", "graph")
INVOCATION_STEPS_KEPT = 4     # static invocation steps (buffers, graphs) an engine keeps, newest first
INVOCATION_ROUND_TO = 64      # their cache length is rounded up to this, so nearby lengths share one


class Engine:
    """Runs a DecoderStack against a KV cache (see the module docstring).

    Args:
        stack: the backbone's decoder stack.
        pad_id: the token left padding uses (masked out, never attended to).
        capture_at: keep the residual stream entering this layer for every fed token (top_k's
            L - K), so the top layers can re-run over the whole sequence later; None keeps none.
        decode_mode: which decode loop runs (module docstring); settable later.
    """

    def __init__(self, stack: DecoderStack, pad_id: int, capture_at: int | None = None,
                 decode_mode: str = "auto"):
        self.stack, self.pad_id, self.capture_at = stack, pad_id, capture_at
        self.decode_mode = decode_mode
        self.last_decode_mode = None  # what the last decode actually ran (auto resolved)
        self.last_invocation_mode = None  # what the last invocation step ran
        self._graph_failed = False    # auto: a capture failed once; decode eagerly from then on
        self._compiled: dict = {}     # torch.compile of the decode / invocation step, made on first use
        self._invocation_steps: OrderedDict[tuple, InvocationStep] = OrderedDict()
        self._tensors: list | None = None   # the model's parameters and buffers (_weights_and_buffers)

    @property
    def device(self) -> torch.device:
        return self.stack.device

    def _to_device(self, *tensors):
        return [t.to(self.device) if t is not None else None for t in tensors]

    def prefill(self, prompts: Sequence[EncodedPrompt], tails: Sequence[list[int]],
                stop: int) -> tuple[torch.Tensor, ThinkState]:
        """Run prompt + tail through layers [0, stop) into a fresh cache. Returns the hidden
        states after layer stop-1 ([B, T, D]) and the state to continue from."""
        ids, mask = left_pad([p.ids + t for p, t in zip(prompts, tails)], self.pad_id)
        pixel_values, grid = stack_images(prompts)
        video_values, video_grid = stack_videos(prompts)
        ids, mask, pixel_values, grid, video_values, video_grid = self._to_device(
            ids, mask, pixel_values, grid, video_values, video_grid)
        pixel_values, video_values = (None if v is None else v.to(self.stack.dtype)
                                      for v in (pixel_values, video_values))
        positions, delta = self.stack.prompt_positions(ids, mask, grid, video_grid)
        hidden = self.stack.embed_inputs(ids, pixel_values, grid, video_values, video_grid)
        cache = self.stack.new_cache()
        hidden, residual = self.stack.run_layers(hidden, mask, positions, cache, 0, stop,
                                                 capture_at=self.capture_at)
        state = ThinkState(cache=cache, attention_mask=mask, positions=[positions], delta=delta,
                           real_len=mask.sum(1), pending=[[] for _ in prompts],
                           residuals=[residual] if self.capture_at is not None else None)
        return hidden, state

    def feed(self, state: ThinkState, chunks: Sequence[Sequence[int]], stop: int) -> torch.Tensor:
        """Append left-padded token chunks (one per row; an empty chunk is a masked pad) to the
        state's cache through layers [0, stop). Returns their hidden states [B, t, D]."""
        ids, chunk_mask, positions = self._chunk_inputs(state, chunks)
        state.attention_mask = torch.cat([state.attention_mask, chunk_mask], 1)
        hidden, residual = self.stack.run_layers(self.stack.embed_inputs(ids), state.attention_mask,
                                                 positions, state.cache, 0, stop,
                                                 capture_at=self.capture_at)
        _advance(state, chunk_mask, positions, residual)
        return hidden

    def _chunk_inputs(self, state: ThinkState, chunks):
        """Left-padded ids, their 0/1 mask and their positions (continuing each row's text)."""
        ids, chunk_mask = self._to_device(*left_pad(chunks, self.pad_id))
        real_index = state.real_len.view(-1, 1) + chunk_mask.cumsum(1) - 1
        return ids, chunk_mask, self.stack.text_positions(real_index.clamp(min=0), state.delta)


    @contextlib.contextmanager
    def preserved(self, state: ThinkState):
        """Whatever is fed inside leaves the state as it was (cache cropped back, positions,
        mask and pending tokens restored): the embed step can run on a state several times."""
        snap = state.snapshot()
        try:
            yield state
        finally:
            state.restore(snap)

    def next_tokens(self, hidden_last: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                    top_p: float = 1.0, generator: torch.Generator | None = None,
                    suppress: Sequence[int] = (), logprobs: list | None = None) -> torch.Tensor:
        """The next token of every row from the last hidden state [B, D]: greedy, or sampled
        with temperature and nucleus (top-p) filtering; `suppress`ed ids are never chosen.
        `logprobs`, a list, gets each chosen token's log-probability under the model ([B])."""
        logits = self.stack.lm_head(self.stack.norm(hidden_last)).float()
        if suppress:
            logits[:, list(suppress)] = float("-inf")
        if not do_sample:
            tokens = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / max(temperature, 1e-5), -1)
            if top_p < 1.0:
                sorted_p, order = probs.sort(-1, descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > top_p
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if logprobs is not None:
            logprobs.append(torch.log_softmax(logits, -1).gather(-1, tokens.view(-1, 1)).squeeze(-1))
        return tokens

    def decode(self, state: ThinkState, last: torch.Tensor, max_new_tokens: int, stop_ids: set[int],
               eos_id: int, min_new_tokens: int = 0, logprobs: list | None = None,
               **sampling) -> tuple[list[list[int]], list[bool]]:
        """Decode up to `max_new_tokens` per row from `last` ([B, D], the hidden state of each
        row's newest token). A row stops at any of `stop_ids`, which closes its turn with
        `eos_id`; before `min_new_tokens` the stop ids are suppressed (as in HF `generate`).
        The last decided token of every row is left pending in the state (with the closing
        `eos_id`), not fed: the embed step feeds it together with the invocation. `sampling`
        goes to `next_tokens`. Returns the token ids per row (stop token excluded) and which
        rows stopped; `logprobs`, a list, gets one list per row: the log-probability of each
        returned token.
        """
        batch = last.shape[0]
        traces: list[list[int]] = [[] for _ in range(batch)]
        finished = [False] * batch
        stepper = self._static_decoder(state, max_new_tokens - 1)
        step_logprobs = [] if logprobs is not None else None
        row_logprobs: list[list[float]] = [[] for _ in range(batch)]
        for step in range(max_new_tokens):
            suppress = sorted(stop_ids) if step < min_new_tokens else ()
            tokens = self.next_tokens(last, suppress=suppress, logprobs=step_logprobs, **sampling).tolist()
            chosen = step_logprobs.pop().tolist() if step_logprobs is not None else None
            for row in range(batch):
                if finished[row]:
                    continue
                if tokens[row] in stop_ids:
                    # Any stop id closes the turn with the canonical end-of-turn token, the
                    # same token `embed` appends after a given trace.
                    finished[row] = True
                    state.pending[row] = [eos_id]
                else:
                    traces[row].append(tokens[row])
                    state.pending[row] = [tokens[row]]
                    if chosen is not None:
                        row_logprobs[row].append(chosen[row])
            if all(finished) or step == max_new_tokens - 1:
                break
            # Rows that already stopped feed nothing: left_pad gives them a masked pad.
            chunks = [p[:1] for p in state.pending]
            if stepper is None:
                last = self.feed(state, chunks, self.stack.num_layers)[:, -1]
            else:
                last = stepper.step(state, *self._chunk_inputs(state, chunks))
            state.pending = [[] for _ in range(batch)]
        if stepper is not None:
            stepper.finish(state)
        for row in range(batch):
            if not finished[row]:  # hit max_new_tokens: the last token is pending; close the turn
                state.pending[row] = state.pending[row] + [eos_id]
        if logprobs is not None:
            logprobs.extend(row_logprobs)
        return traces, finished

    def _static_decode_mode(self) -> str:
        """The loop `decode_mode` asks for, resolved for this engine's device and attention."""
        mode = self.decode_mode
        if mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {mode!r}")
        cuda = self.device.type == "cuda"
        plain_attention = self.stack.attn_implementation in ("eager", "sdpa")
        if mode == "auto":
            return "graph" if cuda and plain_attention and not self._graph_failed else "eager"
        if mode != "eager" and not plain_attention:
            raise ValueError(f"decode_mode={mode!r} builds its own attention mask and supports eager and "
                             f"sdpa attention only, not {self.stack.attn_implementation}; use eager (or auto)")
        if mode == "graph" and not cuda:
            raise ValueError("decode_mode='graph' captures a CUDA graph and needs the model on CUDA; "
                             "use static (the same loop without the graph), compiled or eager on CPU")
        return mode

    def step_function(self, mode: str, invocation: bool = False):
        """The fixed-shape step a static mode runs: `DecoderStack.static_step` (decode) or
        `static_invocation_step`, compiled once per engine for `compiled` (torch.compile keeps a
        compiled graph per input shape)."""
        plain = self.stack.static_invocation_step if invocation else self.stack.static_step
        if mode != "compiled":
            return plain
        if plain.__name__ not in self._compiled:
            self._compiled[plain.__name__] = torch.compile(plain)
        return self._compiled[plain.__name__]

    def _static_decoder(self, state: ThinkState, steps: int) -> "StaticDecoder | None":
        mode = self._static_decode_mode()
        decoder = None
        if mode != "eager" and steps > 0:
            static = self.stack.static_cache(state.cache, steps)
            if static is not None:  # else the cache is not one the static loop can take over
                try:
                    decoder = StaticDecoder(self.stack, static, state, steps, self.capture_at,
                                            graph=mode == "graph" or (mode == "compiled" and self.device.type == "cuda"),
                                            step_function=self.step_function(mode))
                    self.stack.release(state.cache)  # the static buffers hold it until finish()
                except Exception as exc:  # noqa: BLE001 - auto falls back; an explicit mode raises
                    if self.decode_mode != "auto":
                        raise
                    self._graph_failed = True
                    warnings.warn(f"capturing the decode step as a CUDA graph failed ({type(exc).__name__}: "
                                  f"{exc}); decoding with the eager loop", RuntimeWarning, stacklevel=3)
        self.last_decode_mode = mode if decoder is not None else "eager"
        return decoder

    # ------------------------------------------------------------------ the embed step's forward
    def invocation_step(self, state: ThinkState, chunks: Sequence[Sequence[int]], stop: int,
                        tag: tuple = ()) -> torch.Tensor:
        """The embed step's forward: left-padded `chunks` (pending tokens + invocation, one per row)
        through layers [0, stop) against the state's cache; the state is left as it was. Returns
        their hidden states [B, t, D].

        The loop follows `decode_mode` (module docstring): eager (and compiled on CPU) feeds the
        DynamicCache and crops it back; static / graph / compiled on CUDA copy the cache into
        static buffers kept for this shape and run the fixed-shape step, `graph` (and `compiled` on
        CUDA) as a CUDA graph captured
        once per shape, adapter setup and weights. `tag` names the adapter setup the caller holds
        around the call (which adapters, which columns the embed adapter reaches): part of that
        key, because a graph replays what was active when it was captured. With grad enabled
        (training), or top_k's partial stack, the eager feed runs."""
        mode = self._static_decode_mode()
        length = self.stack.cache_length(state.cache)
        # compiled on CPU: the eager feed, which measured faster there than the compiled step
        # (SmolLM2, 3 tokens after 575 cached, a shared CPU: 91 against 99 ms; the compiled one
        # also copies the cache into its buffers) and compiles nothing.
        cpu_compiled = mode == "compiled" and self.device.type != "cuda"
        if (mode == "eager" or cpu_compiled or stop != self.stack.num_layers or self.capture_at is not None
                or torch.is_grad_enabled() or length is None):
            self.last_invocation_mode = "eager"
            with self.preserved(state), self.stack.grouped_attention():
                return self.feed(state, chunks, stop)
        ids, chunk_mask, positions = self._chunk_inputs(state, chunks)
        graph = mode == "graph" or (mode == "compiled" and self.device.type == "cuda")
        width = ids.shape[1]
        capacity = -(-(length + width) // INVOCATION_ROUND_TO) * INVOCATION_ROUND_TO
        key = (mode, tuple(ids.shape), tuple(positions.shape), capacity, tuple(tag))
        if mode != "static":
            # A graph reads the weights' memory as it was at capture, and a compiled step skips
            # its guards when it runs again (InvocationStep): any change to a weight (another
            # tensor, dtype or device, or an in-place update), a new key.
            key += (tuple((t.data_ptr(), t.dtype, t._version) for t in self._weights_and_buffers()),)
        step = self._invocation_steps.pop(key, None)
        if step is None:
            step = InvocationStep(self.stack, state.cache, ids, positions, capacity,
                                  self.step_function(mode, invocation=True), graph,
                                  skip_guards_on_repeat=mode == "compiled")
            while len(self._invocation_steps) >= INVOCATION_STEPS_KEPT:
                self._invocation_steps.popitem(last=False)
        self._invocation_steps[key] = step
        self.last_invocation_mode = mode
        return step.run(state, ids, chunk_mask, positions, length)

    def _weights_and_buffers(self) -> list:
        """Every parameter and buffer of the model, listed once (walking PEFT's module tree costs
        milliseconds per call): adapters added or removed later need `reset_steps()`."""
        if self._tensors is None:
            model = self.stack.hf_model
            self._tensors = [*model.parameters(), *model.buffers()]
        return self._tensors

    def reset_steps(self) -> None:
        """Forget the kept invocation steps (buffers, graphs) and the model's tensor list: after
        adding or removing an adapter."""
        self._invocation_steps.clear()
        self._tensors = None


def _advance(state: ThinkState, chunk_mask, positions, residual) -> None:
    """Record a fed chunk in the state (the cache itself was appended to by the layers)."""
    state.positions.append(positions)
    state.real_len = state.real_len + chunk_mask.sum(1)
    if residual is not None:
        state.residuals.append(residual)


class StaticDecoder:
    """Decode steps against a static KV cache (`decode_mode` static / graph): the inputs of the
    one-token step live in fixed buffers that each step overwrites, so the step (with `graph`, a
    captured CUDA graph of it) always sees the same tensors. The ThinkState is kept exactly as
    `Engine.feed` keeps it (mask, positions, real lengths, top_k residuals); `finish` hands the
    decoded keys and values back to its DynamicCache, so the embed step runs as after eager."""

    def __init__(self, stack: DecoderStack, static: StaticKV, state: ThinkState, steps: int,
                 capture_at: int | None, graph: bool, step_function=None):
        self.stack, self.static, self.capture_at = stack, static, capture_at
        self.step_function = step_function or stack.static_step
        self.start = state.attention_mask.shape[1]     # slot of the first decoded token
        device = state.attention_mask.device
        batch = state.attention_mask.shape[0]
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros_like(state.positions[-1][..., -1:])   # [B, 1] or [3, B, 1]
        self.mask = torch.zeros(batch, static.max_length, dtype=torch.bool, device=device)
        self.mask[:, :self.start] = state.attention_mask.bool()
        self.residual_index = torch.zeros(1, dtype=torch.long, device=device)
        self.residuals = None
        if capture_at is not None:
            width = state.residuals[-1].shape[-1]
            self.residuals = torch.zeros(batch, steps, width, dtype=state.residuals[-1].dtype, device=device)
        self.steps_done = 0
        self.graph = self.out = None
        # compiled: torch.compile's guards (thousands, a few ms per call) are checked on the first
        # step; the later steps of this decode run the same model, adapters and shapes.
        self.skip_guards_after_first = step_function is not None and step_function is not stack.static_step
        if graph:
            self._capture()

    def _forward(self):
        with self.stack.grouped_attention():
            return self.step_function(self.ids, self.positions, self.mask, self.static, self.capture_at,
                                      self.residuals, self.residual_index)

    def _capture(self) -> None:
        # The warm-up writes into the first decode slot, which the first real step overwrites.
        self.graph, self.out = capture_graph(self._forward)

    def step(self, state: ThinkState, ids, chunk_mask, positions) -> torch.Tensor:
        """One decode step ([B, 1] ids, mask and positions from Engine._chunk_inputs). Returns
        the last hidden state [B, D]."""
        slot = self.start + self.steps_done
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.mask[:, slot] = chunk_mask[:, 0].bool()
        self.static.write_pos.fill_(slot)
        self.residual_index.fill_(self.steps_done)
        if self.graph is not None:
            self.graph.replay()
            hidden = self.out
        else:
            with skipped_guards() if self.skip_guards_after_first and self.steps_done else contextlib.nullcontext():
                hidden = self._forward()
        state.attention_mask = torch.cat([state.attention_mask, chunk_mask], 1)
        residual = None
        if self.capture_at is not None:
            residual = self.residuals[:, self.steps_done:self.steps_done + 1].clone()
        _advance(state, chunk_mask, positions, residual)
        self.steps_done += 1
        return hidden[:, -1].clone()

    def finish(self, state: ThinkState) -> None:
        """Hand the decoded keys and values to the state's DynamicCache."""
        self.stack.write_back(self.static, state.cache, self.start + self.steps_done)


def skipped_guards():
    """A context in which torch.compile'd functions skip their guard checks (all but those that
    tell their own compiled graphs apart). Only where the caller knows nothing the guards check
    has changed since a checked call: the rest of one decode, a repeat of one invocation step."""
    try:
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):   # a torch without the option: the guards run
        return contextlib.nullcontext()


def capture_graph(forward) -> tuple:
    """(a CUDA graph of `forward()`, its output). Warm-up first, on a side stream (cuBLAS handles,
    the allocator, a compiled function's compilation) as torch.cuda.graphs asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    return graph, out


class InvocationStep:
    """The embed step's fixed-shape forward, kept by the engine per shape (batch, width, rounded
    cache length, adapter setup; with graph or compile also the weights): static key/value buffers
    the state's DynamicCache is copied into, the step's inputs in fixed buffers, and with `graph` a
    CUDA graph of the step captured on first use (compiled: the guards checked on first use). The
    state's own cache is only read."""

    def __init__(self, stack: DecoderStack, cache, ids: torch.Tensor, positions: torch.Tensor, capacity: int,
                 step_function, graph: bool, skip_guards_on_repeat: bool = False):
        self.stack, self.step_function = stack, step_function
        self.skip_guards_on_repeat, self.runs = skip_guards_on_repeat, 0
        batch, width = ids.shape
        keys, values = [], []
        for layer in cache.layers:
            _, heads, _, dim = layer.keys.shape
            keys.append(layer.keys.new_zeros(batch, heads, capacity, dim))
            values.append(layer.values.new_zeros(batch, heads, capacity, layer.values.shape[-1]))
        self.static = StaticKV(keys, values, 0, width)
        self.ids = torch.zeros_like(ids)
        self.positions = torch.zeros_like(positions)
        self.mask = torch.zeros(batch, width, capacity, dtype=torch.bool, device=ids.device)
        self.causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
        self.graph, self.out = None, None
        self.use_graph = graph

    def _forward(self):
        with self.stack.grouped_attention():
            return self.step_function(self.ids, self.positions, self.mask, self.static)

    def run(self, state: ThinkState, ids, chunk_mask, positions, length: int) -> torch.Tensor:
        width = ids.shape[1]
        self.static.fill_from(state.cache)
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.static.write_pos.copy_(torch.arange(length, length + width, device=ids.device))
        # Each new token sees the cache's real tokens and the real new tokens up to itself.
        self.mask.zero_()
        self.mask[:, :, :length] = state.attention_mask.bool()[:, None, :]
        self.mask[:, :, length:length + width] = self.causal & chunk_mask.bool()[:, None, :]
        if not self.use_graph:
            self.runs += 1
            with skipped_guards() if self.skip_guards_on_repeat and self.runs > 1 else contextlib.nullcontext():
                return self._forward()
        if self.graph is None:
            self.graph, self.out = capture_graph(self._forward)
        self.graph.replay()
        return self.out.clone()
