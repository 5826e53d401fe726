"""Peak memory of one training step, predicted from the model config and the recipe.

    estimate_memory(config, recipe, device_type="cpu") -> MemoryEstimate

The model
---------
The peak is *not* the sum of every buffer: activations are freed during backward while
gradients are being created, so the two never exist in full at the same time. The
estimate therefore walks the step in the order `train.py` runs it and takes the largest
of these moments (steady state, i.e. from the second optimizer step on, when the AdamW
moments already exist):

1. **loss** — end of forward: weights + optimizer states + every saved activation + the
   logits and the loss buffers (`lm_loss.token_losses`: the [B,T,V] logits, the
   non-contiguous `logits[:, :-1]` flattened into a copy, the log-softmax output that
   cross-entropy saves; in backward the same three-buffer peak recurs as the nll grad,
   the log-softmax grad and the saved output).
2. **backward, layer i** (top to bottom) — the saved activations of layers ≤ i, the
   gradients of everything above i, and one layer's backward workspace. Activations
   shrink and gradients grow layer by layer, so the maximum sits at the top or bottom.
3. **optimizer step** — weights + all gradients + states + the optimizer's temporaries.

With gradient accumulation > 1 the gradients exist in full during every micro-batch
after the first, so they are added to phases 1–2.

Terms (bytes), as resident at the predicted peak — `total` is their sum:

* `weights` — parameters × dtype size: fp32 on CPU and for full FT on CUDA (fp32 master
  weights under bf16 autocast); an adapter method's frozen base is bf16 on CUDA
  (`models.weights_dtype`), its adapter stays fp32. ZeRO-3: ÷ world size.
  A quantised base (`model.quantize`, QLoRA; `quantized_weight_bytes`): the decoder layers'
  linear weights in 4 bits (0.5 B/param) plus their absmax constants (one per 64-block: fp32,
  4/64 B/param; with double quantisation an 8-bit absmax, 1/64 B/param, plus an fp32 constant
  per 256 absmax) — or int8: 1 B/param plus an fp32 scale per output row; everything else
  (embeddings, LM head, norms, biases) unquantised at the frozen-base dtype.
* `gradients` — fp32, trainable parameters only; ZeRO ≥ 2: ÷ world size.
* `optimizer_states` — AdamW: 2 fp32 moments per trainable parameter; SGD with momentum:
  1; ZeRO ≥ 1: ÷ world size.
* `activations` — tensors autograd saves for backward, per decoder layer per token
  (coefficients below), × layers, or with gradient checkpointing: one hidden state per
  layer boundary + one layer recomputed in full during its backward.
* `attention_mask` — our rows always carry a mask (packed rows: the block-diagonal mask
  transformers builds from position_ids; padded rows: the padding mask), a [B,1,T,T]
  bool tensor. SDPA converts it to an additive float mask *in every layer* and saves
  that for backward: B·T²·(activation bytes) per layer. Under checkpointing only the
  bool mask is saved (the conversion is recomputed).
* `logits_loss` — see phase 1: 3 × B·T·V × 4 bytes (fp32 on CPU; on CUDA the bf16 logits,
  their bf16 flat copy and the fp32 `.float()` copy/log-softmax/grads give about the same).
* `workspace` — transients: a layer's backward temporaries (≈ one [B,T,max(I, 3H)]
  buffer), with pure bf16 on the CPU torch-optimi's AdamW temporaries (`sqrt` and the
  division, 2 × the largest parameter; torch's own AdamW runs fused, in place, everywhere), and
  under ZeRO-3 one gathered layer of full weights; with a quantised base, the dequantisation
  workspace: each quantised matmul dequantises its weight to the compute dtype (fp32 on CPU,
  bf16 on CUDA) for forward and again in backward, one [out, in] weight at a time — the
  largest linear of a layer, counted in the backward moments.
* `comm_buffers` — plain data parallel (world > 1, ZeRO 0): DDP's gradient buckets, a
  second copy of the gradients that lives for the whole run (accelerate leaves
  `gradient_as_bucket_view` off). DeepSpeed's own reduce buckets are not modelled.
* `runtime` — what the first steps cost above the post-import baseline whatever the
  model: OpenMP/oneDNN thread pools and kernel caches, the module objects, the autograd
  engine. 16 MiB on CPU (15–21 MB measured for a 1-layer, 64-wide model, full FT and LoRA);
  0 on CUDA, where `overhead` covers it.
* `overhead` — the process/framework memory outside the step: `overhead_bytes` when given
  (the calibration probe passes the measured post-import baseline); otherwise a default:
  CPU 400 MiB (RSS of Python + torch + transformers + peft after import: 350–370 MB
  measured on torch 2.13 / transformers 5.23), CUDA 1 GiB (context, cuBLAS workspace and
  caching-allocator slack, which `max_memory_allocated` does not see).

Activation coefficients (elements per token per layer, no checkpointing) were read off
the tensors autograd actually saves (`torch.autograd.graph.saved_tensors_hooks` on
transformers 5.23, SDPA). Rotary embeddings save nothing large (cos/sin do not require
grad); with a mask, transformers repeats K/V to all heads before SDPA.

* Llama family (llama, mistral, qwen2 and, as an approximation, anything else):
  6H (layer input, RMSNorm's normalised and scaled outputs, twice) + q, k, v, out of SDPA
  (nh·hd each; k, v at nkv·hd when there is no mask) + nh (log-sum-exp) + 4I (gate, up,
  SiLU(gate), their product).
* GPT-NeoX (parallel residual): 10H (input, 2 LayerNorm outputs, the fused QKV output
  that v views into (3H), rotated q and k, attention output and its reshaped copy) + nh +
  2I (dense_h_to_4h output and its GELU).
* LoRA adds r per adapted linear (lora_A's output, saved by lora_B).

The fast path (issue 19; attention.py, fastpath.py) changes four terms:
* `train.precision` pure-bf16: weights and gradients 2 bytes per parameter, AdamW states
  3 × 2 bytes (two bf16 moments + torch-optimi's bf16 Kahan compensation), activations bf16,
  no autocast weight copies.
* flash-attn varlen / FlexAttention (`recipe.attention`): no [B,1,T,T] mask in any form, and
  K/V saved at the key-value heads (no repeat_kv).
* Liger's fused linear + cross-entropy (`recipe.fused_loss`): no full logits
  (`liger_loss_bytes`).
* torch.compile is not modelled (inductor may save fewer activations: the GPU suite measures it).

Accuracy on CPU is measured by `benchmarks/planner_accuracy.py` (docs/benchmarks.md).
The CUDA numbers (bf16 activations, the autocast weight-cast cache) follow the same model
but are not calibrated on a GPU.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field

from ..attention import MASK_FREE
from ..layers import decoder_layers
from .recipe import Recipe, prepare_method

MiB = 2**20
DEFAULT_OVERHEAD = {"cpu": 400 * MiB, "cuda": 1024 * MiB}
RUNTIME = {"cpu": 16 * MiB, "cuda": 0}  # first-step costs above the post-import baseline (module doc)
# fp8: 1 byte + 8 per 256-group, per moment; 8-bit (bitsandbytes): 1 byte + a 4-byte absmax per 256-block
STATE_COPIES = {"adamw": 2, "sgd": 1, "lomo": 0, "adamw_fp8": 2 * (1 + 8 / 256) / 4, "adamw8bit": 2 * (1 + 4 / 256) / 4}
LORA_FAMILY = ("lora", "rslora", "dora", "loraplus", "pissa")  # same adapter shapes (DoRA adds a magnitude vector); DoRA's
# extra activations (the weight-norm of W + BA per layer) are not modelled  # fp32 optimizer states per trainable parameter
# optimizers whose states are counted per matrix by galore_state_elements (low-rank projections)
PROJECTED = ("galore", "frugal", "apollo", "apollo_mini", "gum", "natural_galore")
TERMS = ("weights", "gradients", "optimizer_states", "activations", "attention_mask", "logits_loss", "workspace",
         "comm_buffers", "runtime", "overhead")


@dataclass
class MemoryEstimate:
    terms: dict[str, int]  # bytes resident at the predicted peak; total = their sum
    peak_at: str = ""  # the moment of the step where the peak falls
    sizes: dict[str, int] = field(default_factory=dict)  # full size of each component, resident or not
    parameters: int = 0
    trainable: int = 0

    @property
    def total(self) -> int:
        return int(sum(self.terms.values()))

    @property
    def step_bytes(self) -> int:
        """The peak without the framework overhead: what the training step itself adds."""
        return self.total - self.terms.get("overhead", 0)

    def describe(self) -> str:
        lines = []
        for name, value in self.terms.items():
            full = self.sizes.get(name)
            extra = f"  (of {_human(full)})" if full is not None and full != value else ""
            lines.append(f"{name:<17} {_human(value):>10}{extra}")
        lines.append(f"{'total':<17} {_human(self.total):>10}  peak at {self.peak_at}")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# --- architecture from the config -------------------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    name: str  # module path inside a decoder layer, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class _Arch:
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    parameters: int  # all, shared tensors once
    layer_parameters: int  # one decoder layer
    embedding_parameters: int  # input embedding (= lm_head when tied)
    head_parameters: int  # lm_head when untied, else 0
    largest_parameter: int  # numel of the largest single tensor
    layer_largest_parameter: int
    layer_linears: tuple[_Linear, ...]  # nn.Linear modules of one decoder layer


def _field(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _config_key(config) -> str:
    d = config.to_dict()
    return json.dumps({k: v for k, v in d.items() if not k.startswith("_")}, sort_keys=True, default=str)


def architecture(config) -> _Arch:
    """Shapes and exact parameter counts, from a model built on the meta device (no memory)."""
    return _architecture(_config_key(config), config)


_ARCH_CACHE: dict[str, _Arch] = {}  # configs are not hashable; keyed by their JSON


def _architecture(key: str, config) -> _Arch:
    if key in _ARCH_CACHE:
        return _ARCH_CACHE[key]
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    unique = {id(p): p for p in model.parameters()}
    layers = decoder_layers(model)
    layer = layers[0]
    layer_params = list(layer.parameters())
    linears = tuple(
        _Linear(name, m.in_features, m.out_features) for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
    )
    hidden = config.hidden_size
    heads = config.num_attention_heads
    arch = _Arch(
        family="gpt_neox" if config.model_type == "gpt_neox" else "llama",
        hidden=hidden,
        intermediate=_field(config, "intermediate_size", default=4 * hidden),
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=_field(config, "num_key_value_heads", default=heads),
        head_dim=_field(config, "head_dim", default=hidden // heads),
        vocab=config.vocab_size,
        tied=tied,
        parameters=sum(p.numel() for p in unique.values()),
        layer_parameters=sum(p.numel() for p in layer_params),
        embedding_parameters=embedding.numel(),
        head_parameters=0 if tied or head is None else head.weight.numel(),
        largest_parameter=max(p.numel() for p in unique.values()),
        layer_largest_parameter=max(p.numel() for p in layer_params),
        layer_linears=linears,
    )
    _ARCH_CACHE[key] = arch
    return arch


def lora_linears(arch: _Arch, targets: tuple[str, ...]) -> list[_Linear]:
    """The linears of one decoder layer that peft's LoRA adapts for `targets`.

    "all-linear": every nn.Linear except the output layer (peft skips the lm_head, which is
    outside the decoder layers anyway). Otherwise peft matches a name exactly or as the last
    component(s) of the module path; we accept glob patterns too.
    """
    if tuple(targets) == ("all-linear",):
        return list(arch.layer_linears)
    out = []
    for lin in arch.layer_linears:
        if any(lin.name == t or lin.name.endswith("." + t) or fnmatch.fnmatch(lin.name, t) for t in targets):
            out.append(lin)
    return out


QUANT_BLOCK = 64  # bitsandbytes' 4-bit block size (one absmax per block)
QUANT_BLOCK2 = 256  # double quantisation: absmax values per second-level block


def quantized_weight_bytes(arch: _Arch, kind: str, double_quant: bool = True) -> tuple[int, int]:
    """(bytes of the quantised linear weights with their constants, parameters quantised): every
    nn.Linear of the decoder layers (transformers' bnb loader skips the LM head)."""
    linears = [(lin.in_features, lin.out_features) for lin in arch.layer_linears] * arch.layers
    n = sum(i * o for i, o in linears)
    if kind == "int8":
        return n + sum(4 * o for _, o in linears), n  # 1 byte each + an fp32 scale per output row
    if kind not in ("nf4", "fp4"):
        raise ValueError(f"memory model: unknown quantisation {kind!r}")
    total = 0
    for i, o in linears:
        blocks = -(-i * o // QUANT_BLOCK)
        if double_quant:  # 8-bit absmax + fp32 absmax of each 256 of them, a 256-entry fp32 code and an offset
            constants = blocks + 4 * -(-blocks // QUANT_BLOCK2) + 4 * 256 + 4
        else:
            constants = 4 * blocks
        total += (i * o + 1) // 2 + constants + 4 * 16  # + the 16-entry fp32 code of the 4-bit type
    return total, n


def trainable_parameters(arch: _Arch, recipe: Recipe) -> int:
    if recipe.method == "full":
        return arch.parameters
    if recipe.method == "badam":  # one decoder layer at a time; embeddings, head and final norm frozen
        return arch.layer_parameters
    if recipe.method == "lisa":
        gamma = min(arch.layers, recipe.extra.get("method_options", {}).get("layers", 2))
        return arch.parameters - (arch.layers - gamma) * arch.layer_parameters
    if recipe.method == "freeze":
        opts = recipe.extra.get("method_options", {})
        k = min(arch.layers, opts.get("layers", 2))
        head = (arch.head_parameters or arch.embedding_parameters) if opts.get("head") else 0
        return k * arch.layer_parameters + final_norm_parameters(arch) + head
    if recipe.method in LORA_FAMILY:
        linears = lora_linears(arch, recipe.lora_targets)
        dora = arch.layers * sum(lin.out_features for lin in linears) if recipe.method == "dora" else 0  # magnitude vectors
        return arch.layers * sum(recipe.lora_r * (lin.in_features + lin.out_features) for lin in linears) + dora
    raise ValueError(f"memory model: no formula for method {recipe.method!r}")


def final_norm_parameters(arch: _Arch) -> int:
    return arch.parameters - arch.layers * arch.layer_parameters - arch.embedding_parameters - arch.head_parameters


def galore_state_elements(arch: _Arch, recipe: Recipe, trainable: int) -> int:
    """GaLore (optim/galore.py), APOLLO (optim/apollo.py: its random projection is stored as
    GaLore's SVD one is; APOLLO-Mini is rank 1) and FRUGAL's svd/random subspaces (optim/frugal.py): matrices
    larger than the rank keep Adam moments of their r × max(m, n) projection plus the
    projection itself (min(m, n) × r); the rest plain Adam. FRUGAL blocks: see below.
    Natural GaLore (optim/natural_galore.py) adds its window of `history` projected gradients
    (history × r × max(m, n)). GUM (optim/gum.py) keeps one momentum: of the projection, or of
    the whole matrix for the sampled share q (the expectation is counted), and of whole small
    matrices."""
    rank = 1 if recipe.optimizer == "apollo_mini" else recipe.extra.get("galore_rank", 128)
    if recipe.method != "full":
        return 2 * trainable
    if recipe.optimizer == "frugal" and recipe.extra.get("frugal_subspace") == "blocks":
        # Adam moments for a `density` share of the matrices at a time, none for the rest
        matrix_params = arch.layers * sum(lin.in_features * lin.out_features for lin in arch.layer_linears)
        matrix_params += arch.embedding_parameters + arch.head_parameters
        return int(2 * recipe.extra.get("frugal_density", 0.25) * matrix_params) + 2 * (trainable - matrix_params)
    matrices = [(lin.in_features, lin.out_features) for lin in arch.layer_linears] * arch.layers
    matrices.append((arch.vocab, arch.hidden))  # input embedding (the lm_head too when tied)
    if arch.head_parameters:
        matrices.append((arch.vocab, arch.hidden))
    gum, q = recipe.optimizer == "gum", recipe.extra.get("frugal_density", 0.25)
    moments = 2 + (recipe.extra.get("natural_history", 10) if recipe.optimizer == "natural_galore" else 0)
    elements, projected = 0, 0
    for a, b in matrices:
        if min(a, b) > rank and gum:
            elements += round((1 - q) * rank * max(a, b) + q * a * b) + rank * min(a, b)
            projected += a * b
        elif min(a, b) > rank:
            elements += moments * rank * max(a, b) + rank * min(a, b)
            projected += a * b
        elif gum:  # full-rank Muon: one momentum
            elements += a * b
            projected += a * b
    return elements + 2 * (trainable - projected)


def counted_trainable_parameters(config, recipe: Recipe) -> int:
    """Trainable parameters of any adapter method, counted on a meta-device model with the method applied."""
    import torch
    from transformers import AutoModelForCausalLM


    with torch.device("meta"):
        model = prepare_method(AutoModelForCausalLM.from_config(config), recipe)
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


# --- activations ---------------------------------------------------------------------------------


def layer_activation_elements(arch: _Arch, masked: bool, lora_r: int = 0, n_lora: int = 0) -> int:
    """Elements autograd saves per token in one decoder layer (no checkpointing), without the mask."""
    h, i, nh = arch.hidden, arch.intermediate, arch.heads
    q = nh * arch.head_dim
    if arch.family == "gpt_neox":
        n = 10 * h + nh + 2 * i
    else:
        kv = q if masked or arch.kv_heads == nh else arch.kv_heads * arch.head_dim  # repeat_kv with a mask
        n = 6 * h + 2 * q + 2 * kv + nh + 4 * i
    return n + lora_r * n_lora


def post_activation_elements(arch: _Arch) -> int:
    """Per token after the last layer: the final norm's input and outputs (the lm_head's input)."""
    return (2 if arch.family == "gpt_neox" else 3) * arch.hidden


def liger_loss_bytes(arch: _Arch, tokens: int, act: int) -> int:
    """Liger's fused linear + cross-entropy: no full logits. It walks the tokens in chunks sized so
    that a chunk's logits are about as large as the hidden states (chunk = next power of two of
    tokens / ⌈V / H⌉), and computes the input and weight gradients during forward: a [tokens, H]
    gradient, a [V, H] weight gradient, and one chunk's logits with their gradient (fp32)."""
    per = max(1, -(-arch.vocab // arch.hidden))
    chunk = 1 << max(0, (-(-tokens // per) - 1).bit_length())
    return tokens * arch.hidden * act + arch.vocab * arch.hidden * act + 2 * min(tokens, chunk) * arch.vocab * 4


# --- the estimate --------------------------------------------------------------------------------


def estimate_memory(config, recipe: Recipe, device_type: str = "cpu", overhead_bytes: int | None = None) -> MemoryEstimate:
    """Predicted peak memory of a training step of `recipe` on a model with `config` (see module doc)."""
    if recipe.optimizer not in STATE_COPIES and recipe.optimizer not in PROJECTED:
        raise ValueError(f"memory model: unknown optimizer {recipe.optimizer!r}")
    arch = architecture(config)
    cuda = device_type == "cuda"
    lisa = recipe.method == "lisa"  # full-precision weights like full FT, but γ layers train at a time
    freeze = recipe.method == "freeze"  # full-precision weights; only the top layers train (and keep activations)
    badam = recipe.method == "badam"  # full-precision weights; one decoder layer trains at a time
    adapter = recipe.method not in ("full", "lisa", "freeze", "badam")
    world = max(1, recipe.world_size)
    zero = recipe.zero_stage if world > 1 else 0
    b, t = recipe.micro_batch, recipe.seq_len
    tokens = b * t

    # weights: models.weights_dtype — bf16 frozen base only for adapters on CUDA
    # a formula for full FT and the LoRA family; other adapters are counted (their small
    # activations are not modelled, as for DoRA's weight norm)
    formula = recipe.method in ("full", "lisa", "freeze", "badam") or recipe.method in LORA_FAMILY
    trainable = trainable_parameters(arch, recipe) if formula else counted_trainable_parameters(config, recipe)
    pure = recipe.precision == "pure-bf16"  # every weight, gradient and state in bf16
    base_bytes = 2 if (cuda and adapter) or pure else 4
    weights = arch.parameters * base_bytes + (trainable * (2 if pure else 4) if adapter else 0)
    dequant_ws = 0
    if recipe.quantize and adapter:  # QLoRA: the decoder linears quantised, the rest at base_bytes
        q_bytes, q_params = quantized_weight_bytes(arch, recipe.quantize, recipe.extra.get("double_quant", True))
        weights += q_bytes - q_params * base_bytes
        dequant_ws = max(lin.in_features * lin.out_features for lin in arch.layer_linears) * base_bytes
    total_params = arch.parameters + (trainable if adapter else 0)
    if cuda and recipe.precision == "bf16-mixed" and not adapter:
        weights += 2 * arch.parameters  # autocast caches a bf16 copy of each weight for the step
    if zero >= 3:
        weights //= world
    grad_per_param = 2 if pure else 4
    if recipe.optimizer in PROJECTED:
        states = 4 * galore_state_elements(arch, recipe, trainable)
    elif pure and recipe.optimizer == "adamw":  # torch-optimi: two bf16 moments + the bf16 Kahan compensation
        states = 3 * 2 * trainable
    else:
        states = int(STATE_COPIES[recipe.optimizer] * 4 * trainable)
    if zero >= 1:
        states //= world
    grad_shard = world if zero >= 2 else 1

    def grads(n_params: int) -> int:
        return n_params * grad_per_param // grad_shard

    # gradient bytes per region (what backward has produced so far)
    if adapter:
        g_layer, g_head, g_embed = trainable // arch.layers, 0, 0
    else:
        g_layer, g_embed = arch.layer_parameters, arch.embedding_parameters
        g_head = arch.parameters - arch.layers * arch.layer_parameters - arch.embedding_parameters  # lm_head + final norm
        if badam:  # the active layer's gradients (spread over the stack: its place varies); no head, no embedding
            g_layer, g_head, g_embed = trainable // arch.layers, 0, 0
        if lisa:  # only the active layers' share of the layer gradients, spread over the stack
            g_layer = (trainable - g_embed - g_head) // arch.layers
        if freeze:  # the top layers' gradients; the head's only when it trains
            g_head = trainable - min(arch.layers, recipe.extra.get("method_options", {}).get("layers", 2)) * arch.layer_parameters
            g_embed = 0
    g_total = grads(trainable)
    if recipe.optimizer == "lomo" or recipe.extra.get("layerwise"):  # each gradient is applied and freed as soon as it is complete
        g_layer = g_head = g_embed = 0
        g_total = grads(arch.largest_parameter)

    # activations
    act = 2 if (cuda and recipe.precision == "bf16-mixed") or pure else 4
    # packed rows get a block-diagonal mask, padded rows a padding mask (module doc) — except with
    # flash-attn varlen or FlexAttention, which take the boundaries without a dense mask (and K/V unrepeated)
    masked = recipe.attention not in MASK_FREE
    n_lora = len(lora_linears(arch, recipe.lora_targets)) if recipe.method in LORA_FAMILY else 0
    per_layer = tokens * layer_activation_elements(arch, masked, recipe.lora_r if n_lora else 0, n_lora) * act
    rotary = 2 * (tokens if recipe.packed else t) * arch.head_dim * 4  # cos/sin, shared by all layers
    post = tokens * post_activation_elements(arch) * act
    float_mask = b * t * t * act if masked else 0  # per layer, saved by SDPA
    bool_mask = b * t * t if masked else 0
    # lm_loss.token_losses: [tokens, V] fp32 logits, a float copy and the log-softmax — or, with
    # the chunked head + loss of large vocabularies, those three for one chunk of tokens at a time
    from ..lm_loss import loss_chunk

    chunk = loss_chunk(config)
    logits = 3 * (min(tokens, chunk) if chunk else tokens) * arch.vocab * 4
    if recipe.fused_loss:
        logits = liger_loss_bytes(arch, tokens, act)
    layer_ws = tokens * max(arch.intermediate, 3 * arch.hidden) * act
    if recipe.gradient_checkpointing:
        saved_per_layer, mask_per_layer = tokens * arch.hidden * act, 0
        recomputed = per_layer  # its float mask is counted under attention_mask, in backward
        mask_resident = bool_mask
    else:
        saved_per_layer, mask_per_layer, recomputed, mask_resident = per_layer, float_mask, 0, 0
    # torch's AdamW is fused (in place, no temporaries) on CPU and CUDA; torch-optimi's Kahan AdamW (pure bf16) on
    # the CPU keeps per-tensor temporaries: sqrt + division of the largest trainable tensor
    largest = arch.layer_largest_parameter if badam else arch.largest_parameter if not adapter else max(
        [recipe.lora_r * max(lin.in_features, lin.out_features) for lin in lora_linears(arch, recipe.lora_targets)] or [0])
    opt_ws = 2 * 4 * largest if (not cuda and pure and recipe.optimizer == "adamw") else 0
    zero3_ws = arch.layer_parameters * base_bytes if zero >= 3 else 0
    g_accum = g_total if recipe.grad_accum > 1 else 0
    comm = 4 * trainable if (world > 1 and zero == 0) else 0

    L = arch.layers
    # layers that keep activations for backward: all of them, but with freeze-tuning only the top
    # ones (nothing below them needs a gradient, so autograd records nothing there)
    L_grad = min(L, recipe.extra.get("method_options", {}).get("layers", 2)) if freeze else L
    sizes = {
        "weights": weights, "gradients": g_total, "optimizer_states": states,
        "activations": L_grad * saved_per_layer + rotary + post + recomputed,
        "attention_mask": L_grad * mask_per_layer + mask_resident, "logits_loss": logits,
    }
    # the moments of the step (module doc): name → resident terms
    moments: dict[str, dict[str, int]] = {
        "loss (end of forward)": dict(
            gradients=g_accum, activations=L_grad * saved_per_layer + rotary + post,
            attention_mask=L_grad * mask_per_layer + mask_resident, logits_loss=logits, workspace=0),
    }
    for i in reversed(range(L - L_grad, L)):
        above = grads(g_head + (L - 1 - i) * g_layer)
        below = i + 1 - (L - L_grad)  # layers whose saved activations are still held
        moments[f"backward, layer {i}"] = dict(
            gradients=max(g_accum, above),
            activations=below * saved_per_layer + rotary + recomputed,
            attention_mask=below * mask_per_layer + mask_resident + (float_mask if recipe.gradient_checkpointing else 0),
            logits_loss=0, workspace=layer_ws + zero3_ws + dequant_ws)
    if not adapter and arch.tied:
        # the embedding's gradient is computed apart and added into the tied weight's .grad
        moments["backward, embedding"] = dict(gradients=g_total, activations=0, attention_mask=0, logits_loss=0,
                                              workspace=grads(g_embed))
    moments["optimizer step"] = dict(gradients=g_total, activations=0, attention_mask=0, logits_loss=0, workspace=opt_ws)

    peak_at, resident = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    overhead = overhead_bytes if overhead_bytes is not None else DEFAULT_OVERHEAD["cuda" if cuda else "cpu"]
    terms = {"weights": weights, "gradients": resident["gradients"], "optimizer_states": states,
             "activations": resident["activations"], "attention_mask": resident["attention_mask"],
             "logits_loss": resident["logits_loss"], "workspace": resident["workspace"], "comm_buffers": comm,
             "runtime": RUNTIME["cuda" if cuda else "cpu"], "overhead": int(overhead)}
    return MemoryEstimate(terms={k: int(v) for k, v in terms.items()}, peak_at=peak_at, sizes=sizes,
                          parameters=total_params, trainable=trainable)


# ---------------------------------------------------------------------------------------
# The CPU allocator's share: what RSS holds above the live tensors (issue 15)

# glibc's malloc with its default (dynamic) mmap threshold keeps freed heap memory: from the
# first large free on, tensors under 32 MiB come from the heap, and the holes a step's
# transient tensors leave are kept resident. Measured on the planner grid (docs/benchmarks.md,
# `benchmarks/planner_accuracy.py --glibc-default`), the RSS above the live-tensor peak is a
# fraction of the step's transient tensors — activations, attention masks, logits and loss
# buffers — that depends on what else fills the holes: full fine-tuning's gradients reuse much
# of them, an adapter's tiny gradients little, and checkpointing's recomputation adds its own.
# Fitted per (method kind, checkpointing) on 15 grid points: whole-process RSS within ±7.4%
# there; validated apart on `budgetune train` runs (docs/benchmarks.md).
ALLOCATOR_RETENTION = {(False, False): 0.40, (False, True): 0.79, (True, False): 0.92, (True, True): 1.38}  # (adapter, ckpt)


def glibc_default_allocator() -> bool:
    """True in a Linux glibc process whose mmap threshold is glibc's default (dynamic) one."""
    import os
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return "MALLOC_MMAP_THRESHOLD_" not in os.environ and "mmap_threshold" not in os.environ.get("GLIBC_TUNABLES", "")


def with_allocator(estimate: MemoryEstimate, recipe: Recipe, device_type: str = "cpu") -> MemoryEstimate:
    """`estimate` (live tensors) plus what the CPU allocator keeps resident: the number RSS shows.

    Adds the term `allocator` (0 on CUDA, whose peak is counted in allocated tensors, and on
    a CPU process that pins glibc's mmap threshold, where RSS follows the live tensors)."""
    if device_type != "cpu" or not glibc_default_allocator():
        return estimate
    transient = sum(estimate.sizes.get(k, 0) for k in ("activations", "attention_mask", "logits_loss"))
    adapter = recipe.method not in ("full", "lisa", "freeze")
    ratio = ALLOCATOR_RETENTION[(adapter, recipe.gradient_checkpointing)]
    terms = dict(estimate.terms, allocator=int(ratio * transient))
    return MemoryEstimate(terms=terms, peak_at=estimate.peak_at, sizes=estimate.sizes, parameters=estimate.parameters,
                          trainable=estimate.trainable)


def allocator_basis(estimate: MemoryEstimate) -> str:
    """One line on what the number is, for where it is printed."""
    held = estimate.terms.get("allocator", 0)
    if not held:
        return "live tensors at the step's peak + the process (RSS follows the tensors here)"
    return (f"live tensors at the step's peak + the process + {_human(held)} that glibc's allocator keeps of freed "
            "transient tensors (measured ratio, docs/benchmarks.md; MALLOC_MMAP_THRESHOLD_=131072 removes it, "
            "at a cost in speed)")
