"""`budgetune demo`: the whole path on a tiny Llama and the Python standard library, offline.

`budgetune demo chat`: the same path on a real pretrained model, SmolLM2-135M-Instruct
(`budgetune fetch smollm2-135m-instruct` once), taught on the CPU within 3 minutes to answer
questions about the standard library in one fixed, checkable form its base does not use.
"""

from __future__ import annotations

import torch

from .config import builtin_config, load_config, read_yaml
from .console import console, say
from .data.corpora import api_format_ok

CHAT_HELDOUT = 24  # held-out questions: format accuracy is over all of them
CHAT_SHOWN = 5  # of which the first few are printed side by side
CHAT_ANSWER_TOKENS = 64  # new tokens per answer (a full answer is ~20-50)


def demo(overrides=None, overwrite: bool = True, quiet: bool = False, which: str = "default") -> dict:
    """Train the demo within its budget (default 3 minutes), then show what it bought."""
    if which == "chat":
        return demo_chat(overrides, overwrite=overwrite, quiet=quiet)
    from .evaluate import generate_samples, load_trained
    from .tune import train_or_race

    cfg = load_config(builtin_config("demo"), overrides)
    say("[bold]budgetune demo[/]: a tiny Llama learns Python from the standard library's sources, "
        f"within a {cfg.budget.time or cfg.budget.describe()} budget. No downloads.", not quiet)
    summary = train_or_race(cfg, overwrite=overwrite, quiet=quiet)
    model, tokenizer, _ = load_trained(summary["run_dir"])
    samples = generate_samples(model, tokenizer, cfg.eval.prompts, cfg.eval.sample_tokens, "cpu", cfg.eval.temperature,
                               cfg.eval.repetition_penalty, cfg.train.seed)
    if not quiet:
        uniform = summary["uniform_loss"]
        console.rule("what the budget bought")
        say(f"held-out loss: {summary['eval_loss_before']:.3f} before → [bold]{summary['eval_loss_after']:.3f}[/] after "
            f"(uniform guess over {len(tokenizer)} tokens: ln(V) = {uniform:.3f})")
        say(f"trained {summary['steps']} steps, {summary['tokens']:.0f} tokens ({_speed(summary)}); "
            f"padding saved by packing: {100 * (1 - summary['data']['padding_fraction']):.1f}% of row tokens are real")
        for prompt, text in zip(cfg.eval.prompts, samples):
            console.rule(f"sample: {prompt!r}", style="dim")
            console.print(prompt + text, markup=False, highlight=False)
        console.rule()
        say(f"run folder: {summary['run_dir']} (report.html, metrics.jsonl, summary.json, model/, checkpoints/)")
    summary["samples"] = [{"prompt": p, "completion": s} for p, s in zip(cfg.eval.prompts, samples)]
    return summary


def demo_chat(overrides=None, overwrite: bool = True, quiet: bool = False) -> dict:
    """LoRA on SmolLM2-135M-Instruct: the base's and the tuned model's answers to the same
    held-out questions, held-out loss and format accuracy before and after."""
    from .data.corpora import api_question, stdlib_api_chat
    from .evaluate import load_trained
    from .fetch import cache_root
    from .models import load_model, load_tokenizer
    from .tune import train_or_race

    data = read_yaml(builtin_config("demo_chat"))
    train_file, eval_file, held = stdlib_api_chat(cache_root() / "demo-chat", heldout=CHAT_HELDOUT)
    data["data"].update(train=[str(train_file)], eval=[str(eval_file)])
    cfg = load_config(data, overrides)
    say("[bold]budgetune demo chat[/]: LoRA teaches the real SmolLM2-135M-Instruct to answer \"what does function X of "
        "module Y do?\" as `module.func(args)` — <first docstring sentence>, learned from the standard library's "
        f"docstrings, within a {cfg.budget.time or cfg.budget.describe()} training budget on this machine.", not quiet)
    questions = [api_question(item) for item in held]
    tokenizer = load_tokenizer(cfg, log=lambda m: None)  # a model not fetched yet: the error says how
    base = load_model(cfg, tokenizer, torch.device("cpu"))
    say(f"the base model answers {len(questions)} held-out questions ...", not quiet)
    before = chat_answers(base, tokenizer, questions, CHAT_ANSWER_TOKENS)
    del base
    summary = train_or_race(cfg, overwrite=overwrite, quiet=quiet)
    tuned, tokenizer, _ = load_trained(summary["run_dir"])
    if hasattr(tuned, "merge_and_unload"):
        tuned = tuned.merge_and_unload()  # the same function; generation runs without the adapter's extra matmuls
    say(f"the tuned model answers the same {len(questions)} questions ...", not quiet)
    after = chat_answers(tuned, tokenizer, questions, CHAT_ANSWER_TOKENS)
    acc_before, acc_after = (sum(map(api_format_ok, held, answers)) / len(held) for answers in (before, after))
    if not quiet:
        console.rule("what the budget bought")
        say(f"held-out loss (answers to {len(held)} functions seen in no training question): "
            f"{summary['eval_loss_before']:.3f} before → [bold]{summary['eval_loss_after']:.3f}[/] after")
        say(f"format accuracy (answer is `module.func(args)` — sentence, right function): "
            f"{acc_before:.0%} before → [bold]{acc_after:.0%}[/] after")
        say(f"trained {summary['steps']} steps, {summary['tokens']:.0f} tokens ({_speed(summary)})")
        for item, question, b, a in list(zip(held, questions, before, after))[:CHAT_SHOWN]:
            console.rule(question, style="dim")
            console.print(f"base:      {b}", markup=False, highlight=False)
            console.print(f"tuned:     {a}", markup=False, highlight=False)
            console.print(f"docstring: {item['answer']}", markup=False, highlight=False)
        console.rule()
        say(f"run folder: {summary['run_dir']} (report.html, metrics.jsonl, summary.json, model/)")
    summary["chat"] = {"questions": questions, "reference": [item["answer"] for item in held], "base": before,
                       "tuned": after, "format_accuracy_before": acc_before, "format_accuracy_after": acc_after}
    return summary


def _speed(summary: dict) -> str:
    """The training speed (median step) and what the whole budget averaged, data preparation and evals included."""
    return (f"{summary['train_tokens_per_s_median'] or 0:.0f} tokens/s per step, "
            f"{summary['tokens_per_s']:.0f} over the whole budget with data preparation and evals")


def chat_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 64, batch: int = 12) -> list[str]:
    """Greedy answers to single-turn chat questions, rendered with the model's own template."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues each row at its end
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop = [t for t in {tokenizer.eos_token_id, end} if isinstance(t, int) and t != tokenizer.unk_token_id]
    out = []
    try:
        for i in range(0, len(questions), batch):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                     for q in questions[i : i + batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
            out += [" ".join(t.split()) for t in tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return out
