"""UnifiedTTE: one backbone, a `think` LoRA and an `embed` LoRA, and the forward path.

The forward-path contract lives in this file (its engine in engine.py, the adapter switch in
adapters.py):

    sequence  = [prompt: chat template, images, text] [trace] [end-of-turn] [invocation]
    embedding = L2-normalised final hidden state at the last invocation token (or their mean)

    mode="activated": positions before the invocation see base+T; from it on base+T+E, every layer.
    mode="top_k":     layers [0, L-K) see base+T everywhere; layers [L-K, L) see base+T+E everywhere.

Fast path (`think`, `embed`, `think_then_embed`): prefill + decode with T, keep the KV cache (and in
top_k the residual entering layer L-K); then run only the invocation tokens against the cache
(activated), or the invocation through the lower layers and the top K layers over the cached
residuals (top_k). Plain twin (`embed_recompute`): one full Hugging Face forward of the whole
sequence under the recompute semantics. Tests hold the two equal (tests/test_forward_path.py).

No trace (`traces=None`, or None for a row) means no trace and no end-of-turn: the sequence is
[prompt][invocation], as candidates are embedded. A query's *direct* embedding is exactly that,
and it comes nearly free from the think prefill: the cache already holds the prompt, so only the
invocation runs, and the cache is cropped back before decoding. `think_policy` (TTEConfig, or
`think=` per call) picks per query: `always` decode, `never` direct, `auto` the think gate
(model/gate.py) decides from the prefill before any decoding; only the rows that think decode.

    from unified_tte import UnifiedTTE, TTEInput
    from unified_tte.model import zoo
    tte = UnifiedTTE(zoo.tiny_qwen2vl(), mode="activated")
    emb, traces = tte.think_then_embed([TTEInput("Which digit?", images=[img])], max_new_tokens=32)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tte_kernels import pool  # fused gather/mean + L2 norm (Triton on CUDA)

from ..errors import CheckpointError, InputError
from . import adapters, checkpoint, zoo
from .backbones import Backbone, DecoderStack, add_invocation_tokens
from .config import TTEConfig
from .config import THINK_POLICIES
from .engine import Engine, ThinkState
from .gate import ThinkGate, gate_features, load_gate, model_fingerprint
from .inputs import EncodedPrompt, PromptEncoder, Trace, TTEInput, left_pad, stack_images, stack_videos


@dataclass
class ThinkOutput:
    traces: list[Trace]
    state: ThinkState
    prompts: list[EncodedPrompt] = field(repr=False, default_factory=list)


@dataclass
class BothEmbeddings:
    """Per query, from one prefill: the direct embedding, the TTE embedding after its trace, the
    trace and the gate's features (what the gate is trained and the frontier swept on)."""
    direct: torch.Tensor        # fp32 [B, D]
    tte: torch.Tensor           # fp32 [B, D]
    traces: list[Trace]
    features: torch.Tensor      # fp32 [B, F], model/gate.py gate_features


class UnifiedTTE(nn.Module):
    """One backbone with a `think` and an `embed` adapter (see the module docstring).

    Args:
        backbone: a `Backbone` (zoo.load / backbones.load); wrapped in place (invocation tokens
            added to its tokenizer and embeddings, LoRA layers injected).
        config: a TTEConfig (not modified; the filled-in copy is `self.config`), or keyword
            overrides of its fields (mode=, embed_layers=, think=, pooling=, lora_r=, ...).
    """

    def __init__(self, backbone: Backbone, config: TTEConfig | None = None, **overrides):
        super().__init__()
        cfg = dataclasses.replace(config or TTEConfig(), **overrides)
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        hf_model = backbone.model
        self.stack = DecoderStack(hf_model)
        L = self.stack.num_layers
        if cfg.mode == "top_k":
            if cfg.embed_layers is None:
                cfg = dataclasses.replace(cfg, embed_layers=max(1, L // 4))
            if not 1 <= cfg.embed_layers <= L:
                raise ValueError(f"embed_layers must be in [1, {L}] for this {L}-layer backbone, "
                                 f"got {cfg.embed_layers}")
        self.config = cfg
        self.raw_prompts = cfg.prompt_format == "vlm2vec"
        if self.raw_prompts:
            if not (cfg.think == "none" and cfg.mode == "top_k" and cfg.embed_layers == L and cfg.pooling == "last"):
                raise ValueError("prompt_format 'vlm2vec' is the two-model baseline's embedder format: build it "
                                 "with UnifiedTTE.separate_embedder(backbone, prompt_format='vlm2vec') "
                                 "(think none, top_k with K = L, last-token pooling).")
            # VLM2Vec pools the last prompt token: no invocation tokens, the vocabulary untouched.
            self.invocation_ids: list[int] = []
            self.stack.vision_positions = False
        else:
            self.invocation_ids = add_invocation_tokens(backbone, cfg.invocation)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        gen_eos = getattr(hf_model.generation_config, "eos_token_id", None)
        gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        self.stop_ids = {self.eos_id, *gen_eos}  # decoding stops at any of these
        max_pos = getattr(self.stack.config, "max_position_embeddings", 4096)
        self.encoder = PromptEncoder(self.tokenizer, backbone.image_processor,
                                     max_length=cfg.max_length or max_pos, max_pixels=cfg.max_pixels,
                                     min_pixels=cfg.min_pixels, max_frames=cfg.max_frames, fps=cfg.fps,
                                     prompt_format=cfg.prompt_format, system_prompt=cfg.system_prompt)

        for p in hf_model.parameters():
            p.requires_grad_(False)
        # The LoRA init is seeded by the config; the caller's RNG stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.peft_model = adapters.wrap(hf_model, cfg, L)
        self.switch = adapters.AdapterSwitch(self.peft_model, ["think"] if cfg.think == "lora" else [])
        self.engine = Engine(self.stack, self.pad_id,
                             capture_at=self.split_layer if cfg.mode == "top_k" else None)
        self.set_trainable(None)
        self.gate: ThinkGate | None = None    # think_policy "auto" needs one (set_gate)

    @classmethod
    def separate_embedder(cls, backbone: Backbone, **overrides) -> "UnifiedTTE":
        """The two-model baseline's embedder: its own backbone copy with one LoRA over every layer
        and every position (VLM2Vec style), re-encoding query + trace. Expressed as top_k with
        K = L and no think adapter, so it runs through the same forward path."""
        L = DecoderStack(backbone.model).num_layers
        return cls(backbone, **{**overrides, "think": "none", "mode": "top_k", "embed_layers": L})

    @classmethod
    def vlm2vec_embedder(cls, backbone: Backbone, lora_folder=None, **overrides) -> "UnifiedTTE":
        """A VLM2Vec checkpoint as the two-model baseline's embedder, with its own prompt format
        (prompt_format "vlm2vec": raw prompt, last-token pooling). `backbone` is the merged
        model (zoo.load(folder)), or its base with `lora_folder` (a PEFT LoRA folder) merged in."""
        if lora_folder is not None:
            backbone.model = adapters.merge_lora_folder(backbone.model, lora_folder)
        return cls.separate_embedder(backbone, **{**overrides, "prompt_format": "vlm2vec"})

    @classmethod
    def separate_reasoner(cls, backbone: Backbone, **overrides) -> "UnifiedTTE":
        """The two-model baseline's reasoner: base + think LoRA and no embed adapter (it only
        decodes; `embed` on it is an error)."""
        tte = cls(backbone, **overrides)
        tte.switch.remove("embed")
        tte.engine.reset_steps()
        return tte

    @classmethod
    def from_checkpoint(cls, path, backbone: Backbone | None = None, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None) -> "UnifiedTTE":
        """Load an exported checkpoint or a training run folder (see model/checkpoint.py): every
        file verified, then the base model's type, tokenizer and weight hash.

        Args:
            backbone: the base it was trained on, in the dtype it had then; default: built from
                the recorded backbone spec (zoo.load). It is wrapped in place.
            dtype: cast the whole model after the checks (e.g. torch.bfloat16 for serving).
        """
        src = checkpoint.open_source(path)
        if backbone is None:
            if not src.backbone_spec:
                raise CheckpointError(f"{src.folder / checkpoint.CONFIG_FILE} records no backbone spec; "
                                      "pass backbone=")
            backbone = zoo.load(src.backbone_spec)
        checkpoint.check_backbone_type(src, backbone.model_type)
        tte = cls(backbone, src.config)
        checkpoint.load_into(tte, src)
        gate = load_gate(src)
        if gate is not None:
            tte.set_gate(gate, where=str(src.folder / "gate"))
        elif tte.config.think_policy == "auto":
            raise CheckpointError(f"{src.folder / checkpoint.CONFIG_FILE} sets think_policy 'auto' but the "
                                  f"folder holds no gate/ (a fitted think gate): train the recipe's `gate` "
                                  "stage, or set think_policy to 'always' or 'never'")
        if isinstance(dtype, str):
            dtype = checkpoint.DTYPES[dtype]
        if dtype is not None:
            tte.to(dtype=dtype)
        if device is not None:
            tte.to(device)
        return tte.eval()

    # ------------------------------------------------------------------ the think gate
    def fingerprint(self) -> dict:
        """What a think gate fitted on this model records (model/gate.py model_fingerprint)."""
        from .backbones import weight_hash

        return {"base_weight_hash": weight_hash(self.peft_model), "base_dtype": str(self.stack.dtype),
                "base_model": self.backbone.name, **model_fingerprint(self)}

    def set_gate(self, gate: ThinkGate | None, where: str = "the gate") -> None:
        """Attach a fitted think gate (refused when it was fitted for another base, config or
        adapters); None detaches it."""
        if gate is not None:
            gate.check(self.fingerprint(), where)
        self.gate = gate

    def _policy(self, think: str | None) -> str:
        policy = self.config.think_policy if think is None else think
        if policy not in THINK_POLICIES:
            raise InputError(f"think must be one of {THINK_POLICIES}, got {policy!r}")
        if policy == "auto" and self.gate is None:
            raise InputError("think 'auto' needs a fitted think gate and this model has none: train the "
                             "recipe's `gate` stage (or load a checkpoint that holds gate/), or use "
                             "think 'always' or 'never'")
        return policy

    # ------------------------------------------------------------------ adapters
    @property
    def think_adapters(self) -> list[str]:
        return self.switch.think_adapters

    @property
    def embed_adapters(self) -> list[str]:
        return self.switch.embed_adapters

    def set_trainable(self, stage: Literal["think", "embed"] | None) -> list[nn.Parameter]:
        """Make exactly one adapter trainable (or none) and return its parameters."""
        return adapters.set_trainable(self.peft_model, stage)

    def adapter_params(self, adapter: str) -> dict[str, nn.Parameter]:
        return adapters.adapter_params(self.peft_model, adapter)

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
        if not isinstance(trace, str):
            raise TypeError(f"a trace is a string or a Trace, got {type(trace).__name__}")
        return self.tokenizer(trace, add_special_tokens=False)["input_ids"]

    def tails(self, n: int, traces: Sequence[str | Trace | None] | None) -> list[list[int]]:
        """Token ids after each prompt and before the invocation: trace + end-of-turn, or nothing
        for no trace (`traces` None, or a row's None: candidates, direct embeddings; "" is an
        empty trace, which still closes the turn). The vlm2vec format appends a trace as raw text."""
        if traces is None:
            return [[] for _ in range(n)]
        if len(traces) != n:
            raise ValueError(f"got {len(traces)} traces for {n} inputs; pass one trace per input "
                             "(None for the whole batch embeds without traces)")
        close = [] if self.raw_prompts else [self.eos_id]
        return [[] if t is None else self.trace_ids(t) + close for t in traces]

    def encode(self, inputs: Sequence[TTEInput], traces=None, invocation: bool = True) -> list[EncodedPrompt]:
        """Encode prompts with room kept after each for its trace tail (and the invocation)."""
        extra = len(self.invocation_ids) if invocation else 0
        return self.encoder.encode(inputs, reserve=[len(t) + extra for t in self.tails(len(inputs), traces)])

    def set_image_size(self, max_pixels: int | None = None, min_pixels: int | None = None) -> None:
        """Set the pixel range this model resizes every image and video frame into (multiples of
        28 px, aspect kept); None leaves that bound as it is. `tte traces` / `tte eval`
        --max-pixels / --min-pixels call it; `config` keeps what the model was built with.

        Which size an image gets, the one rule: first the input's own cap (`TTEInput.max_pixels`,
        which the inputs of a registry entry's task or of a training subset carry from its
        `max_pixels`), then the model's range (this setter, else `TTEConfig.max_pixels` /
        `min_pixels`, saved with a checkpoint), then the image processor's default. A Qwen2-VL
        checkpoint's default is 12.8M pixels, ~16k tokens for a large page; the recipes set
        VLM2Vec's 28*28*1280, ~1280 tokens.
        """
        if max_pixels is not None:
            self.encoder.max_pixels = max_pixels
        if min_pixels is not None:
            self.encoder.min_pixels = min_pixels

    # ------------------------------------------------------------------ fast path
    @torch.no_grad()
    def think(self, inputs: Sequence[TTEInput], max_new_tokens: int = 128, do_sample: bool = False,
              temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
              min_new_tokens: int = 0, on_prefill: Callable[[], None] | None = None,
              logprobs: bool = False) -> ThinkOutput:
        """Decode a trace per input, as one left-padded batch, with the think adapter.

        Stops a row at the end-of-turn token, but not before `min_new_tokens` (min = max decodes
        exactly that many). `on_prefill` is called once the prompt's forward pass is done (a
        timing hook); `logprobs` fills each trace's `answer_logprob`. Returns the traces and the
        state (cache, positions, residuals) that `embed_from_state` reuses.
        """
        self._check_budget(max_new_tokens, min_new_tokens)
        prompts, last, state = self._think_prefill(inputs, max_new_tokens)
        if on_prefill is not None:
            on_prefill()
        traces = self._decode(state, last, max_new_tokens, min_new_tokens, do_sample=do_sample,
                              temperature=temperature, top_p=top_p, seed=seed, logprobs=logprobs)
        return ThinkOutput(traces, state, prompts)

    @staticmethod
    def _check_budget(max_new_tokens, min_new_tokens=0) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) \
                or not 0 <= min_new_tokens <= max_new_tokens:
            raise InputError(f"min_new_tokens must be an integer in [0, max_new_tokens={max_new_tokens}], "
                             f"got {min_new_tokens!r}")

    def _think_prefill(self, inputs, max_new_tokens: int) -> tuple[list[EncodedPrompt], torch.Tensor, ThinkState]:
        """The prompt through every layer with the think adapter, room kept for the decode:
        (prompts, the last prompt token's final hidden state [B, D] before the norm, state)."""
        prompts = self.encoder.encode(inputs, reserve=max_new_tokens + 1 + len(self.invocation_ids))
        with self.switch.use(self.think_adapters):
            hidden, state = self.engine.prefill(prompts, [[] for _ in prompts], self.num_layers)
        return prompts, hidden[:, -1], state

    def _decode(self, state: ThinkState, last: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
                do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                seed: int | None = None, logprobs: bool = False) -> list[Trace]:
        """Decode from a think prefill's state (every row of it) with the think adapter."""
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        token_logprobs = [] if logprobs else None
        with self.switch.use(self.think_adapters):
            ids, finished = self.engine.decode(
                state, last, max_new_tokens, self.stop_ids, self.eos_id, min_new_tokens, logprobs=token_logprobs,
                do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)
        return [Trace(self.tokenizer.decode(row, skip_special_tokens=True), row, finished[r],
                      answer_logprob=None if token_logprobs is None else self.answer_logprob(row, token_logprobs[r]))
                for r, row in enumerate(ids)]

    def answer_logprob(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> float:
        """Mean log-probability of a decoded trace's final-answer tokens: those after `</think>`,
        or all of them when the trace has no `</think>`; -inf when nothing follows `</think>`."""
        start = 0
        for k in range(len(token_ids)):
            if "</think>" in self.tokenizer.decode(token_ids[:k + 1], skip_special_tokens=True):
                start = k + 1
                break
        answer = list(logprobs[start:])
        return sum(answer) / len(answer) if answer else float("-inf")

    def embed_from_state(self, state: ThinkState) -> torch.Tensor:
        """The embed step of the fast path: invocation tokens against the cache. The state is
        left as it was (the cache is cropped back), so it can be embedded from again. Grad flows
        only through what the embed adapter touches, so a no-grad prefix costs no activation
        memory. fp32 [B, D], unit norm."""
        if "embed" not in self.embed_adapters:
            raise ValueError("this model has no embed adapter (a separate reasoner); it cannot embed")
        n_inv = len(self.invocation_ids)
        chunks = [p + self.invocation_ids for p in state.pending]
        if self.config.mode == "activated":
            # One forward of pending trace tokens + invocation: every LoRA layer runs think and
            # embed as one low-rank product, embed only on the last n_inv columns (left padding
            # puts every row's invocation there), so pending tokens see T and the invocation T+E.
            # The engine runs it as its decode mode runs a step (a CUDA graph on CUDA).
            with self.switch.fused(self.embed_adapters, tail=n_inv):
                hidden = self.engine.invocation_step(state, chunks, self.num_layers,
                                                     tag=(self.switch.fused_path, *self.embed_adapters, n_inv))
        else:
            with self.engine.preserved(state):
                with self.switch.fused(self.think_adapters):
                    self.engine.feed(state, chunks, self.split_layer)
                residual = torch.cat(state.residuals, 1)        # [B, T_all, D] entering layer L-K
                positions = torch.cat(state.positions, -1)
                with self.switch.fused(self.embed_adapters):
                    hidden, _ = self.stack.run_layers(residual, state.attention_mask, positions, None,
                                                      self.split_layer, self.num_layers)
        pooled = max(n_inv, 1)  # the vlm2vec format pools its last prompt token, with no invocation
        return self._pool(self.stack.norm(hidden[:, -pooled:]), n_inv)

    def _empty(self) -> torch.Tensor:
        """The embedding of no inputs: fp32 [0, D] (an empty batch is a batch, not an error)."""
        return torch.empty(0, self.stack.config.hidden_size, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def embed(self, inputs: Sequence[TTEInput], traces: Sequence[str | Trace] | None = None) -> torch.Tensor:
        """Embed without decoding: candidates (no trace) or queries with given traces. fp32 [B, D]."""
        if len(inputs) == 0:
            self.tails(0, traces)  # still one trace per input
            return self._empty()
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
        tails = self.tails(len(inputs), traces)
        if prompts is None:
            prompts = self.encode(inputs, traces)
        held = None
        if self.raw_prompts:  # the last token is pooled: hold it back, the embed step feeds it
            prompts, tails, held = self._hold_last_token(prompts, tails)
        with self.switch.use(self.think_adapters):
            state = self.engine.prefill(prompts, tails, self.split_layer)[1]
        if held is not None:
            state.pending = held
        return state

    def _hold_last_token(self, prompts, tails):
        """vlm2vec format: prompts + tails without their last token, and that token per row."""
        vision = {self.encoder.image_token_id, self.encoder.video_token_id}
        held, cut = [], []
        for index, (p, t) in enumerate(zip(prompts, tails)):
            ids = p.ids + t
            if len(ids) < 2 or ids[-1] in vision:
                raise InputError(f"input {index}: the vlm2vec format pools the last token, which must "
                                 "be text; add text after the image or video.")
            held.append([ids[-1]])
            cut.append(dataclasses.replace(p, ids=ids[:-1]))
        return cut, [[] for _ in tails], held

    @torch.no_grad()
    def think_then_embed(self, inputs: Sequence[TTEInput], max_new_tokens: int = 128, think: str | None = None,
                         threshold: float | None = None, **sampling) -> tuple[torch.Tensor, list[Trace]]:
        """The single fast path: decode with think, then embed reusing the cache. fp32 [B, D].
        No inputs give an empty [0, D] embedding and no traces.

        `think` (default: the config's think_policy): "always"; "never" (the direct embedding,
        `embed(inputs)`, nothing decoded); "auto": one think prefill, the direct embedding from
        it, the gate's decision per query (`threshold`, else its operating point), then only the
        rows that think decode and get their TTE embedding (with `answer_fallback`, a row whose
        answer log-probability is below the gate's threshold keeps its direct one). Rows that did
        not decode get a `Trace` with `thought=False`; `used` says which embedding each row got."""
        policy = self._policy(think)
        self._check_budget(max_new_tokens)
        if len(inputs) == 0:
            return self._empty(), []
        if policy == "never":
            return self.embed(inputs), [Trace("", [], False, thought=False, used="direct") for _ in inputs]
        if policy == "always":
            out = self.think(inputs, max_new_tokens=max_new_tokens, **sampling)
            return self.embed_from_state(out.state), out.traces
        prompts, last, state = self._think_prefill(inputs, max_new_tokens)
        direct = self.embed_from_state(state)             # the cache is cropped back after it
        features = gate_features(direct, self.stack.norm(last), torch.tensor([len(p.ids) for p in prompts]))
        rows = self.gate.decide(features, threshold).nonzero().flatten().tolist()
        traces = [Trace("", [], False, thought=False, used="direct") for _ in inputs]
        out = direct.clone()
        if rows:
            if len(rows) < len(inputs):
                state.select(rows)
                last = last[rows]
            fallback = self.config.answer_fallback and self.gate.answer_logprob_threshold is not None
            decoded = self._decode(state, last, max_new_tokens, logprobs=fallback, **sampling)
            after = self.embed_from_state(state)
            for j, row in enumerate(rows):
                trace = decoded[j]
                if fallback and trace.answer_logprob < self.gate.answer_logprob_threshold:
                    trace.used = "direct"
                else:
                    out[row] = after[j]
                traces[row] = trace
        return out, traces

    @torch.no_grad()
    def embed_both(self, inputs: Sequence[TTEInput], max_new_tokens: int = 128, **sampling) -> BothEmbeddings:
        """Every query both ways from one prefill: its direct embedding, its TTE embedding after
        a decoded trace, the trace (with its answer log-probability) and the gate's features.
        The think gate is fitted, and the accuracy/compute frontier swept, on these."""
        self._check_budget(max_new_tokens)
        if len(inputs) == 0:
            empty = self._empty()
            return BothEmbeddings(empty, empty, [], torch.empty(0, 2 * empty.shape[1] + 1))
        prompts, last, state = self._think_prefill(inputs, max_new_tokens)
        direct = self.embed_from_state(state)
        features = gate_features(direct, self.stack.norm(last), torch.tensor([len(p.ids) for p in prompts]))
        traces = self._decode(state, last, max_new_tokens, logprobs=True, **sampling)
        return BothEmbeddings(direct, self.embed_from_state(state), traces, features)

    # ------------------------------------------------------------------ think SFT
    def sft_loss(self, inputs: Sequence[TTEInput], traces: Sequence[str | Trace],
                 prompts: list[EncodedPrompt] | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy on the trace tokens and the closing end-of-turn token only,
        with the think adapter (the prompt is context, not target)."""
        tails = self.tails(len(inputs), traces)
        if prompts is None:
            prompts = self.encode(inputs, traces, invocation=False)
        ids, mask = left_pad([p.ids + t for p, t in zip(prompts, tails)], self.pad_id)
        targets, _ = left_pad([[-100] * len(p.ids) + t for p, t in zip(prompts, tails)], -100)
        ids, mask, targets = (x.to(self.device) for x in (ids, mask, targets))
        with self.switch.use(self.think_adapters):
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
            pixel_values, grid = stack_images(prompts)
            video_values, video_grid = stack_videos(prompts)
            if pixel_values is not None:
                pixel_values, grid = pixel_values.to(self.device, self.stack.dtype), grid.to(self.device)
            if video_values is not None:
                video_values, video_grid = video_values.to(self.device, self.stack.dtype), video_grid.to(self.device)
            kwargs = dict(pixel_values=pixel_values, image_grid_thw=grid, pixel_values_videos=video_values,
                          video_grid_thw=video_grid, mm_token_type_ids=self.stack.mm_token_types(ids))
        return self.stack.outer(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state

    # ------------------------------------------------------------------ plain twin
    @torch.no_grad()
    def embed_recompute(self, inputs: Sequence[TTEInput], traces: Sequence[str | Trace] | None = None) -> torch.Tensor:
        """One full Hugging Face forward of prompt + trace + invocation, no cache reuse."""
        tails = self.tails(len(inputs), traces)
        n_inv = len(self.invocation_ids)
        prompts = self.encode(inputs, traces)
        ids, mask = left_pad([p.ids + t + self.invocation_ids for p, t in zip(prompts, tails)], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        gate = None
        if self.config.mode == "activated":
            gate = torch.zeros(*ids.shape, 1, device=self.device)
            gate[:, -n_inv:] = 1.0  # left padding puts every row's invocation in the last columns
        with self.switch.use(self.embed_adapters, gate):
            hidden = self._outer_forward(ids, mask, prompts)
        return self._pool(hidden, n_inv)

    # ------------------------------------------------------------------ pooling
    def _pool(self, hidden: torch.Tensor, n_inv: int) -> torch.Tensor:
        """Pool the invocation tokens (always the last n_inv columns) and L2-normalise, fp32.
        The positions and mask are built here, valid by construction: `pool` skips its input
        checks (a NaN or Inf in what is pooled is still an error)."""
        batch, width = hidden.shape[:2]
        if self.config.pooling == "last":
            positions = torch.full((batch,), width - 1, dtype=torch.long, device=hidden.device)
            return pool(hidden, positions=positions, checked=False)
        mask = torch.zeros(batch, width, dtype=torch.bool, device=hidden.device)
        mask[:, width - n_inv:] = True
        return pool(hidden, mask=mask, checked=False)
