"""Held-out loss, perplexity and generation samples, during a run and for a finished one."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .data import Rows
from .lm_loss import token_losses


def _heldout_totals(model, rows: Rows | None, micro_batch: int, max_tokens: int, device, world_size: int, rank: int,
                    reduce, width: int, sums) -> torch.Tensor | None:
    """`sums(batch)` (a float64 vector of `width`) added over this process's share of the first max_tokens of the
    held-out rows, in eval mode, and reduced over processes; None without held-out rows."""
    if rows is None or len(rows) == 0:
        return None
    was_training = model.training
    model.eval()
    n_rows = min(len(rows), max(1, max_tokens // rows.input_ids.shape[1]))
    total = torch.zeros(width, dtype=torch.float64, device=device)
    mine = list(range(rank, n_rows, world_size))
    for start in range(0, len(mine), micro_batch):
        total += sums({k: v.to(device) for k, v in rows.batch(mine[start : start + micro_batch]).items()})
    if reduce is not None:
        total = reduce(total)
    model.train(was_training)
    return total


@torch.no_grad()
def heldout_loss(model, rows: Rows | None, micro_batch: int, max_tokens: int, device, world_size: int = 1, rank: int = 0, reduce=None) -> float:
    """Mean next-token loss over (the first max_tokens of) the held-out rows."""
    total = _heldout_totals(model, rows, micro_batch, max_tokens, device, world_size, rank, reduce, 2,
                            lambda batch: torch.stack([t.double() for t in token_losses(model, batch)]))
    return (total[0] / total[1]).item() if total is not None and total[1] > 0 else float("nan")


@torch.no_grad()
def heldout_metrics(model, objective, rows: Rows | None, micro_batch: int, max_tokens: int, device, world_size: int = 1,
                    rank: int = 0, reduce=None) -> dict:
    """{eval_loss} for SFT; for a preference objective its mean held-out loss per pair with reward
    accuracy (share of pairs whose chosen answer gets the higher reward), mean margin and mean
    chosen / rejected log-probs."""
    if not objective.preference:
        return {"eval_loss": heldout_loss(model, rows, micro_batch, max_tokens, device, world_size, rank, reduce)}
    from .objectives.base import summarize

    def pair_sums(batch: dict) -> torch.Tensor:  # the five per-pair statistics summed, and the pair count
        _, stats = objective.pairs(model, batch)
        return torch.cat([stats.sum(0).double(), torch.tensor([float(len(stats))], dtype=torch.float64, device=device)])

    total = _heldout_totals(model, rows, micro_batch, max_tokens, device, world_size, rank, reduce, 6, pair_sums)
    if total is None:
        return {"eval_loss": float("nan")}
    total = total.cpu()
    return {"eval_loss": (total[0] / total[5]).item() if total[5] > 0 else float("nan"), **summarize(total)}


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, device, temperature: float = 0.0,
                     repetition_penalty: float = 1.0, seed: int = 0) -> list[str]:
    """Continuations of each prompt: greedy at temperature 0, else sampled (seeded, so the same
    run gives the same samples). A repetition penalty > 1 (transformers' CTRL-style penalty)
    keeps a small, briefly trained model from looping on one token."""
    was_training = model.training
    model.eval()
    out = []
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
    for i, prompt in enumerate(prompts):
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.random.fork_rng(devices=[]):  # seeded sampling without touching the caller's RNG
            torch.manual_seed(seed + i)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, **sampling,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    model.train(was_training)
    return out


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False,
                 dequantize: bool = False):
    """(model, tokenizer, config) of a finished run, as plain transformers/peft objects.

    A run folder may come from someone else: its own config.yaml saying
    `model.trust_remote_code: true` is not enough to run the model's code here — the caller
    must say so too (`--trust-remote-code`). A run with `model.quantize` gets its base quantised
    as in training; `dequantize=True` turns that base back into float weights before the adapter
    is loaded (what `export --merge` folds the adapter into)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import load_config
    from .methods import get_method
    from .rundir import RunDir

    run = RunDir(Path(run_dir))
    run.require_model()
    cfg = load_config(run.config)
    if cfg.model.trust_remote_code and not trust_remote_code:
        from .errors import BudgetuneError

        raise BudgetuneError(f"{run.path}: this run was trained with model.trust_remote_code: true, so loading it runs the "
                             "model's own Python code; pass --trust-remote-code if you trust this run folder")
    tokenizer = AutoTokenizer.from_pretrained(str(run.model))
    method = get_method(cfg.method.name)
    if method.output == "adapter":
        from peft import PeftModel

        from . import quantize
        from .models import model_files

        base_path = str(run.base) if run.base.exists() else model_files(cfg.model)  # a GGUF base: its cached dequantised folder
        # a scratch run's saved base is already quantised (its config.json says how); a pretrained one is quantised here
        quantized = {} if run.base.exists() else quantize.load_kwargs(cfg, torch.device(device))
        base = AutoModelForCausalLM.from_pretrained(base_path, use_safetensors=True, trust_remote_code=trust_remote_code, **quantized)
        base = quantize.finish(base) if quantize.is_quantized(base) else base
        if dequantize:
            base = quantize.dequantize(base)
        model = PeftModel.from_pretrained(base, str(run.model))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(run.model), use_safetensors=True, trust_remote_code=trust_remote_code)
    return model.to(device), tokenizer, cfg


def lm_eval_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """Scores from lm-evaluation-harness (EleutherAI) for `tasks`, on the in-memory model.

    Optional: `pip install lm-eval`. The harness fetches each task's dataset from the Hugging
    Face hub (or its cache), so this part needs the network or a warmed cache."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        from .errors import BudgetuneError

        raise BudgetuneError("--lm-eval needs lm-evaluation-harness: pip install lm-eval (then run the same command again)") from None
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=tasks, limit=limit)
    return results["results"]


def evaluate(run_dir: str | Path, data: list[str] | None = None, prompts: list[str] | None = None, max_tokens: int | None = None,
             log=print, lm_eval: list[str] | None = None, lm_eval_limit: int | None = None, trust_remote_code: bool = False) -> dict:
    """Held-out loss/perplexity of a finished run on its own eval split (or on `data`), samples,
    and optionally lm-evaluation-harness task scores."""
    from .data import prepare_data
    from .config import merge, load_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, cfg = load_trained(run_dir, device, trust_remote_code)
    if data:
        cfg = load_config(merge(cfg.to_dict(), {"data": {"eval": list(data)}}))
    bundle = prepare_data(cfg, tokenizer, seed=cfg.train.seed, log=log)
    from .objectives import get_objective

    objective = get_objective(cfg)
    if objective.preference:
        objective.prepare_eval(Path(run_dir), bundle.eval, own_split=not data)
    metrics = heldout_metrics(model, objective, bundle.eval, cfg.train.micro_batch, max_tokens or cfg.eval.max_tokens, device)
    loss = metrics.pop("eval_loss")
    prompts = prompts if prompts is not None else cfg.eval.prompts
    samples = generate_samples(model, tokenizer, prompts, cfg.eval.sample_tokens, device, cfg.eval.temperature,
                               cfg.eval.repetition_penalty, cfg.train.seed) if prompts else []
    return {
        "eval_loss": loss,
        "perplexity": (math.exp(loss) if loss == loss and loss < 50 else float("inf")) if not objective.preference else None,
        **({"objective": objective.name, **metrics} if objective.preference else {}),
        "eval_tokens": int(bundle.eval.real_tokens.sum()) if bundle.eval is not None else 0,
        "samples": [{"prompt": p, "completion": s} for p, s in zip(prompts, samples)],
        **({"lm_eval": lm_eval_tasks(model, tokenizer, lm_eval, lm_eval_limit)} if lm_eval else {}),
    }
