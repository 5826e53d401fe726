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


# --------------------------------------------------------------------------- help, version, units (in-process: fast)


def in_process(capsys, *args) -> tuple[int, str, str]:
    from budgetune.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help, --version, usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version(capsys):
    import budgetune

    code, out, _ = in_process(capsys, "--version")
    assert code == 0 and out.strip() == f"budgetune {budgetune.__version__}"


@pytest.mark.parametrize("command", ["train", "tune", "plan", "demo"])
def test_subcommand_help_is_its_own_and_lists_the_overrides(capsys, command):
    code, out, _ = in_process(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: budgetune {command} ") and "[--section.key value ...]" in out.splitlines()[0]
    assert "budgetune <command>" not in out  # not the global usage glued in front
    assert "--budget.{time tokens steps flops" in out and "--data.{" in out and "roles" in out


def test_every_flag_has_help(capsys):
    from budgetune.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"budgetune {name} {action.option_strings or action.dest}: no help text"


def test_compound_duration_and_negative_duration(config_file, capsys):
    from budgetune.config import load_config

    assert load_config(config_file, ["--budget.time", "1h30m"]).budget.time == "1h30m"
    code, _, err = in_process(capsys, "train", config_file, "--budget.time", "-5m")
    assert code == 2 and "config key 'budget.time': must be > 0" in err


def test_failed_run_leaves_no_empty_parent_folders(config_file, tmp_path, capsys):
    code, _, err = in_process(capsys, "train", config_file, "--output.dir", tmp_path / "runs" / "deep" / "run",
                              "--data.train", tmp_path / "nothing.jsonl")
    assert code == 2 and "no such file" in err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()  # a folder that was there before is kept, even empty
    in_process(capsys, "train", config_file, "--output.dir", tmp_path / "runs" / "run", "--data.train", tmp_path / "nothing.jsonl")
    assert (tmp_path / "runs").is_dir()


def test_no_tokenizer_is_trained_on_data_that_cannot_be_read(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, empty)))
    code, _, err = in_process(capsys, "train", path)
    assert code == 2 and f"no examples found in {empty}" in err
    assert not (tmp_path / "cache" / "tokenizers").exists() or not any((tmp_path / "cache" / "tokenizers").iterdir())
