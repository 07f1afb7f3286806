"""`tte plan`'s estimate: the memory each stage of a recipe needs per GPU, from the model's config
alone, and the knobs that shrink a stage (tools/plan.py is the command, plan_render.py prints it).

    from unified_tte.tools.plan_estimate import Lengths, Setup, plan, shape_of
    plans = plan(recipe, shape_of(recipe.backbone), lengths, Setup(8, 1, 80.0, "cuda", ds_json))

The model comes from its config alone, built on the meta device (no weights are read): a built-in
backbone, a local checkpoint folder, or, when the folder does not exist here (a recipe's
placeholder), the published shape its name matches (Qwen2-VL-2B / 7B, Qwen2.5-VL-3B). Rows are
sized from the recipe's `model.max_pixels` (image tokens: 28 x 28 px each) and the lengths given
on the command line (`--text-tokens`, `--trace-tokens`, `--images`). Per GPU, with e = 2 bytes in bf16 (GPU), 4 in
fp32 (CPU):

- weights: the frozen base, e per parameter. ZeRO-3 shards it over the GPUs, except the vision
  tower (kept whole on every rank, train/engine.py), and gathers the largest module plus the
  prefetch bucket while it runs; with parameter offload only those stay on the GPU.
- trained parameters with their gradients and Adam state: DeepSpeed's own estimators
  (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`) on the
  parameters the stage trains (LoRA r x (in + out) per target, or the language model in
  think.method full). ZeRO-0 is the ZeRO-2 estimate on one GPU; ZeRO-1 adds its unpartitioned
  16-bit gradients.
- DeepSpeed buffers: ZeRO-1/2/3 allocate a gradient bucket of `reduce_bucket_size` elements (two
  with overlap_comm); on a CPU only the pages the gradients touch become resident.
- think: what autograd keeps for backward per token and layer, 8 D + e (4 D + 2 kv + 2 kv' + 4 I + 7 r)
  bytes (kv = kv_heads x head_dim): both RMSNorm inputs in fp32, the normed inputs of the LoRA'd
  projections, q, k, v, the attention output, the k / v SDPA keeps (kv' = D on CUDA, where
  transformers repeats them to every head for a padded batch; kv on CPU), the gate, up, SiLU and
  product of the MLP and the LoRA A outputs (measured with autograd's saved-tensor hooks); times
  micro_batch_size x tokens per row x layers, plus the [B, 1, T, T] bool attention mask; and the
  logits on the trace tokens, 12 B per vocabulary entry at the loss's backward.
- embed (GradCache): the KV caches (2 x kv_heads x head_dim x e per token and layer below the
  embed split; top_k also keeps the residual entering layer L-K) of every query and target of
  the rank's batch when `gradcache_keep_prefix`, else of one chunk; the larger of a chunk's
  no-grad prefill (5 D + 3 I per token, one layer live) and its pass with grad (activated: the
  invocation tokens through every layer and the repeated k / v of the whole sequence SDPA keeps;
  top_k: K layers over the whole sequence); the embeddings of the global batch.

A stage fits when its total is at most 90% of `--gpu-mem` (the rest: CUDA context and allocator
fragmentation).
"""
from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RecipeError

GIB = 2 ** 30
USABLE = 0.9                 # of --gpu-mem; the rest for the CUDA context and fragmentation
MARKUP_TOKENS = 12           # chat template around a user turn and the assistant prompt
PATCH_VALUES = 3 * 2 * 14 * 14  # one Qwen2-VL patch as the image processor returns it (fp32)
PATCHES_PER_TOKEN = 4           # 2 x 2 patches merge into one image token
DS_DEFAULT_BUCKET = 500_000_000     # DeepSpeed's reduce_bucket_size default (elements)
DS_DEFAULT_PREFETCH = 50_000_000    # stage3_prefetch_bucket_size default (elements)
LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # adapters.LORA_TARGETS
PUBLISHED_NAMES = {"qwen2-vl-2b": "qwen2vl-2b", "qwen2-vl-7b": "qwen2vl-7b", "qwen2.5-vl-3b": "qwen25vl-3b",
                   "qwen2_5-vl-3b": "qwen25vl-3b"}


# ------------------------------------------------------------------------------------ the model
@dataclass
class Shape:
    """What the plan needs of a model, read off its meta-device build."""
    name: str
    source: str
    model_type: str
    is_vl: bool
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    params: int                   # every parameter once (tied embeddings counted once)
    vision_params: int
    language_params: int          # what think.method full trains
    largest_module: int           # parameters of the largest single module (ZeRO-3 gathers it whole)
    lora_in_out: list[int]        # per layer: sum of (in + out) over the LoRA target linears
    image_cap: int | None         # the image processor's max_pixels
    vision_width: int = 0         # the vision tower's hidden size and MLP width
    vision_mlp: int = 0


@functools.lru_cache(maxsize=8)
def shape_of(spec: str) -> Shape:
    """The Shape of a backbone spec (built-in name or folder), built on the meta device."""
    import torch

    from ..model import zoo
    from ..model.backbones import DecoderStack, max_pixels_of

    source = spec
    if spec in zoo.BUILTIN:
        if spec == "smollm2":
            raise RecipeError("tte plan: the smollm2 backbone loads its weights from a GGUF file; plan it "
                              "through a local Hugging Face folder of SmolLM2-135M instead.")
        backbone = zoo.load(spec, device="meta")
        source = "built-in" + (" (random weights, published shape)" if spec in zoo.SHAPES else "")
    elif (Path(spec) / "config.json").is_file():
        backbone = _meta_from_folder(Path(spec))
        source = f"config of {spec}"
    else:
        key = next((v for k, v in PUBLISHED_NAMES.items() if k in Path(spec).name.lower()), None)
        if key is None:
            raise RecipeError(f"backbone {spec}: no config.json there and the name matches no published shape "
                              f"({', '.join(sorted(set(PUBLISHED_NAMES.values())))}); plan on a machine that has "
                              "the folder, or set backbone to a built-in *-shape name.")
        backbone = zoo.published_shape(key, device="meta")
        source = f"published {key} config ({spec} not found here)"
    model = backbone.model
    stack = DecoderStack(model)
    cfg = stack.config
    attn = stack.layers[0].self_attn
    unique = {id(p): p.numel() for p in model.parameters()}
    vision = getattr(stack.outer, "visual", None)
    vision_params = sum(p.numel() for p in vision.parameters()) if vision is not None else 0
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    lora = []
    for layer in stack.layers:
        total = 0
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in LORA_LINEARS:
                total += module.in_features + module.out_features
        lora.append(total)
    vision_cfg = getattr(model.config, "vision_config", None)
    width = (getattr(vision_cfg, "embed_dim", None) or getattr(vision_cfg, "hidden_size", 0)) if vision_cfg else 0
    mlp = (getattr(vision_cfg, "intermediate_size", None) or width * getattr(vision_cfg, "mlp_ratio", 4)) if vision_cfg else 0
    return Shape(name=backbone.name, source=source, model_type=stack.model_type, is_vl=stack.is_vl,
                 layers=stack.num_layers,
                 hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                 head_dim=attn.head_dim, intermediate=cfg.intermediate_size, vocab=stack.lm_head.out_features,
                 params=sum(unique.values()), vision_params=vision_params,
                 language_params=sum(unique.values()) - vision_params, largest_module=largest, lora_in_out=lora,
                 image_cap=max_pixels_of(backbone.image_processor) if backbone.image_processor else None,
                 vision_width=width, vision_mlp=mlp)



def _meta_from_folder(folder: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from ..model.backbones import VISION_LANGUAGE_TYPES, Backbone, check_supported

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    check_supported(config.model_type, str(folder / "config.json"))
    vl = config.model_type in VISION_LANGUAGE_TYPES
    with torch.device("meta"):
        model = (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_config(config)
    processor = None
    if vl:
        from ..model.backbones import load_image_processor
        try:
            processor = load_image_processor(folder)
        except OSError:
            processor = None
    return Backbone(model, None, processor, folder.name)


# ------------------------------------------------------------------------------------ the rows
@dataclass
class Lengths:
    """Tokens per row, from the recipe's max_pixels and the command line's lengths."""
    text: int
    trace: int
    images: int
    image_tokens: int             # per image
    invocation: int

    @property
    def prompt(self) -> int:
        return MARKUP_TOKENS + self.text + self.images * (self.image_tokens + 2)  # + vision start / end

    @property
    def think_row(self) -> int:
        return self.prompt + self.trace + 1

    @property
    def query_row(self) -> int:
        return self.prompt + self.trace + 1 + self.invocation

    @property
    def target_row(self) -> int:
        return self.prompt + self.invocation


def image_tokens(max_pixels: int | None) -> int:
    """Tokens of the largest image allowed: a square of max_pixels on the 28 px grid."""
    if not max_pixels:
        return 0
    side = max(1, math.isqrt(max_pixels) // 28)
    return side * side


# ------------------------------------------------------------------------------------ the plan
@dataclass
class Setup:
    """Where the recipe runs: GPUs, their memory, precision and the DeepSpeed engine shape."""
    gpus_per_node: int
    nodes: int
    gpu_mem_gib: float
    device: str                   # "cuda" or "cpu" (the check against a measurement on this CPU)
    ds: dict = field(default_factory=dict)
    ds_name: str = ""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def zero(self) -> int:
        return int(self.ds.get("zero_optimization", {}).get("stage", 0))

    def offload(self, what: str) -> bool:
        return self.ds.get("zero_optimization", {}).get(f"offload_{what}", {}).get("device", "none") not in (None, "none")


@dataclass
class StagePlan:
    stage: str
    rows: str                     # what one forward holds, in words
    parts: dict                   # component -> bytes
    notes: dict                   # component -> how it was counted
    cpu_bytes: int = 0            # host memory DeepSpeed's estimator wants (offload)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))


def bytes_per_element(recipe, setup: Setup) -> int:
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and setup.device == "cuda")
    return 2 if bf16 else 4


def trained_params(recipe, shape: Shape, stage: str) -> tuple[int, int]:
    """(parameters the stage trains, the largest trained module's)."""
    r = recipe.model.lora_r
    if stage == "think" and recipe.think.method == "full":
        vision = shape.vision_params if recipe.think.freeze_vision else 0
        return shape.params - vision, shape.largest_module
    if stage == "think" or recipe.model.mode == "activated":
        layers = shape.lora_in_out
    else:
        k = recipe.model.embed_layers or max(1, shape.layers // 4)
        layers = shape.lora_in_out[shape.layers - k:]
    return r * sum(layers), r * max(shape.hidden, shape.intermediate)


def deepspeed_states(n: int, largest: int, setup: Setup) -> tuple[int, int, str]:
    """(device bytes, host bytes, source) of n trained parameters' weights, gradients and Adam
    state, from DeepSpeed's estimators where it has them."""
    offload_opt, offload_param = setup.offload("optimizer"), setup.offload("param")
    try:
        from ..train.engine import setup_environment
        setup_environment()
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        source = "deepspeed"
    except Exception:  # noqa: BLE001 - no DeepSpeed here: its published formulas, written out
        estimate_zero2_model_states_mem_needs = _zero2_formula
        estimate_zero3_model_states_mem_needs = _zero3_formula
        source = "DeepSpeed's formula (deepspeed not importable)"
    if setup.zero == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(n, largest, setup.gpus_per_node, setup.nodes,
                                                            cpu_offload=offload_opt, cpu_offload_params=offload_param,
                                                            zero_init=True, additional_buffer_factor=1.0)
        return gpu, cpu, f"{source}.estimate_zero3"
    if setup.zero == 0:
        cpu, gpu = estimate_zero2_model_states_mem_needs(n, 1, 1, cpu_offload=offload_opt, additional_buffer_factor=1.0)
        return gpu, cpu, f"{source}.estimate_zero2 on 1 GPU (ZeRO-0 partitions nothing)"
    cpu, gpu = estimate_zero2_model_states_mem_needs(n, setup.gpus_per_node, setup.nodes, cpu_offload=offload_opt,
                                                     additional_buffer_factor=1.0)
    if setup.zero == 1:  # ZeRO-1 keeps every rank's full 16-bit gradients
        gpu += int(2 * n * (1 - 1 / setup.world))
        return gpu, cpu, f"{source}.estimate_zero2 + unpartitioned gradients (ZeRO-1)"
    return gpu, cpu, f"{source}.estimate_zero2"


def _zero2_formula(total_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True, additional_buffer_factor=1.5):
    gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        return int(total_params * max(4 * gpus, 16) * additional_buffer_factor), int(2 * total_params)
    return (int(total_params * 4 * num_gpus_per_node * additional_buffer_factor),
            int(2 * total_params + 18 * total_params / gpus))


def _zero3_formula(total_params, largest_layer_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True,
                   cpu_offload_params=True, zero_init=True, additional_buffer_factor=1.5):
    gpus = num_nodes * num_gpus_per_node
    largest = 4 * largest_layer_params
    if cpu_offload:
        gpu = largest if cpu_offload_params else largest + int(2 * total_params / gpus)
        return int(total_params * 18 / num_nodes * additional_buffer_factor), gpu, largest
    return int(largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor), \
        largest + int(18 * total_params / gpus), largest


def plan_stage(recipe, shape: Shape, lengths: Lengths, setup: Setup, stage: str) -> StagePlan:
    e = bytes_per_element(recipe, setup)
    D, I, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    kv = shape.kv_heads * shape.head_dim
    r = recipe.model.lora_r
    zo = setup.ds.get("zero_optimization", {})
    parts, notes = {}, {}

    # weights
    base = shape.params - trained_params(recipe, shape, stage)[0] * (stage == "think" and recipe.think.method == "full")
    if setup.zero == 3:
        gathered = shape.largest_module + int(zo.get("stage3_prefetch_bucket_size", DS_DEFAULT_PREFETCH))
        sharded = (base - shape.vision_params) * e // setup.world
        parts["weights"] = shape.vision_params * e + gathered * e + (0 if setup.offload("param") else sharded)
        notes["weights"] = (f"frozen base, {e} B/param: vision tower whole, the rest 1/{setup.world}"
                            + (" offloaded to CPU" if setup.offload("param") else "") + ", + largest module and "
                            "prefetch bucket gathered (ZeRO-3)")
    else:
        parts["weights"] = base * e
        notes["weights"] = f"frozen base, {base / 1e9:.2f}B params x {e} B"

    # trained parameters, gradients, optimizer: DeepSpeed's estimator
    n_trained, largest_trained = trained_params(recipe, shape, stage)
    gpu, cpu, source = deepspeed_states(n_trained, largest_trained, setup)
    parts["trained params + grads + Adam"] = gpu
    notes["trained params + grads + Adam"] = f"{n_trained / 1e6:.1f}M trained params, {source}"

    # DeepSpeed's gradient bucket
    if setup.zero in (1, 2, 3) and zo.get("contiguous_gradients", True):
        elements = int(zo.get("reduce_bucket_size", DS_DEFAULT_BUCKET))
        if setup.device == "cpu":
            elements = min(elements, n_trained)  # torch.empty: untouched pages never become resident
        copies = 2 if zo.get("overlap_comm", setup.zero == 3) else 1
        width = 4 if setup.zero == 1 else e
        parts["DeepSpeed buffers"] = elements * width * copies
        notes["DeepSpeed buffers"] = f"{copies} gradient bucket(s) of {elements / 1e6:.0f}M elements"

    # SDPA keeps k / v for backward: on CUDA with a padding mask transformers repeats them to every
    # head first (its GQA path needs mask-free inputs there); on CPU it runs GQA on the kv heads.
    kv_sdpa = D if setup.device == "cuda" else kv
    per_token_layer = 8 * D + e * (4 * D + 2 * kv + 2 * kv_sdpa + 4 * I + 7 * r)
    if stage == "think":
        micro = recipe.think.micro_batch_size
        tokens = micro * lengths.think_row
        mask = micro * lengths.think_row ** 2          # SDPA's 4D bool mask of a padded batch
        parts["activations"] = tokens * L * per_token_layer + mask
        notes["activations"] = (f"{micro} rows x {lengths.think_row} tokens x {L} layers x "
                                f"{per_token_layer / 1024:.1f} KiB, + the [B, 1, T, T] attention mask")
        predicted = micro * (lengths.trace + 1)
        per_entry = 12  # at the loss's backward: the saved fp32 log-softmax, its gradient, the logits' gradient
        parts["logits"] = predicted * V * per_entry
        notes["logits"] = f"{predicted} trace tokens x {V} vocabulary x {per_entry} B"
        rows = f"{micro} rows of {lengths.think_row} tokens"
    else:
        emb = recipe.embed
        local = emb.batch_size // setup.world
        chunk = min(emb.gradcache_chunk or local, local)
        per_query = 1 + int(emb.hard_negatives)
        split = L if recipe.model.mode == "activated" else L - (recipe.model.embed_layers or max(1, L // 4))
        top = L - split
        seq = lengths.query_row + per_query * lengths.target_row          # one row's tokens, all groups
        kv_token = 2 * kv * e * split + (D * e if recipe.model.mode == "top_k" else 0)
        kept_rows = local if emb.gradcache_keep_prefix else chunk
        parts["KV cache kept"] = kept_rows * seq * kv_token
        notes["KV cache kept"] = (f"{kept_rows} queries + {kept_rows * per_query} targets, {seq} tokens per "
                                  f"query and its targets, {kv_token / 1024:.1f} KiB per token")
        widest = max(chunk * lengths.query_row, chunk * per_query * lengths.target_row)
        longest = max(lengths.query_row, lengths.target_row)
        decoder = widest * (5 * D + 3 * I) * e + widest * longest       # one layer live, and the mask
        patches = chunk * per_query * lengths.images * lengths.image_tokens * PATCHES_PER_TOKEN
        vision = patches * (8 * shape.vision_width + 2 * shape.vision_mlp) * e
        prefill = max(decoder, vision)
        fed = 1 + lengths.invocation
        group_rows = chunk * (1 + per_query)
        if recipe.model.mode == "activated":
            with_grad = (group_rows * fed * L * per_token_layer
                         + chunk * seq * L * 2 * kv_sdpa * e)
        else:
            with_grad = chunk * seq * top * per_token_layer
        parts["chunk working set"] = max(prefill, with_grad)
        notes["chunk working set"] = (f"max(no-grad prefill {prefill / GIB:.2f} GiB (vision tower "
                                      f"{vision / GIB:.2f}), pass with grad {with_grad / GIB:.2f} GiB) for a "
                                      f"chunk of {chunk} rows")
        parts["embeddings"] = setup.world * local * (1 + per_query) * D * 4 * 3
        notes["embeddings"] = f"{setup.world * local} queries and their targets, fp32, with grads"
        if setup.device == "cpu" and lengths.images:  # encoded once per step, kept by GradCache (host memory on GPUs)
            images = local * (1 + per_query) * lengths.images
            parts["pixel values"] = images * lengths.image_tokens * PATCHES_PER_TOKEN * PATCH_VALUES * 4
            notes["pixel values"] = f"{images} encoded images, fp32 patches (on GPUs this is host memory)"
        rows = (f"{local} queries per GPU in chunks of {chunk}; query {lengths.query_row}, target "
                f"{lengths.target_row} tokens")
    return StagePlan(stage, rows, parts, notes, cpu)


def plan(recipe, shape: Shape, lengths: Lengths, setup: Setup) -> list[StagePlan]:
    return [plan_stage(recipe, shape, lengths, setup, s) for s in recipe.stages]


def usable_bytes(setup: Setup) -> int:
    return int(setup.gpu_mem_gib * GIB * USABLE)


# ------------------------------------------------------------------------------------ knobs
@dataclass
class Knob:
    """One change to a run that shrinks a stage. `keeps_results`: the same batches, rows and
    model; only memory and speed change (these are tried first)."""
    label: str
    apply: object                 # (recipe, setup, lengths) -> None, in place
    keeps_results: bool = True


def knobs(recipe, setup: Setup, lengths: Lengths, stage: str) -> list[Knob]:
    """The knobs that apply to a stage in this state of the run."""
    out = []
    if stage == "embed":
        if recipe.embed.gradcache_keep_prefix:
            out.append(Knob("embed.gradcache_keep_prefix=false",
                            lambda r, s, ln: setattr(r.embed, "gradcache_keep_prefix", False)))
        chunk = recipe.embed.gradcache_chunk or recipe.embed.batch_size // setup.world
        if chunk > 1:
            out.append(Knob(f"embed.gradcache_chunk={max(1, chunk // 2)}",
                            lambda r, s, ln, c=max(1, chunk // 2): setattr(r.embed, "gradcache_chunk", c)))
    else:
        micro, local = recipe.think.micro_batch_size, recipe.think.batch_size // setup.world
        smaller = [d for d in range(1, micro) if local % d == 0 and d <= micro // 2]
        if smaller:
            out.append(Knob(f"think.micro_batch_size={smaller[-1]}",
                            lambda r, s, ln, m=smaller[-1]: setattr(r.think, "micro_batch_size", m)))
    ds_dir = Path(recipe.deepspeed).parent
    for name in ("zero3.json", "zero3_offload.json"):
        path = ds_dir / name
        offloads = name == "zero3_offload.json"
        if path.is_file() and (setup.zero != 3 or (offloads and not setup.offload("param"))):
            ds = json.loads(path.read_text())

            def use(r, s, ln, ds=ds, path=path):
                r.deepspeed, s.ds, s.ds_name = str(path), ds, str(path)
            out.append(Knob(f"deepspeed={path}", use))
    if lengths.images and lengths.image_tokens > 256:
        out.append(Knob(f"model.max_pixels={256 * 28 * 28} (256 image tokens: changes what the model sees)",
                        lambda r, s, ln: setattr(ln, "image_tokens", 256), keeps_results=False))
    return out


def fitting_changes(recipe, shape: Shape, lengths: Lengths, setup: Setup, stage: str,
                    steps: int = 6) -> list[tuple[str, int]]:
    """Knobs to turn, one after another, each the one that shrinks the stage most (those that keep
    the results first), until it fits or nothing helps. Returns [(label, total after it)]."""
    state = (copy.deepcopy(recipe), copy.deepcopy(setup), copy.deepcopy(lengths))
    current = plan_stage(*_args(state, shape), stage).total
    chosen = []
    for _ in range(steps):
        tried = []
        for knob in knobs(state[0], state[1], state[2], stage):
            trial = copy.deepcopy(state)
            knob.apply(*trial)
            tried.append((not knob.keeps_results, plan_stage(*_args(trial, shape), stage).total, knob.label, trial))
        helpful = [t for t in tried if t[1] < current]
        if not helpful:
            break
        pool = [t for t in helpful if not t[0]] or helpful   # results-preserving knobs first
        fits = [t for t in pool if t[1] <= usable_bytes(setup)]
        _, current, label, state = min(fits or pool)
        chosen.append((label, current))
        if current <= usable_bytes(setup):
            break
    return chosen


def _args(state, shape):
    recipe, setup, lengths = state
    return recipe, shape, lengths, setup
