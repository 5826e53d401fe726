"""Planner speed accuracy: tokens/s predicted after the calibration probe vs measured in training.

    python benchmarks/planner_speed.py

For each grid point: the planner probes the recipe (2 timed forward+backward passes on a
random-init model, synthetic packed tokens), then a real `train` run of 10 optimizer steps
measures tokens/s (median of steps 3–10 from metrics.jsonl: optimizer step, data and
logging included). Error = predicted / measured − 1.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import write_text_corpus  # noqa: E402  (the tests' tiny corpus generator)

GRID = [
    # (preset, arch overrides, method, micro_batch, seq_len, checkpointing)
    ("llama-test", {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4}, "full", 8, 256, False),
    ("llama-test", {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4}, "lora", 8, 256, False),
    ("llama-test", {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4}, "full", 4, 512, True),
    ("qwen2-test", {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4}, "full", 8, 256, False),
    ("qwen2-test", {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4}, "lora", 4, 512, True),
    ("gpt-neox-test", {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}, "full", 8, 256, False),
    ("gpt-neox-test", {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}, "lora", 16, 128, False),
]


def measure_point(tmp: Path, corpus: Path, preset, arch, method, mb, seq, ckpt) -> dict:
    from budgetune.config import load_config
    from budgetune.metrics import read_metrics
    from budgetune.plan.search import make_plan
    from budgetune.train import train

    cfg = load_config({
        "model": {"init": "scratch", "preset": preset, "arch": arch, "gradient_checkpointing": ckpt},
        "tokenizer": {"train_vocab_size": 2048},
        "data": {"train": [str(corpus)], "seq_len": seq, "cache_dir": str(tmp / "cache")},
        "method": {"name": method}, "train": {"micro_batch": mb},
        "budget": {"steps": 10}, "eval": {"every": None, "max_tokens": 1024}, "checkpoint": {"every": None},
        "output": {"dir": str(tmp / f"run-{preset}-{method}-{mb}-{seq}-{ckpt}")},
    })
    plan = make_plan(cfg, probe_steps=2, log=lambda m: None)
    predicted = plan.best.tokens_per_s
    train(cfg, quiet=True)
    steps = [r for r in read_metrics(Path(cfg.output.dir) / "metrics.jsonl") if "event" not in r][2:]
    measured = statistics.median(r["tokens_per_s"] for r in steps)
    return {"config": f"{preset.split('-')[0]} {method} mb={mb} seq={seq} ckpt={'on' if ckpt else 'off'}",
            "predicted": predicted, "measured": measured, "error": predicted / measured - 1}


def main() -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="budgetune-speed-"))
    corpus = write_text_corpus(tmp / "corpus", n_files=60)
    rows = [measure_point(tmp, corpus, *point) for point in GRID]
    print("| config | predicted tokens/s | measured tokens/s | error |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['predicted']:,.0f} | {r['measured']:,.0f} | {100 * r['error']:+.1f}% |")
    print(f"\nmax |error|: {100 * max(abs(r['error']) for r in rows):.1f}%")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
