"""Speed: FLOPs per step from the model's shape, and a calibration probe on the real device.

Prediction: tokens/s = achieved FLOP/s ÷ FLOPs per token. The achieved rate is first a
device guess, then measured by `probe()`: a few real forward+backward passes of the
candidate recipe on synthetic tokens (the optimizer step is excluded: it is small next to
the matmuls and would change the weights). Packed rows are timed full (seq_len tokens);
unpacked rows (data.pack: false) at the width a padded batch of the data has on average
(`padded_width`), counting the real tokens such a batch holds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from .flops import flops_per_token
from .recipe import Recipe

# Rough sustained rates before calibration (FLOP/s): dense bf16 at ~40% MFU on known GPUs,
# and ~30 GFLOP/s per core for fp32 on CPUs with AVX2/AVX-512 (measured here: ~55 GFLOP/s on 2 cores).
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "T4": 65e12}
GPU_MFU_GUESS = 0.4
CPU_FLOPS_PER_CORE = 30e9


def device_flops_guess(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else ""  # planning for another machine
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 100e12)
        return peak * GPU_MFU_GUESS
    return CPU_FLOPS_PER_CORE * max(1, torch.get_num_threads())


def step_flops_per_token(config, recipe: Recipe, n_matmul: int, n_trainable: int) -> float:
    """FLOPs per trained token, including the extra forward that checkpointing recomputes."""
    base = flops_per_token(config, recipe.seq_len, n_matmul, n_trainable)
    if recipe.gradient_checkpointing:
        layers = getattr(config, "num_hidden_layers", 0) or 0
        base += 2.0 * n_matmul + 2.0 * layers * recipe.seq_len * (getattr(config, "hidden_size", 0) or 0)
    return base + reference_flops_per_token(config, recipe.seq_len, n_matmul, recipe.extra.get("objective", "sft"), recipe.method)


def reference_flops_per_token(config, seq_len: int, n_matmul: int, objective: str, method: str) -> float:
    """DPO with an adapter method: the reference is the same model with its adapter disabled, one more
    forward pass (no gradients) per step — 2 FLOPs per matmul parameter and the attention's forward.
    (Full fine-tuning pays its reference once, before training, from the time budget.) Both answers of
    a pair are already counted: they are the step's tokens."""
    from ..methods import METHODS

    if objective != "dpo" or not getattr(METHODS.get(method), "adapter", False):
        return 0.0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    return 2.0 * n_matmul + 2.0 * layers * seq_len * (getattr(config, "hidden_size", 0) or 0)


def reference_pass_factor(config, recipe: Recipe, step_fpt: float, n_matmul: int) -> float:
    """How much longer a step of `recipe` (`step_fpt` FLOPs per token) takes than the plain next-token
    step a probe times."""
    extra = reference_flops_per_token(config, recipe.seq_len, n_matmul, recipe.extra.get("objective", "sft"), recipe.method)
    return step_fpt / (step_fpt - extra) if extra else 1.0


@dataclass
class ProbeResult:
    tokens_per_s: float  # real (non-padding) tokens per second
    achieved_flops: float
    seconds_per_micro_batch: float
    width: int | None = None  # the timed micro-batch's row length (tokens)
    tokens_per_row: float | None = None  # real tokens counted per row (= width for packed rows)


def padded_width(row_lengths, micro_batch: int) -> int:
    """The width a padded micro-batch has on average: the mean, over the micro-batches a run draws,
    of the longest row in each (`Rows.batch` trims a padded batch to its longest row, so that is the
    length every row of the step is computed at — not the mean row length, and not seq_len).

    Exact, not sampled: the sampler draws each micro-batch uniformly without replacement (a seeded
    permutation per epoch), so with the n lengths sorted ascending the longest of m is the k-th with
    probability C(k-1, m-1) / C(n, m). Rounded up to a whole token."""
    lengths = np.sort(np.asarray(row_lengths, dtype=np.float64))
    n, m = len(lengths), max(1, min(int(micro_batch), len(lengths)))
    if n == 0:
        raise ValueError("padded_width: no rows")
    k = np.arange(m, n + 1, dtype=np.float64)  # 1-based rank of the batch's longest row
    # log C(k-1, m-1), built up from C(m-1, m-1) = 1 by C(k, m-1) = C(k-1, m-1) · k / (k-m+1)
    log_w = np.concatenate([[0.0], np.cumsum(np.log(k[:-1] / (k[:-1] - m + 1)))])
    w = np.exp(log_w - log_w.max())
    return int(np.ceil(float((w * lengths[m - 1:]).sum() / w.sum()) - 1e-9))


WARMUP_MAX = 6  # untimed passes at most before timing starts
WARMUP_SETTLED = 0.9  # warm once a pass is no more than 10% faster than the one before


def probe(model, recipe: Recipe, fpt: float, steps: int = 2, device: torch.device | None = None,
          row_lengths=None) -> ProbeResult:
    """Time `steps` forward+backward passes of one micro-batch, once the passes have warmed up.

    Packed rows (`recipe.packed`) are seq_len tokens, two examples each. Unpacked rows with the
    data's `row_lengths` (real tokens per row, data.row_lengths) are timed at `padded_width` — the
    mean longest row of a micro-batch, the width padding gives a step — with an attention mask
    padding each row to its own length, and the tokens counted are the real ones a micro-batch holds
    on average (micro_batch × mean row length). Without `row_lengths`, rows are seq_len tokens.

    The first passes of a process are slow — thread pools, kernel selection, and the allocator
    growing its heap (measured: the first candidate of a plan probed at 645 tokens/s after one
    warm-up pass, the others at 2.9–3.2 k). So untimed passes run until one is no more than
    10% faster than the one before (at least 2, at most WARMUP_MAX)."""
    from ..lm_loss import token_losses

    device = device or next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    padded = not recipe.packed and row_lengths is not None and len(row_lengths) > 0
    width = min(recipe.seq_len, padded_width(row_lengths, recipe.micro_batch)) if padded else recipe.seq_len
    per_row = float(np.mean(row_lengths)) if padded else float(width)  # a step's rows average this, however wide
    shape = (recipe.micro_batch, width)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, shape, generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if recipe.packed:
        # two examples per row, as packed data has: exercises the block-diagonal mask path
        half = width // 2
        batch["position_ids"] = torch.cat([torch.arange(half), torch.arange(width - half)]).expand(shape).contiguous()
    elif padded:
        # one example per row, padded to the batch's longest (the first row): row lengths drawn from the data
        drawn = np.random.default_rng(0).choice(np.asarray(row_lengths), size=recipe.micro_batch)
        lengths = torch.as_tensor(np.minimum(drawn, width))
        lengths[0] = width
        mask = (torch.arange(width) < lengths[:, None]).long()
        batch["attention_mask"] = mask
        batch["labels"][mask == 0] = -100

    def one_pass() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        loss, _ = token_losses(model, {k: v.to(device) for k, v in batch.items()})
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    was_training = model.training
    model.train()
    timings = timed_after_warmup(one_pass, steps)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    seconds = min(timings)
    tokens_per_s = recipe.micro_batch * per_row / seconds
    return ProbeResult(tokens_per_s, tokens_per_s * fpt, seconds, width, per_row)


def timed_after_warmup(one_pass, steps: int) -> list[float]:
    """Durations of `steps` calls of `one_pass` (which returns its own duration), made once
    the calls have stopped getting faster: after at least 2 and at most WARMUP_MAX untimed ones."""
    previous = one_pass()
    for _ in range(WARMUP_MAX - 1):
        current = one_pass()
        if current > WARMUP_SETTLED * previous:
            break
        previous = current
    return [one_pass() for _ in range(steps)]


class SpeedCalibration:
    """`train`'s tokens/s prediction, calibrated from the run's own first steps.

    Before the run the planner has only a device guess (`basis` says which). The first step
    is warm-up and not counted; the median of the next CALIBRATION_STEPS steps replaces the
    guess as the run's prediction. The log, summary.json["predicted"] and the final line name
    each number: the guess, the calibrated value and the measured median of all steps."""

    CALIBRATION_STEPS = 3

    def __init__(self, prediction: dict | None):
        self.guess = prediction.get("tokens_per_s") if prediction else None
        self.basis = (prediction or {}).get("tokens_per_s_basis", "device guess, uncalibrated")
        self.rates: list[float] = []
        self.calibrated: float | None = None

    def record(self, tokens_per_s: float) -> str | None:
        """Count one optimizer step's speed; a message once the prediction is calibrated."""
        self.rates.append(tokens_per_s)
        if self.calibrated is not None or len(self.rates) < 1 + self.CALIBRATION_STEPS:
            return None
        self.calibrated = statistics.median(self.rates[1:])
        guess = f" (the planner's {self.basis}: {self.guess:,.0f}, {self.calibrated / self.guess:.2f}× that)" if self.guess else ""
        return f"speed: {self.calibrated:,.0f} tokens/s calibrated from steps 2–{1 + self.CALIBRATION_STEPS}{guess}"

    def annotate(self, prediction: dict | None) -> dict | None:
        """The prediction for summary.json, each tokens/s number labelled."""
        if prediction is None:
            return None
        out = dict(prediction)
        out["tokens_per_s_basis"] = self.basis
        if self.calibrated is None and len(self.rates) > 1:  # a short run: calibrate from what there is
            self.calibrated = statistics.median(self.rates[1:])
        out["tokens_per_s_calibrated"] = round(self.calibrated, 1) if self.calibrated is not None else None
        out["tokens_per_s_calibrated_from"] = f"median of steps 2–{len(self.rates[: 1 + self.CALIBRATION_STEPS])}" if self.calibrated else None
        return out

    def describe(self, measured_median: float | None) -> str:
        calibrated = f", {self.calibrated:,.0f} calibrated from the first steps" if self.calibrated else ""
        return (f"{self.guess:,.0f} tokens/s predicted ({self.basis}){calibrated}, "
                f"{measured_median or 0:,.0f} measured (median step)")
