"""Small corpora and configs for end-to-end tests: tiny models, seconds per run, no downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the model learns budget tokens time memory loss rank adapter layer value python data "
         "train eval save load plan step batch sequence packing schedule warmup decay").split()


def write_text_corpus(folder: Path, n_files: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for j in range(rng.randint(15, 40)):
            name = rng.choice(WORDS)
            lines.append(f"def {name}_{j}(x):\n    return x + {rng.randint(0, 9)}  # {' '.join(rng.choices(WORDS, k=5))}\n")
        (folder / f"doc{i:02d}.py").write_text("\n".join(lines))
    return folder


def write_chat_jsonl(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            messages = [
                {"role": "system", "content": "You add numbers."},
                {"role": "user", "content": f"What is {a} plus {b}? " + " ".join(rng.choices(WORDS, k=rng.randint(0, 12)))},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def tiny_config(tmp: Path, data, **sections) -> dict:
    """A config dict for a ~100k-parameter Llama trained from scratch on `data`."""
    cfg = {
        "model": {"init": "scratch", "preset": "llama-test"},
        "tokenizer": {"train_vocab_size": 320},
        "data": {"train": [str(data)], "seq_len": 64, "eval_fraction": 0.1, "cache_dir": str(tmp / "cache")},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup": 0.1},
        "budget": {"steps": 12},
        "train": {"micro_batch": 4, "seed": 0, "deterministic": True},
        "eval": {"every": None, "max_tokens": 2048},
        "checkpoint": {"every": None},
        "output": {"dir": str(tmp / "run")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def interrupted_and_uninterrupted(tmp: Path, data, monkeypatch, **sections) -> tuple[dict, dict]:
    """Final trainable weights of (an uninterrupted run, a run killed right after its first
    periodic checkpoint and resumed) — the same config, the same seed."""
    import importlib

    from safetensors.torch import load_file

    from budgetune.checkpoint import list_checkpoints
    from budgetune.train import train

    checkpoint_module = importlib.import_module("budgetune.checkpoint")
    train(tiny_config(tmp / "a", data, **sections), quiet=True)
    real_save = checkpoint_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    config_b = tiny_config(tmp / "b", data, **sections)
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_die)
    try:
        train(config_b, quiet=True)
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    assert len(list_checkpoints(tmp / "b" / "run" / "checkpoints")) == 1
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", real_save)
    train(config_b, resume=True, quiet=True)

    def final(run: Path) -> dict:
        return load_file(str(list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))

    return final(tmp / "a" / "run"), final(tmp / "b" / "run")


def write_preference_jsonl(path: Path, n: int = 80, seed: int = 0, chat: bool = False) -> Path:
    """Preference pairs with a learnable preference: the chosen answer is made of words from one half of
    WORDS, the rejected one of words from the other half (new combinations in every pair). String form,
    or chat form (message lists sharing the prompt)."""
    rng = random.Random(seed)
    good, bad = WORDS[::2], WORDS[1::2]
    with open(path, "w") as f:
        for _ in range(n):
            prompt = "Tell me about " + " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
            chosen, rejected = " ".join(rng.choices(good, k=3)), " ".join(rng.choices(bad, k=3))
            if chat:
                user = [{"role": "user", "content": prompt}]
                record = {"chosen": user + [{"role": "assistant", "content": chosen}],
                          "rejected": user + [{"role": "assistant", "content": rejected}]}
            else:
                record = {"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(record) + "\n")
    return path
