"""Quantised frozen bases (QLoRA, METHODS.md §7): `model.quantize: nf4 | fp4 | int8`.

The quantisation itself is bitsandbytes' (Linear4bit / Linear8bitLt), applied by transformers'
loader through `BitsAndBytesConfig` — the same path for a pretrained model (`from_pretrained`
quantises while loading, so the full-precision model never exists in memory) and for a
random-init one (saved to a temporary folder and loaded back through the loader). Checked on
the CPU with bitsandbytes 0.50.2 / transformers 5.23: nf4, fp4 and int8 load, train LoRA
(gradients flow through the frozen quantised matmuls) and a saved quantised folder reloads
bit-equal. Embeddings, norms and the LM head stay unquantised (transformers skips the output
embedding), in the dtype `models.weights_dtype` gives: fp32 on a CPU, bf16 on a GPU. The
4-bit compute dtype is bf16 on a GPU and fp32 on a CPU.

Ours, because no library does it on the CPU:
- `loftq_init`: peft's LoftQ (`init_lora_weights="loftq"`, `replace_lora_weights_loftq`) moves
  every weight to CUDA/XPU for its SVD and cannot run on a CPU; here the same one-step
  initialisation as peft's `replace_lora_weights_loftq` — the base keeps bitsandbytes' own
  quantisation Q(W) (so it reloads identically), and B·A·scale is the best rank-r
  approximation of W − Q(W) (truncated SVD) — with the LoRA scaling taken into account.
- `dequantize`: transformers' `model.dequantize()` replaces the bnb layers of a plain model;
  it is used for `export --merge`, before the adapter is loaded onto the (now plain) base.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import ConfigError

KINDS = ("nf4", "fp4", "int8")
# methods that train or rewrite the base weights themselves: 4-/8-bit weights have no gradient
# and cannot be merged into in place. Any method not marked `quantized_base` is refused too.
WHY_NOT = {
    "full": "full fine-tuning trains every base weight, and quantised weights cannot train",
    "freeze": "freeze-tuning trains the top layers' base weights, and quantised weights cannot train",
    "lisa": "LISA trains whole base layers, and quantised weights cannot train",
    "pissa": "PiSSA rewrites the base weights to the SVD residual, which peft only does on float weights "
             "(use method.init: loftq with lora for a quantisation-aware start)",
    "tied-lora": "tied-LoRA is saved merged into the base weights, which cannot be done in place on quantised weights",
}


def check_config(cfg, methods: dict) -> None:
    """Refuse a quantised base with a method (or init) that cannot run on one; `methods` is the
    method registry (config.py passes it: this module never imports methods/, which imports it)."""
    q, name = cfg.model.quantize, cfg.method.name
    init = getattr(cfg.method, "init", None)
    if q is None:
        if init == "loftq":
            raise ConfigError("config key 'method.init': loftq initialises the adapter against a quantised base; "
                              "set model.quantize (nf4, fp4 or int8) or use method.init: default")
        return
    if q not in KINDS:
        raise ConfigError(f"config key 'model.quantize': {q!r} is not one of {', '.join(KINDS)} (or leave it unset)")
    method = methods.get(name)
    if method is not None and not getattr(method, "quantized_base", False):
        why = WHY_NOT.get(name, f"method {name!r} has not been made to run on a quantised base")
        ok = ", ".join(n for n, m in methods.items() if getattr(m, "quantized_base", False))
        raise ConfigError(f"config key 'model.quantize': {why}; with a quantised base use one of: {ok} "
                          "(or remove model.quantize)")
    if init == "loftq" and getattr(cfg.method, "dora", False):
        raise ConfigError("config key 'method.init': loftq with DoRA is not supported (DoRA's magnitude is set from "
                          "the weights before the adapter is initialised); use lora or rslora")


def bnb_config(kind: str, device: torch.device, double_quant: bool = True):
    """transformers' BitsAndBytesConfig for `model.quantize` = kind."""
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute)


def load_kwargs(cfg, device: torch.device) -> dict:
    """Extra `from_pretrained` keyword arguments: the quantisation config, when asked for."""
    if not cfg.model.quantize:
        return {}
    _quiet_bnb()
    return {"quantization_config": bnb_config(cfg.model.quantize, device, cfg.model.double_quant)}


def quantize_model(model, quantization_config, dtype: torch.dtype, keep_full_precision: bool = False):
    """A random-init (or otherwise in-memory) model quantised by transformers' loader: saved to a
    temporary folder and loaded back with the BitsAndBytesConfig. `keep_full_precision`: keep the
    original weights (`model._full_precision`) for LoftQ's initialisation."""
    from transformers import AutoModelForCausalLM

    _quiet_bnb()
    with tempfile.TemporaryDirectory(prefix="budgetune-quantize-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        full = {k: v.detach().clone() for k, v in model.state_dict().items()} if keep_full_precision else None
        name = model.config._name_or_path
        quantized = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, use_safetensors=True,
                                                         quantization_config=quantization_config)
    quantized.config._name_or_path = quantized.name_or_path = name  # not the temporary folder
    quantized._full_precision = full
    return finish(quantized)


def finish(model, source: str | None = None):
    """Settings every quantised model gets after loading; `source`: the folder of its full-precision
    safetensors (LoftQ reads the original weights from there)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # bitsandbytes' CPU inference fast path (eval + no_grad on AVX512-BF16 machines) repacks the
            # weight in place, un-nests the double-quantised constants and needs out_features % 32 == 0;
            # one format for training and evaluation keeps memory, results and checkpoints consistent
            module.support_avx512bf16_for_cpu = False
    # the unquantised tensors (embeddings, norms, head) come out of from_pretrained as views of the
    # memory-mapped safetensors file, which keeps the whole mapping — and every page of the
    # full-precision weights read while quantising — resident: own copies let the mapping go
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                continue
            for name, p in module.named_parameters(recurse=False):
                p.data = p.data.clone()
            for name, b in module.named_buffers(recurse=False):
                if b is not None:
                    b.data = b.data.clone()
    if source is not None and not hasattr(model, "_full_precision"):
        model._full_precision = source
    return model


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: a packed 4-bit weight holds two per byte (its quant_state knows the shape)."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def dequantized_weight(layer) -> torch.Tensor:
    """The float weight a bnb layer computes with (fp32)."""
    import bitsandbytes as bnb

    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB).float()
    return w.detach().float()


def dequantize(model):
    """A plain float model from a quantised one (transformers' `dequantize`: bnb layers → nn.Linear)."""
    if not is_quantized(model):
        return model
    model = model.dequantize()
    # transformers 5.23 keeps the loader's 4-bit deserialisation step after dequantize(), and saving
    # would try (and fail) to reverse it: drop the steps that cannot be reversed
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if _reversible(c)]
    return model


def _reversible(conversion) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


# --- LoftQ -------------------------------------------------------------------------------------


def _weight_reader(source):
    """name → full-precision tensor, from a state dict or a folder of safetensors files."""
    if isinstance(source, dict):
        return source.__getitem__
    from safetensors import safe_open

    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"config key 'method.init': loftq needs the full-precision weights as safetensors, none in {source}")
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                where[key] = f

    def read(name: str) -> torch.Tensor:
        if name not in where:
            raise ConfigError(f"config key 'method.init': loftq found no weight {name!r} in {source}")
        with safe_open(str(where[name]), framework="pt") as st:
            return st.get_tensor(name)

    return read


@torch.no_grad()
def loftq_init(peft_model, adapter: str = "default") -> int:
    """Set every LoRA pair on a quantised linear so that Q(W) + scale·B·A is the best rank-r
    approximation of W (module doc); returns how many layers were initialised."""
    import bitsandbytes as bnb

    base = peft_model.get_base_model()
    source = getattr(base, "_full_precision", None)
    if source is None:
        raise ConfigError("config key 'method.init': loftq needs the full-precision weights of model.name (a local "
                          "folder of safetensors) or a scratch model")
    read = _weight_reader(source)
    prefix = "base_model.model."
    done = 0
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter not in lora_a:
            continue
        layer = module.get_base_layer()
        if not isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        w = read(name[len(prefix):] + ".weight").float()
        residual = w - dequantized_weight(layer)
        r, scale = module.r[adapter], module.scaling[adapter]
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = (s[:r] / scale).sqrt()
        a, b = lora_a[adapter].weight, module.lora_B[adapter].weight
        a.copy_((root[:, None] * vh[:r]).to(a.dtype))
        b.copy_((u[:, :r] * root[None, :]).to(b.dtype))
        done += 1
    if not done:
        raise ConfigError("config key 'method.init': loftq found no LoRA layer on a quantised linear; check method.target_modules")
    if isinstance(source, dict):
        base._full_precision = None  # the copy is no longer needed
    return done


def _quiet_bnb() -> None:
    # int8 on the CPU warns on every matmul that it casts fp32 inputs to fp16 (by design), and
    # bitsandbytes logs at import that an optional CPU kernel package is absent
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
