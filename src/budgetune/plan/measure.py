"""Measure the peak memory of real training steps, in a fresh process.

    measure_step_memory(config_dict, recipe, device="cpu") -> {"peak_bytes", "baseline_bytes", "step_seconds", ...}

The step is the one `train.py` runs — forward, the loss exactly as `lm_loss.token_losses`
computes it, backward (scaled like train.py), gradient clipping, `optimizer.step()`,
`zero_grad(set_to_none=True)` — on a random-init model built from `config_dict`, with
the method, gradient checkpointing and optimizer of `recipe`. It runs in a child process
(`python -m budgetune.plan.measure`, the request as JSON on stdin, the result as JSON on
stdout) so that nothing of the caller's heap, and no earlier measurement, is in the number.

What is measured
----------------
CPU: `peak_bytes` = the process's RSS high-water mark (VmHWM; not `ru_maxrss`, which a
child inherits from a larger parent across fork + exec — see metrics.peak_rss_bytes) at the end, minus `baseline_bytes` = the RSS right before the model is created (after every
import). Why this and not a tensor count:

* RSS high-water is the real peak of the process — what the kernel's OOM killer sees — so
  it includes everything a tensor count misses: allocator slack, oneDNN/BLAS scratch, the
  autograd graph, thread stacks.
* Subtracting the post-import RSS isolates the training step from the interpreter and the
  libraries (torch + transformers alone are several hundred MB), which the planner takes as
  a separate, measured `overhead` term.
* torch's CPU allocator has no caching pool: every tensor is a malloc/free. *If* the large
  blocks are mmapped, freeing one unmaps it and RSS follows the live tensors. glibc does
  that only until the first large free: it then raises its mmap threshold to that block's
  size (up to 32 MiB), and every smaller tensor afterwards comes from the heap, whose freed
  holes are kept. Measured on the planner grid (docs/benchmarks.md), that inflates the RSS
  peak of a step by +9% to +151% over the pinned measurement — most for LoRA and
  checkpointing — depending on the order of allocations rather than on their sizes. So by default (`allocator="pinned"`) the child pins the mmap threshold at
  glibc's initial 128 KiB (`pin_mmap_threshold`, = `MALLOC_MMAP_THRESHOLD_=131072`), which
  makes RSS track the live tensors; this is the measurement the memory model is checked
  against. `allocator="default"` measures what an unpinned process gets; a training
  process that wants the planner's number to hold should pin the threshold the same way.

The child runs `steps` optimizer steps (default 2), not one: in a real run the AdamW
moments exist from the first `optimizer.step()` on, so from the second step the forward and
backward run with the optimizer states resident. One step would measure a peak that a
run never has again and understate it by up to the states' size.

CUDA: `peak_bytes` = `torch.cuda.max_memory_allocated()` (peak stats reset right before
model creation) minus what was allocated then, i.e. live tensors only — the CUDA
context and the caching allocator's reserve are not in it; the memory model's `overhead`
term stands for those. (This path is written but has not been run: no GPU was available.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .recipe import Recipe


def measure_step_memory(config_dict: dict, recipe: Recipe, device: str = "cpu", steps: int = 2,
                        seed: int = 0, allocator: str = "pinned", timeout: float = 600.0) -> dict:
    """Run `steps` real training steps of `recipe` in a fresh process; return its memory peak.

    Returns {"peak_bytes", "baseline_bytes", "step_seconds", "parameters", "trainable"}.
    `peak_bytes` is the step's own peak (above the post-import baseline); see the module doc.
    """
    if allocator not in ("pinned", "default"):
        raise ValueError(f"allocator must be 'pinned' or 'default', not {allocator!r}")
    request = {"config": config_dict, "recipe": recipe.to_dict(), "device": device, "steps": steps, "seed": seed,
               "allocator": allocator}
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "budgetune.plan.measure"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    # the result is the last line: libraries may print to stdout before it
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_bytes() -> int:
    """Current resident set size (not the high-water mark)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    from ..metrics import peak_rss_bytes

    return peak_rss_bytes()


def make_batch(config, recipe: Recipe, generator) -> dict:
    """A micro-batch shaped like our data pipeline's rows (data/packing.py).

    Packed: several examples per row, `position_ids` restarting at each, no attention mask
    (transformers then builds the block-diagonal mask). Padded: one example per row with an
    attention mask; one row fills seq_len (the batch is trimmed to its longest row) and the
    others carry padding, as real padded batches do.
    """
    import torch

    b, t = recipe.micro_batch, recipe.seq_len
    input_ids = torch.randint(0, config.vocab_size, (b, t), generator=generator)
    labels = input_ids.clone()
    if recipe.packed:
        positions = torch.empty(b, t, dtype=torch.long)
        for row in range(b):
            col = 0
            while col < t:  # examples of random length, at least 2 per row
                n = min(t - col, int(torch.randint(max(2, t // 8), max(3, t // 2), (1,), generator=generator)))
                positions[row, col : col + n] = torch.arange(n)
                labels[row, col] = -100
                col += n
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    mask = torch.ones(b, t, dtype=torch.long)
    for row in range(1, b):
        length = int(torch.randint(t // 2, t + 1, (1,), generator=generator))
        mask[row, length:] = 0
    labels[mask == 0] = -100
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
PINNED_MMAP_THRESHOLD = 128 * 1024  # glibc's own initial value


def pin_mmap_threshold(threshold: int = PINNED_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold so that freed tensors go back to the OS; False if not glibc.

    glibc raises its mmap threshold to the size of every mmapped block that is freed (up to
    32 MiB). After the first large tensor is freed, every smaller tensor comes from the heap,
    whose freed holes are kept, so RSS drifts far above the live tensors (+9% to +151% on
    the grid of benchmarks/planner_accuracy.py). Setting the threshold explicitly turns that adjustment
    off, the same as `MALLOC_MMAP_THRESHOLD_=131072` in the environment.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def _child(request: dict) -> dict:
    if request.get("allocator", "pinned") == "pinned":
        pin_mmap_threshold()
    # every import first: the baseline is the process ready to train, before any model exists
    import torch
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    from ..config import OptimConfig
    from ..lm_loss import token_losses
    from ..methods import get_method
    from ..optim import build_optimizer

    recipe_d = dict(request["recipe"])
    recipe_d["lora_targets"] = tuple(recipe_d["lora_targets"])
    recipe = Recipe(**recipe_d)
    device = torch.device(request["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(request["seed"])
    generator = torch.Generator().manual_seed(request["seed"])

    cfg = dict(request["config"])
    config = CONFIG_MAPPING[cfg.pop("model_type")](**cfg)
    config._attn_implementation = cfg.get("attn_implementation", "sdpa")
    method = get_method(recipe.method)
    # models.weights_dtype: a frozen base is bf16 on a GPU, everything else fp32
    dtype = torch.bfloat16 if (cuda and method.adapter) else torch.float32
    batches = [make_batch(config, recipe, generator) for _ in range(recipe.grad_accum)]
    # transformers imports an architecture's modeling module on first use, and peft its tuners:
    # resolve both now so that the imports land in the baseline, not in the step
    AutoModelForCausalLM._model_mapping[type(config)]
    if method.adapter:
        import peft.tuners.lora  # noqa: F401
    quantized_source = None
    if recipe.quantize:
        # the base quantised as training loads a pretrained one: from a safetensors folder, through
        # transformers' bnb loader (written here, before the baseline; the load's transient is not
        # the step's peak, so the high-water mark is reset after it — see below)
        import tempfile

        import bitsandbytes  # noqa: F401

        from ..quantize import bnb_config, finish

        quantized_source = tempfile.TemporaryDirectory(prefix="budgetune-measure-")
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(quantized_source.name)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _rss_bytes()

    if quantized_source is not None:
        model = finish(AutoModelForCausalLM.from_pretrained(
            quantized_source.name, dtype=dtype, use_safetensors=True,
            quantization_config=bnb_config(recipe.quantize, device, recipe.extra.get("double_quant", True))))
        quantized_source.cleanup()
        if not cuda:
            _reset_peak_rss()
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    opts = method.Options()
    if hasattr(opts, "r"):
        opts.r = recipe.lora_r
        opts.target_modules = list(recipe.lora_targets)
    model = method.prepare(model, opts)
    if recipe.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(model, OptimConfig(name=recipe.optimizer))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and recipe.precision == "bf16-mixed")

    step_seconds = 0.0
    for _ in range(request["steps"]):
        t0 = time.perf_counter()
        targets = sum(float((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:
            with autocast:
                loss, _ = token_losses(model, {k: v.to(device) for k, v in batch.items()})
            (loss / max(targets, 1.0)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        step_seconds = time.perf_counter() - t0

    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()
    return {
        "peak_bytes": int(peak - baseline),
        "baseline_bytes": int(baseline),
        "step_seconds": round(step_seconds, 4),
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "trainable": sum(p.numel() for p in params),
    }


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.stdin.read()))))
