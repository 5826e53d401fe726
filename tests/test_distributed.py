"""Two-process data parallel on CPU (gloo), launched the way users launch it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from budgetune.checkpoint import list_checkpoints
from budgetune.train import train
from safetensors.torch import load_file

from helpers import tiny_config, write_text_corpus


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run):
    return load_file(str(list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_process_ddp_equals_single_process_accumulation(tmp_path, method):
    """2 processes × micro-batch 2 see the same rows per step as 1 process × 2 × accumulation 2,
    so with an exact token mean the weights must agree."""
    corpus = write_text_corpus(tmp_path / "corpus")
    ddp_cfg = tiny_config(tmp_path / "ddp", corpus, budget={"steps": 4}, train={"micro_batch": 2}, method={"name": method},
                          checkpoint={"every": 0.5})
    (tmp_path / "ddp").mkdir()
    config_path = tmp_path / "ddp" / "config.yaml"
    config_path.write_text(yaml.safe_dump(ddp_cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "budgetune", "train", str(config_path), "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    single = train(tiny_config(tmp_path / "single", corpus, budget={"steps": 4}, train={"micro_batch": 2, "grad_accum": 2},
                               method={"name": method}), quiet=True)
    ddp_summary = yaml.safe_load((tmp_path / "ddp" / "run" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2
    assert ddp_summary["tokens"] == single["tokens"]
    a, b = _weights(tmp_path / "ddp" / "run"), _weights(tmp_path / "single" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)

    # resume the DDP run with a larger budget, still on two processes
    cmd += ["--resume", "--extend", "--budget.steps", "6"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "ddp" / "run" / "summary.json").read_text())["steps"] == 6

    # and the distributed run's result exports like any other
    from budgetune.export import export

    out = export(tmp_path / "ddp" / "run", merge=True)
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))


@pytest.mark.slow
def test_fsdp2_on_cpu_trains_checkpoints_resumes_and_exports_like_one_process(tmp_path):
    """`accelerate launch` with examples/accelerate/fsdp2-cpu.yaml (2 processes, sharded weights,
    gradients and optimizer states) equals one process with the same rows per step — before and
    after a resume — and the result exports to a model transformers loads."""
    from transformers import AutoModelForCausalLM

    from budgetune.export import export

    corpus = write_text_corpus(tmp_path / "corpus")
    sharded = tiny_config(tmp_path / "fsdp", corpus, budget={"steps": 4}, train={"micro_batch": 2}, checkpoint={"every": 0.5})
    (tmp_path / "fsdp").mkdir()
    config_path = tmp_path / "fsdp" / "config.yaml"
    config_path.write_text(yaml.safe_dump(sharded))
    launcher = Path(__file__).resolve().parent.parent / "examples" / "accelerate" / "fsdp2-cpu.yaml"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher), "--main_process_port",
           str(_free_port()), "-m", "budgetune", "train", str(config_path), "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single_cfg = tiny_config(tmp_path / "single", corpus, budget={"steps": 4}, train={"micro_batch": 2, "grad_accum": 2},
                             checkpoint={"every": 0.5})
    train(single_cfg, quiet=True)
    run, single = tmp_path / "fsdp" / "run", tmp_path / "single" / "run"
    assert yaml.safe_load((run / "summary.json").read_text())["world_size"] == 2

    def same(a, b):
        for name, tensor in _weights(b).items():
            torch.testing.assert_close(_weights(a)[name], tensor, rtol=1e-4, atol=1e-5)

    same(run, single)
    # resume both with a larger budget: the optimizer state restored into the shards must match
    done = subprocess.run(cmd + ["--resume", "--extend", "--budget.steps", "6"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single_cfg["budget"] = {"steps": 6}
    train(single_cfg, resume=True, extend=True, quiet=True)
    same(run, single)
    merged = AutoModelForCausalLM.from_pretrained(export(run, merge=True))
    assert sum(p.numel() for p in merged.parameters()) == yaml.safe_load((run / "summary.json").read_text())["parameters"]
