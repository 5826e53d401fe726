"""Bad input and hostile files: one clear message, exit code 2, nothing written.

Every case goes through the command line in-process (`budgetune.cli.main`) with a tiny
scratch model and a locally saved tokenizer, so a failing case costs well under a second.
Each asserts the exit code, that the message names the file:line or the config key, that
it is one message and no traceback, and that no run folder or tokenised cache was left.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import budgetune
from budgetune.cli import main
from budgetune.config import Config, load_config, read_yaml
from budgetune.data import prepare_data
from budgetune.data.formats import DEFAULT_CHAT_TEMPLATE
from budgetune.data.sources import MAX_LINE_BYTES, read_records
from budgetune.data.tokenize import tokenize_files
from budgetune.errors import BudgetuneError, ConfigError, DataError
from budgetune.models import load_tokenizer

from helpers import tiny_config

SRC = Path(budgetune.__file__).parent


# =========================================================================== helpers


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tokenizer):
    """The session's tiny tokenizer, saved where a config can name it (with the ChatML template)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(str(folder))
    return folder


def write_config(tmp: Path, train: Path, tok_dir: Path, **sections) -> Path:
    cfg = tiny_config(tmp, train, tokenizer={"train_vocab_size": 0, "name": str(tok_dir)}, budget={"steps": 2})
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of `budgetune ARGS`, run in this process."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.err, out.out


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time: 'unchanged' is equality.
    The run's lock file is left out: a --resume signs it (its pid) before it reads anything."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.name != ".budgetune-lock"}


def assert_one_clear_error(code: int, err: str, fragments: list[str]) -> None:
    assert code == 2, err
    assert err.count("budgetune: error:") == 1, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"


def assert_nothing_written(tmp: Path, err: str | None = None) -> None:
    """No run folder, and no tokenised cache entry, except one of good files the error does not name."""
    assert not (tmp / "run").exists(), "a run folder was left behind"
    for meta in (tmp / "cache" / "tokenized").glob("*/meta.json"):
        for cached in json.loads(meta.read_text())["files"]:
            assert err is not None and cached not in err, f"{cached} was cached"


# =========================================================================== bad input: the cases


@dataclass
class Case:
    id: str
    files: dict[str, bytes]  # data files to write, by name; the first is data.train
    expect: list[str]  # fragments of the message; {d} is the test's folder
    args: list[str] = field(default_factory=list)  # command-line overrides
    sections: dict = field(default_factory=dict)  # config sections to change in the YAML


def jl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


TEXT_OK = jl(*({"text": f"a fine document number {i} about budgets and tokens"} for i in range(5)))
PC_OK = jl(*({"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(5)))
CHAT_OK = jl(*({"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]} for i in range(5)))


def bad_line_cases(prefix: str, good: bytes, bad: dict[str, tuple[bytes, str]], positions=(1, 4)) -> list[Case]:
    """Each bad line at each position among good lines; the message must name exactly that line."""
    good_lines = good.splitlines(keepends=True)
    cases = []
    for name, (line, fragment) in bad.items():
        for at in positions:
            lines = good_lines[: at - 1] + [line + b"\n"] + good_lines[at - 1 :]
            cases.append(Case(f"{prefix}-{name}-line{at}", {"train.jsonl": b"".join(lines)}, [f"{{d}}/train.jsonl:{at}:", fragment]))
    return cases


BAD_TEXT_LINES = {
    "unclosed-object": (b'{"text": "x"', "not valid JSON"),
    "trailing-garbage": (b'{"text": "x"} and more', "not valid JSON"),
    "single-quotes": (b"{'text': 'x'}", "not valid JSON"),
    "bare-word": (b"hello", "not valid JSON"),
    "raw-nul-byte": (b'{"text": "a\x00b"}', "not valid JSON"),
    "a-list": (b"[1, 2, 3]", "expected a JSON object per line, got list"),
    "a-string": (b'"just a string"', "expected a JSON object per line, got str"),
    "a-number": (b"42", "expected a JSON object per line, got int"),
    "null": (b"null", "expected a JSON object per line, got NoneType"),
    "text-int": (b'{"text": 42}', "field 'text' must be a string, got int"),
    "text-list": (b'{"text": ["a", "b"]}', "field 'text' must be a string, got list"),
    "text-null": (b'{"text": null}', "field 'text' must be a string, got NoneType"),
    "text-object": (b'{"text": {"a": 1}}', "field 'text' must be a string, got dict"),
    "text-nan": (b'{"text": NaN}', "field 'text' must be a string, got float"),
    "missing-field": (b'{"body": "x"}', "cannot tell the data format"),
    "empty-object": (b"{}", "cannot tell the data format"),
    "empty-text": (b'{"text": ""}', "empty 'text'"),
    "blank-text": (b'{"text": "  \\n\\t "}', "empty 'text'"),
    "invalid-utf8": (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    "lone-surrogate": (b'{"text": "ok \\ud800 not"}', "lone surrogate"),
    "deep-nesting": (b"[" * 100_000, "nested too deeply"),
    "huge-integer": (b'{"text": "x", "n": ' + b"7" * 5000 + b"}", "not usable JSON"),
}
BAD_PC_LINES = {
    "empty-completion": (b'{"prompt": "q", "completion": ""}', "empty 'completion'"),
    "completion-int": (b'{"prompt": "q", "completion": 5}', "field 'completion' must be a string"),
    "prompt-list": (b'{"prompt": ["q"], "completion": "a"}', "field 'prompt' must be a string"),
    "completion-only": (b'{"completion": "a"}', "cannot tell the data format"),
}
BAD_CHAT_LINES = {
    "unknown-role": (b'{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role 'wizard'"),
    "role-int": (b'{"messages": [{"role": 1, "content": "x"}, {"role": "assistant", "content": "y"}]}', "message 0 must be an object"),
    "no-assistant": (b'{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    "messages-string": (b'{"messages": "hello"}', "must be a non-empty list"),
    "messages-empty": (b'{"messages": []}', "must be a non-empty list"),
    "message-no-content": (b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "message 0 must be an object"),
    "content-int": (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}', "message 1 must be an object"),
    "message-not-object": (b'{"messages": ["hi", {"role": "assistant", "content": "y"}]}', "message 0 must be an object"),
    "content-surrogate": (b'{"messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "y"}]}', "lone surrogate"),
}

SHAREGPT_OK = jl(*({"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]} for i in range(5)))
BAD_SHAREGPT_LINES = {
    "unknown-role": (b'{"conversations": [{"from": "person", "value": "x"}, {"from": "gpt", "value": "y"}]}',
                     "unknown role 'person' (use one of assistant, system, tool, user, or map it with data.roles"),
    "turn-without-value": (b'{"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]}', "turn 0 of 'conversations'"),
}
ALPACA_OK = jl(*({"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(5)))
BAD_ALPACA_LINES = {
    "empty-output": (b'{"instruction": "q", "input": "", "output": ""}', "empty 'output'"),
    "input-int": (b'{"instruction": "q", "input": 3, "output": "a"}', "field 'input' must be a string"),
}

FILE_CASES = [
    Case("empty-file", {"train.jsonl": b""}, ["{d}/train.jsonl", "no examples found"]),
    Case("blank-lines-only", {"train.jsonl": b"\n  \n\t\n"}, ["{d}/train.jsonl", "no examples found"]),
    Case("empty-text-file", {"train.txt": b"   \n"}, ["{d}/train.txt", "no examples found"]),
    Case("binary-text-file", {"train.txt": b"PK\x03\x04\x00\x00" * 50}, ["{d}/train.txt", "binary"]),
    Case("latin1-text-file", {"train.txt": b"line one\ncaf\xe9\n"}, ["{d}/train.txt:2:", "not valid UTF-8"]),
    Case("binary-as-jsonl", {"train.jsonl": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))}, ["{d}/train.jsonl:1:", "not valid UTF-8"]),
    Case("utf16-jsonl", {"train.jsonl": TEXT_OK.decode().encode("utf-16")}, ["{d}/train.jsonl:1:", "UTF-16"]),
    Case("corrupt-parquet", {"train.parquet": b"PAR1 definitely not parquet"}, ["{d}/train.parquet", "not a readable Parquet file"]),
    Case("50MB-line", {"train.jsonl": TEXT_OK + b'{"text": "' + b"x" * (50 * 2**20) + b'"}\n'}, ["{d}/train.jsonl:6:", f"longer than {MAX_LINE_BYTES // 2**20} MB"]),
    Case("truncated-last-line", {"train.jsonl": TEXT_OK + b'{"text": "cut off'}, ["{d}/train.jsonl:6:", "not valid JSON"]),
    Case("text-then-prompt-completion", {"train.jsonl": TEXT_OK + PC_OK}, ["{d}/train.jsonl:6:", "prompt_completion data but earlier records are text"]),
    Case("pinned-format-mismatch", {"train.jsonl": TEXT_OK}, ["{d}/train.jsonl:1:", "text data but earlier records are chat"], args=["--data.format", "chat"]),
    Case("bad-eval-file", {"train.jsonl": TEXT_OK, "eval.jsonl": b'{"text": 1}\n'}, ["{d}/eval.jsonl:1:", "must be a string"],
         sections={"data": {"eval": ["{d}/eval.jsonl"]}}),
    Case("template-refuses", {"train.jsonl": CHAT_OK}, ["{d}/train.jsonl:1:", "the chat template refused this conversation (roles must alternate)"],
         sections={"tokenizer": {"chat_template": "{{ raise_exception('roles must alternate') }}"}}),
    Case("template-syntax", {"train.jsonl": CHAT_OK}, ["tokenizer.chat_template", "not valid Jinja"],
         sections={"tokenizer": {"chat_template": "{% for %}"}}),
]

CONFIG_CASES = [
    Case("unknown-key", {"train.jsonl": TEXT_OK}, ["'data.seqlen'", "did you mean 'seq_len'"], args=["--data.seqlen", "8"]),
    Case("unknown-section", {"train.jsonl": TEXT_OK}, ["'bogus'"], args=["--bogus.x", "1"]),
    Case("unknown-key-in-file", {"train.jsonl": TEXT_OK}, ["'output.dri'"], sections={"output": {"dri": "x"}}),
    Case("wrong-type-int", {"train.jsonl": TEXT_OK}, ["'data.seq_len'", "expected an integer"], args=["--data.seq_len", "long"]),
    Case("wrong-type-bool", {"train.jsonl": TEXT_OK}, ["'data.pack'", "expected true/false"], args=["--data.pack", "maybe"]),
    Case("wrong-type-float-for-int", {"train.jsonl": TEXT_OK}, ["'train.micro_batch'"], args=["--train.micro_batch", "2.5"]),
    Case("wrong-type-list", {"train.jsonl": TEXT_OK}, ["'data.train'"], args=["--data.train", "{a: 1}"]),
    Case("section-not-mapping", {"train.jsonl": TEXT_OK}, ["'budget'"], args=["--budget", "[1, 2]"]),
    Case("negative-steps", {"train.jsonl": TEXT_OK}, ["'budget.steps'", "must be > 0"], args=["--budget.steps", "-3"]),
    Case("negative-time", {"train.jsonl": TEXT_OK}, ["'budget.time'"], args=["--budget.time", "-5s"]),
    Case("negative-minutes", {"train.jsonl": TEXT_OK}, ["'budget.time'", "must be > 0, got -300"], args=["--budget.time", "-5m"]),
    Case("negative-eval-every", {"train.jsonl": TEXT_OK}, ["'eval.every'", "must be > 0"], args=["--eval.every", "-5m"]),
    Case("bad-role-mapping", {"train.jsonl": SHAREGPT_OK}, ["'data.roles.bot'"], args=["--data.roles", "{bot: robot}"]),
    # the run folder's parents that the failed run created go too: no empty runs/ left behind
    Case("bad-data-new-parent-folders", {"train.jsonl": TEXT_OK + b"{}\n"}, ["{d}/train.jsonl:6:"], args=["--output.dir", "{d}/runs/a/run"]),
    Case("nan-lr", {"train.jsonl": TEXT_OK}, ["'optim.lr'", "finite"], args=["--optim.lr", ".nan"]),
    Case("infinite-time", {"train.jsonl": TEXT_OK}, ["'budget.time'", "finite"], args=["--budget.time", ".inf"]),
    Case("list-as-method-name", {"train.jsonl": TEXT_OK}, ["'method.name'"], args=["--method.name", "[a]"]),
    Case("zero-tokens", {"train.jsonl": TEXT_OK}, ["'budget.tokens'"], args=["--budget.tokens", "0"]),
    Case("negative-flops", {"train.jsonl": TEXT_OK}, ["'budget.flops'"], args=["--budget.flops", "-1e15"]),
    Case("negative-memory", {"train.jsonl": TEXT_OK}, ["'budget.memory'"], args=["--budget.memory", "-24GB"]),
    Case("eval-fraction-out-of-range", {"train.jsonl": TEXT_OK}, ["'data.eval_fraction'"], args=["--data.eval_fraction", "1.5"]),
    Case("on-error-unknown", {"train.jsonl": TEXT_OK}, ["'data.on_error'", "'error', 'skip'"], args=["--data.on_error", "ignore"]),
    Case("on-error-bool", {"train.jsonl": TEXT_OK}, ["'data.on_error'"], args=["--data.on_error", "true"]),
    Case("train-path-missing", {"train.jsonl": TEXT_OK}, ["'data.train'", "/does/not/exist", "no such file"], args=["--data.train", "/does/not/exist"]),
    Case("eval-path-missing", {"train.jsonl": TEXT_OK}, ["'data.eval'", "no such file"], args=["--data.eval", "{d}/nope.jsonl"]),
    Case("glob-matches-nothing", {"train.jsonl": TEXT_OK}, ["'data.train'", "matches no files"], args=["--data.train", "{d}/*.nothing"]),
    Case("folder-without-data", {"train.jsonl": TEXT_OK, "sub/image.png": b"\x89PNG"}, ["'data.train'", "no readable files"], args=["--data.train", "{d}/sub"]),
    Case("empty-data-path", {"train.jsonl": TEXT_OK}, ["'data.train[0]'", "empty path"], sections={"data": {"train": [""]}}),
    Case("empty-output-dir", {"train.jsonl": TEXT_OK}, ["'output.dir'", "empty path"], sections={"output": {"dir": " "}}),
    Case("cache-dir-is-a-file", {"train.jsonl": TEXT_OK, "cachefile": b"x"}, ["'data.cache_dir'", "is a file"], args=["--data.cache_dir", "{d}/cachefile"]),
    Case("model-folder-missing", {"train.jsonl": TEXT_OK}, ["'model.name'", "no such folder"], args=["--model.init", "pretrained", "--model.name", "{d}/no-model"]),
    Case("tokenizer-folder-missing", {"train.jsonl": TEXT_OK}, ["'tokenizer.name'", "no such folder"], args=["--tokenizer.name", "./no/such/tokenizer"]),
    Case("seq-len-over-context", {"train.jsonl": TEXT_OK}, ["'data.seq_len'", "max_position_embeddings 32"], sections={"model": {"arch": {"max_position_embeddings": 32}}}),
    Case("unknown-preset", {"train.jsonl": TEXT_OK}, ["'model.preset'"], args=["--model.preset", "llama-huge"]),
    Case("output-dir-is-a-file", {"train.jsonl": TEXT_OK, "afile": b"x"}, ["output.dir", "is a file"], args=["--output.dir", "{d}/afile"]),
    Case("output-dir-under-a-file", {"train.jsonl": TEXT_OK, "afile": b"x"}, ["'output.dir'", "cannot create"], args=["--output.dir", "{d}/afile/run"]),
    Case("override-without-value", {"train.jsonl": TEXT_OK}, ["--budget.steps", "has no value"], args=["--budget.steps"]),
    Case("yaml-alias-loop", {"train.jsonl": TEXT_OK}, ["--budget", "YAML alias"], args=["--budget", "&a {x: *a}"]),
]

CASES = (
    bad_line_cases("text", TEXT_OK, BAD_TEXT_LINES)
    + bad_line_cases("pc", PC_OK, BAD_PC_LINES)
    + bad_line_cases("chat", CHAT_OK, BAD_CHAT_LINES)
    + bad_line_cases("sharegpt", SHAREGPT_OK, BAD_SHAREGPT_LINES)
    + bad_line_cases("alpaca", ALPACA_OK, BAD_ALPACA_LINES)
    + FILE_CASES
    + CONFIG_CASES
)


def test_there_are_many_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_names_where_and_writes_nothing(case, tmp_path, tok_dir, capsys):
    d = str(tmp_path)
    for name, content in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    sections = json.loads(json.dumps(case.sections).replace("{d}", d))
    config = write_config(tmp_path, tmp_path / next(iter(case.files)), tok_dir, **sections)
    before = snapshot(tmp_path)
    code, err, _ = cli(capsys, "train", config, "--quiet", *[a.replace("{d}", d) for a in case.args])
    assert_one_clear_error(code, err, [f.replace("{d}", d) for f in case.expect])
    assert_nothing_written(tmp_path, err)
    assert {k: v for k, v in snapshot(tmp_path).items() if k.split("/")[0] != "cache"} == before


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"model: [unclosed\n", "not valid YAML"),
        (b"- a\n- b\n", "top level must be a mapping"),
        (b"\xff\xfe\x00garbage", "not a text file"),
        (b"budget:\n  time: 2001-13-01\n", "not valid YAML"),
    ],
    ids=["unclosed", "a-list", "binary", "impossible-date"],
)
def test_bad_config_file_is_named(tmp_path, capsys, content, fragment):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    code, err, _ = cli(capsys, "train", path)
    assert_one_clear_error(code, err, [str(path), fragment])


def test_missing_config_file(tmp_path, capsys):
    code, err, _ = cli(capsys, "train", tmp_path / "nope.yaml")
    assert_one_clear_error(code, err, [f"{tmp_path}/nope.yaml", "does not exist"])


# =========================================================================== output folders


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tok_dir):
    """A finished two-step run (with its final checkpoint) that tests copy and tamper with."""
    tmp = tmp_path_factory.mktemp("trained")
    data = tmp / "train.jsonl"
    data.write_bytes(TEXT_OK * 4)
    cfg = yaml.safe_load(write_config(tmp, data, tok_dir).read_text())
    summary = budgetune.train(cfg, quiet=True)
    assert summary["data"]["skipped_records"] == 0 and summary["data"]["skipped_reasons"] == []
    return tmp / "run"


def copy_run(trained_run: Path, tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(trained_run, run)
    return run


def test_output_folder_that_holds_a_run_is_kept(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    before = snapshot(run)
    code, err, _ = cli(capsys, "train", run / "config.yaml", "--output.dir", run, "--quiet")
    assert_one_clear_error(code, err, [str(run), "already holds files", "--resume", "--overwrite"])
    assert snapshot(run) == before


@pytest.mark.parametrize("command", ["train", "tune"])
def test_overwrite_with_bad_data_keeps_the_run_it_would_replace(trained_run, tmp_path, capsys, command):
    """--overwrite replaces a run only once the new one is under way (`tune` reads the data before it replaces
    anything): bad data leaves the old one as it was."""
    run = copy_run(trained_run, tmp_path)
    before = snapshot(run)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    code, err, _ = cli(capsys, command, run / "config.yaml", "--output.dir", run, "--data.train", bad, "--overwrite", "--quiet")
    assert_one_clear_error(code, err, [f"{bad}:2"])
    assert snapshot(run) == before
    assert not list(tmp_path.glob(".run.replaced-*"))


@pytest.mark.parametrize("how", ["flag", "config"])
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, tok_dir, capsys, how):
    """--overwrite (or output.overwrite) may empty only a run folder; a config naming some other
    folder — even one holding a config.yaml — cannot get it deleted."""
    data = tmp_path / "train.jsonl"
    data.write_bytes(TEXT_OK)
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "config.yaml").write_text("mine: true\n")
    (precious / "notes.txt").write_text("do not delete")
    config = write_config(tmp_path, data, tok_dir, output={"dir": str(precious), "overwrite": how == "config"})
    before = snapshot(precious)
    code, err, _ = cli(capsys, "train", config, "--quiet", *(["--overwrite"] if how == "flag" else []))
    assert_one_clear_error(code, err, [str(precious), "not a budgetune run folder"])
    assert snapshot(precious) == before


def test_export_overwrite_refuses_a_folder_that_is_not_an_export(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    before = snapshot(precious)
    code, err, _ = cli(capsys, "export", run, "--out", precious, "--overwrite")
    assert_one_clear_error(code, err, [str(precious), "not a model or adapter folder"])
    assert snapshot(precious) == before
    code, err, _ = cli(capsys, "export", run, "--out", tmp_path / "exported")  # a new folder is fine
    assert code == 0, err
    code, err, _ = cli(capsys, "export", run, "--out", tmp_path / "exported", "--overwrite")  # and replacing an export
    assert code == 0, err


# =========================================================================== data.on_error: skip


def test_on_error_skip_trains_and_reports(tmp_path, tok_dir, capsys):
    bad = [b'{"text": "x"', b'{"text": 42}', b'{"text": ""}', b'{"body": "x"}', b'{"text": "\\ud800"}', b"[1]",
           b'{"text": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}']
    lines = TEXT_OK.splitlines() * 4
    for i, line in enumerate(bad):
        lines.insert(3 * i + 1, line)  # bad lines at 2, 5, 8, ...
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    config = write_config(tmp_path, data, tok_dir)
    code, err, out = cli(capsys, "train", config, "--data.on_error", "skip")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert summary["skipped_records"] == len(bad)
    assert summary["train_examples"] + summary["eval_examples"] == 20
    assert [r.split(": ")[0] for r in summary["skipped_reasons"]] == [f"{data}:{3 * i + 2}" for i in range(5)]
    assert "not valid JSON" in summary["skipped_reasons"][0] and "must be a string" in summary["skipped_reasons"][1]
    assert f"left out {len(bad)} bad record(s)" in out + err


def test_on_error_skip_with_nothing_left_is_an_error(tmp_path, tok_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"text": 1}\n{"text": ""}\nnot json\n')
    config = write_config(tmp_path, data, tok_dir)
    code, err, _ = cli(capsys, "train", config, "--quiet", "--data.on_error", "skip")
    assert_one_clear_error(code, err, [str(data), "no usable examples", "3 bad records were skipped", f"{data}:1:"])
    assert_nothing_written(tmp_path)


def test_on_error_skip_does_not_hide_config_errors(tmp_path, tok_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(CHAT_OK)
    config = write_config(tmp_path, data, tok_dir, tokenizer={"chat_template": "{% if %}"})
    code, err, _ = cli(capsys, "train", config, "--quiet", "--data.on_error", "skip")
    assert_one_clear_error(code, err, ["tokenizer.chat_template"])
    assert_nothing_written(tmp_path)


def test_skip_counts_survive_the_cache_and_error_mode_is_not_fooled(tmp_path, tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_bytes(TEXT_OK + b"broken\n" + TEXT_OK)
    cache, logs = tmp_path / "cache", []
    for _ in range(2):  # tokenised, then from the cache
        got = tokenize_files([data], tokenizer, load_config(_base(data, on_error="skip")).data, cache, log=logs.append)
        assert (len(got), got.skipped) == (10, 1) and got.skip_reasons[0].startswith(f"{data}:6: not valid JSON")
    assert any("from cache" in m for m in logs)
    with pytest.raises(DataError, match=rf"{data}:6: not valid JSON"):  # a skip-mode cache entry never answers error mode
        tokenize_files([data], tokenizer, load_config(_base(data)).data, cache, log=logs.append)


def test_skip_passes_over_a_giant_line_without_reading_it_whole(tmp_path):
    from budgetune.data.sources import Skipped

    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "a"}\n' + b"x" * (3 * MAX_LINE_BYTES) + b'\n{"text": "b"}\n')
    skipped = Skipped()
    assert [w for _, w in read_records(data, skipped=skipped)] == [f"{data}:1", f"{data}:3"]
    assert skipped.count == 1 and "line longer than" in skipped.reasons[0]


def _base(data: Path, **data_keys) -> dict:
    return {"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": [str(data)], **data_keys}, "budget": {"steps": 1}}


# =========================================================================== long sequences, chat templates


def test_long_instruction_examples_are_truncated_counted_and_logged(tmp_path, tokenizer):
    data = tmp_path / "pc.jsonl"
    long = " ".join(["word"] * 60)
    data.write_bytes(PC_OK + jl({"prompt": long, "completion": " x"}, {"prompt": "q", "completion": long}))
    cfg = load_config(_base(data, seq_len=32, eval_fraction=0, cache_dir=str(tmp_path / "cache")))
    logs: list[str] = []
    bundle = prepare_data(cfg, tokenizer, log=logs.append)
    assert bundle.summary()["truncated_examples"] == 2
    assert any("2 example(s) longer than data.seq_len (32 tokens) were truncated" in m for m in logs)


def test_long_text_is_split_not_truncated(tmp_path, tokenizer):
    data = tmp_path / "t.jsonl"
    data.write_bytes(jl({"text": " ".join(["word"] * 200)}))
    cfg = load_config(_base(data, seq_len=16, eval_fraction=0, cache_dir=str(tmp_path / "cache")))
    logs: list[str] = []
    bundle = prepare_data(cfg, tokenizer, log=logs.append)
    assert bundle.summary()["truncated_examples"] == 0 and len(bundle.train) > 5
    assert not any("truncated" in m for m in logs)


def test_tokenizer_without_chat_template_gets_chatml_and_says_so(tmp_path, tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    bare.save_pretrained(str(tmp_path / "bare"))
    data = tmp_path / "chat.jsonl"
    data.write_bytes(CHAT_OK)
    cfg = load_config(_base(data, eval_fraction=0, cache_dir=str(tmp_path / "cache")), {"tokenizer": {"name": str(tmp_path / "bare")}})
    loaded = load_tokenizer(cfg, log=lambda m: None)
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    logs: list[str] = []
    prepare_data(cfg, loaded, log=logs.append)
    assert any("default ChatML template" in m for m in logs)
    own = copy.deepcopy(tokenizer)
    own.chat_template = DEFAULT_CHAT_TEMPLATE.replace("<|im_start|>", "<|im_start|> ")  # a template of its own
    logs.clear()
    prepare_data(cfg, own, log=logs.append)
    assert not any("ChatML" in m for m in logs)
    # a folder whose tokenizer carries this very template (a budgetune run's model/ does) has one: not "none"
    loaded.save_pretrained(str(tmp_path / "from-a-run"))
    cfg = load_config(cfg, {"tokenizer": {"name": str(tmp_path / "from-a-run")}})
    again = load_tokenizer(cfg, log=lambda m: None)
    assert again.chat_template == DEFAULT_CHAT_TEMPLATE
    logs.clear()
    prepare_data(cfg, again, log=logs.append)
    assert not any("ChatML" in m for m in logs)


# =========================================================================== hostile files


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_resume_refuses_a_pickle_that_would_run_code(trained_run, tmp_path, capsys, writer):
    run = copy_run(trained_run, tmp_path)
    marker = tmp_path / "PWNED"
    (optimizer_file,) = run.glob("checkpoints/step-*/optimizer.pt")
    payload = {"state": {0: _RunsCode(marker)}, "param_groups": []}
    if writer == "torch.save":
        torch.save(payload, optimizer_file)
    else:
        optimizer_file.write_bytes(pickle.dumps(payload, protocol=4))
    # whoever swapped the file could also edit the checkpoint's size manifest (which alone would have it
    # skipped as damaged): the load itself must refuse it
    state_file = optimizer_file.parent / "state.json"
    state = json.loads(state_file.read_text())
    state.pop("file_sizes")
    state_file.write_text(json.dumps(state))
    before = snapshot(run)
    code, err, _ = cli(capsys, "train", run / "config.yaml", "--resume", "--extend", "--output.dir", run, "--budget.steps", "4",
                       "--quiet")
    assert_one_clear_error(code, err, [str(optimizer_file), "refusing to load it", "could run code"])
    assert not marker.exists(), "the pickle ran code"
    assert snapshot(run) == before


def test_model_weights_load_from_safetensors_only(tmp_path, tok_dir, capsys):
    from transformers import LlamaConfig

    marker = tmp_path / "PWNED"
    model = tmp_path / "model"
    LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=300).save_pretrained(str(model))
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode(marker)}))
    data = tmp_path / "train.jsonl"
    data.write_bytes(TEXT_OK)
    config = write_config(tmp_path, data, tok_dir, model={"init": "pretrained", "name": str(model), "preset": None})
    code, err, _ = cli(capsys, "train", config, "--quiet")
    assert_one_clear_error(code, err, ["'model.name'", "safetensors only"])
    assert not marker.exists()
    assert_nothing_written(tmp_path)


def test_a_models_own_code_is_not_run_by_default(tmp_path, tok_dir, capsys):
    marker = tmp_path / "PWNED"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "hostile", "auto_map": {"AutoConfig": "hostile.HostileConfig"}}))
    (model / "hostile.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    data = tmp_path / "train.jsonl"
    data.write_bytes(TEXT_OK)
    config = write_config(tmp_path, data, tok_dir, model={"init": "pretrained", "name": str(model), "preset": None})
    code, err, _ = cli(capsys, "train", config, "--quiet")
    assert_one_clear_error(code, err, ["'model.name'", "model.trust_remote_code: true"])
    assert not marker.exists(), "the model's own code ran"
    assert_nothing_written(tmp_path)


def test_trust_remote_code_is_off_by_default(tmp_path, tok_dir, monkeypatch):
    import transformers

    cfg = load_config({"model": {"name": str(tok_dir)}, "data": {"train": ["x.txt"]}, "budget": {"steps": 1}})
    assert cfg.model.trust_remote_code is False
    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(cfg, log=lambda m: None)
    assert seen == [False]


def test_a_run_folder_cannot_opt_itself_into_remote_code(trained_run, tmp_path, capsys):
    """Loading a run folder whose config.yaml says trust_remote_code: true (eval, export --merge)
    needs the caller's --trust-remote-code too (a shared folder could otherwise run its own code)."""
    run = copy_run(trained_run, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, err, _ = cli(capsys, "eval", run, "--prompt", "x")  # (export of a full model copies files: no code runs)
    assert_one_clear_error(code, err, [str(run), "--trust-remote-code"])
    code, _, _ = cli(capsys, "eval", run, "--prompt", "x", "--trust-remote-code")
    assert code == 0


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node, {k.arg: k.value for k in node.keywords}


def test_source_loads_no_pickles_and_runs_no_remote_code_unasked():
    """Every torch.load in the package is weights-only, every model load is safetensors-only,
    numpy never unpickles, and trust_remote_code is never switched on in code."""
    torch_loads = model_loads = 0
    for path in SRC.rglob("*.py"):
        for call, kw in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(SRC)}:{call.lineno}"
            owner = call.func.value.id if isinstance(call.func.value, ast.Name) else None
            if owner == "torch" and call.func.attr == "load":
                torch_loads += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            if owner == "AutoModelForCausalLM" and call.func.attr == "from_pretrained":
                model_loads += 1
                if "gguf_file" in kw:  # a GGUF file is read by the gguf package (tensors and metadata, no pickle)
                    continue
                assert isinstance(kw.get("use_safetensors"), ast.Constant) and kw["use_safetensors"].value is True, where
            if owner == "np" and call.func.attr == "load":
                assert not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value), where
            if "trust_remote_code" in kw:
                assert not isinstance(kw["trust_remote_code"], ast.Constant) or kw["trust_remote_code"].value is False, where
    assert torch_loads >= 1 and model_loads >= 1  # the scan sees the calls it is meant to check


# =========================================================================== fuzzing

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
_json = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                     max_leaves=6)
_any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # includes lone surrogates
_message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "robot"]), _json),
                                  "content": st.one_of(_any_text, _json)})
_record = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(_any_text, _json)}),
    st.fixed_dictionaries({"prompt": st.one_of(_any_text, _json), "completion": st.one_of(_any_text, _json)}),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(_message, max_size=3), _json)}),
    _json,
)
_line = st.one_of(
    _record.map(lambda r: json.dumps(r).encode()),
    _record.map(lambda r: json.dumps(r).encode()[: len(json.dumps(r)) // 2]),  # cut short
    st.binary(max_size=40),
    st.sampled_from([b"[" * 5000, b'{"text": ' + b"9" * 5000 + b"}", b"\xef\xbb\xbf{}", b"NaN", b'{"text": "\\ud800"}']),
)
_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_WHERE = re.compile(r"^(.*):(\d+): ")


def _fuzz_file(lines: list[bytes]) -> tuple[Path, tempfile.TemporaryDirectory]:
    folder = tempfile.TemporaryDirectory()
    path = Path(folder.name) / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    return path, folder


@_FUZZ
@given(st.lists(_line, max_size=8))
def test_fuzz_jsonl_reader_parses_or_names_the_line(lines):
    path, folder = _fuzz_file(lines)
    with folder:
        try:
            records = list(read_records(path))
        except DataError as e:
            match = _WHERE.match(str(e))
            assert match and match.group(1) == str(path), str(e)
            assert 1 <= int(match.group(2)) <= len(path.read_bytes().split(b"\n"))
        else:
            assert all(isinstance(r, dict) and w.startswith(f"{path}:") for r, w in records)


@_FUZZ
@given(st.lists(_line, max_size=6), st.sampled_from(["error", "skip"]))
def test_fuzz_tokenising_gives_examples_or_one_data_error(tokenizer, lines, on_error):
    path, folder = _fuzz_file(lines)
    with folder:
        cfg = load_config(_base(path, on_error=on_error)).data
        try:
            data = tokenize_files([path], tokenizer, cfg, Path(folder.name) / "cache", log=lambda m: None)
        except DataError as e:
            message = str(e)
            whole_file = message.startswith((f"no examples found in {path}", f"no usable examples in {path}"))
            assert whole_file or (on_error == "error" and message.startswith(f"{path}:")), message
        else:
            assert len(data) >= 1 and len(data.tokens) == data.offsets[-1]
            assert on_error == "skip" or data.skipped == 0


# `method` is left out: see test_unhashable_method_name_is_a_config_error
_SECTIONS = [f.name for f in fields(Config) if f.name != "method" and is_dataclass(getattr(Config(), f.name))]
_KNOWN_KEYS = sorted(f"{section}.{f.name}" for section in _SECTIONS for f in fields(getattr(Config(), section)))
_key = st.one_of(st.sampled_from(_KNOWN_KEYS), st.sampled_from(_SECTIONS), st.text("abcdefghij._", min_size=1, max_size=12))
_value = st.one_of(
    st.text(max_size=16),
    _json.map(json.dumps),
    st.sampled_from(["-1", "0", "1.5", "1e999", ".nan", "-.inf", "null", "true", "~", "''", "[a, b]", "{x: 1}", "5m", "-5s",
                     "10GB", "2001-13-01", "[[[", "&a [*a]", "!!timestamp x", "!!binary x", "!!python/object:os.system"]),
)


@_FUZZ
@given(st.lists(st.tuples(_key, _value), max_size=4))
def test_fuzz_config_overrides_give_a_config_or_a_config_error(pairs):
    base = {"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": ["c.txt"]}, "budget": {"time": "90s"}}
    argv = [a for key, value in pairs for a in (f"--{key}", value)]
    try:
        cfg = load_config(base, argv)
    except BudgetuneError:
        return
    assert isinstance(cfg, Config)


@_FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), _json.map(lambda v: yaml.safe_dump(v))))
def test_fuzz_config_file_gives_a_mapping_or_names_the_file(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
        try:
            data = read_yaml(path)
        except ConfigError as e:
            assert str(path) in str(e)
        else:
            assert isinstance(data, dict)


def test_unhashable_method_name_is_a_config_error():
    with pytest.raises(ConfigError, match="method.name"):
        load_config({"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": ["c.txt"]},
                     "budget": {"time": "90s"}}, ["--method.name", "[a]"])
