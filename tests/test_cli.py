"""The command line: clear errors with exit code 2 before any work, and the happy path."""

import json
import subprocess
import sys

import pytest
import yaml

from helpers import tiny_config, write_text_corpus


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "budgetune", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def config_file(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", n_files=4)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, corpus, budget={"steps": 3})))
    return path


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--budget.tme", "5"], "budget.tme"),
        (["--budget.time", "-5s"], "budget.time"),
        (["--train.micro_batch", "many"], "train.micro_batch"),
        (["--method.name", "nope"], "method.name"),
        (["--method.r", "8"], "method.r"),
        (["--data.train", "/does/not/exist"], "/does/not/exist"),
        (["--model.preset", "llama-huge"], "model.preset"),
        (["--schedule.name", "zigzag"], "schedule.name"),
    ],
)
def test_bad_config_exits_2_and_names_the_key(config_file, tmp_path, overrides, message):
    done = run_cli("train", config_file, *overrides)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_config_file(tmp_path):
    done = run_cli("train", tmp_path / "nope.yaml")
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_bad_data_line_is_named_and_nothing_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, bad, tokenizer={"train_vocab_size": 0, "name": None})))
    done = run_cli("train", path, "--tokenizer.train_vocab_size", "300")
    assert done.returncode == 2, done.stderr
    assert f"{bad}:2" in done.stderr
    assert not (tmp_path / "run").exists()


def test_train_eval_export_commands(config_file, tmp_path):
    done = run_cli("train", config_file, "--quiet")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    done = run_cli("train", config_file)
    assert done.returncode == 2 and "already holds" in done.stderr
    done = run_cli("eval", run, "--json", "--prompt", "def ")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["eval_loss"] > 0 and result["samples"][0]["prompt"] == "def "
    done = run_cli("export", run, "--merge")
    assert done.returncode == 0, done.stderr
    assert (run / "export" / "merged" / "config.json").exists()
    # eval on another file the data layer reads, and the lm-evaluation-harness bridge's guard
    other = tmp_path / "other.txt"
    other.write_text("def other(x):\n    return x * 2\n" * 50)
    done = run_cli("eval", run, "--json", "--data", other)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["eval_tokens"] > 0
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        done = run_cli("eval", run, "--lm-eval", "hellaswag")
        assert done.returncode == 2 and "pip install lm-eval" in done.stderr
