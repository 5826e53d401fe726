"""Config loading, command-line overrides and validation (errors must name the key)."""

from __future__ import annotations

import os
import sysconfig

import pytest
import yaml

from budgetune.budget import Budget
from budgetune.config import (
    Config,
    expand_path,
    load_config,
    merge,
    parse_interval,
    parse_overrides,
    read_yaml,
)
from budgetune.errors import ConfigError
from budgetune.methods.full import FullOptions
from budgetune.methods.lora import LoraOptions


def base(**sections) -> dict:
    """A minimal valid config dict; `sections` replace whole sections."""
    data = {
        "model": {"init": "scratch", "preset": "llama-test"},
        "data": {"train": ["corpus.txt"]},
        "budget": {"time": "90s"},
    }
    data.update(sections)
    return data


def with_key(dotted: str, value) -> dict:
    """base() with one dotted key set (merged into its section)."""
    return merge(base(), parse_overrides([f"--{dotted}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")]))


# --------------------------------------------------------------------------- loading


def test_load_from_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  init: scratch\n  preset: llama-test\n"
        "data:\n  train: [a.txt, 'b/*.jsonl']\n  seq_len: 64\n"
        "method:\n  name: lora\n  r: 4\n"
        "budget:\n  tokens: 5M\n  steps: 100\n"
        "schedule:\n  name: wsd\n"
    )
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.train == ["a.txt", "b/*.jsonl"]
    assert cfg.data.seq_len == 64
    assert isinstance(cfg.method, LoraOptions) and cfg.method.r == 4 and cfg.method.alpha == 32.0
    assert cfg.budget.tokens == "5M"  # kept as written; parsed by Budget.from_config
    assert Budget.from_config(cfg.budget).tokens == 5_000_000
    assert cfg.budget.steps == 100
    assert cfg.budget.time is None
    assert cfg.schedule.name == "wsd"
    # untouched sections keep their defaults
    assert cfg.optim.name == "adamw" and cfg.train.micro_batch == 8


def test_load_from_dict_and_defaults():
    cfg = load_config(base())
    assert cfg.model.init == "scratch" and cfg.model.preset == "llama-test"
    assert cfg.budget.time == "90s"
    assert cfg.method.name == "full"
    assert cfg.eval.every == "auto" and cfg.checkpoint.every == "auto"


def test_load_from_config_round_trips():
    cfg = load_config(base(method={"name": "lora", "r": 8}))
    again = load_config(cfg)
    assert again == cfg
    assert again.method.r == 8


def test_single_path_becomes_list_and_int_is_float():
    cfg = load_config(base(data={"train": "one.txt"}, optim={"lr": 1}))
    assert cfg.data.train == ["one.txt"]
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_count_strings_coerce_to_int():
    cfg = load_config(merge(base(), {"train": {"micro_batch": "8"}, "budget": {"steps": "2k"}}))
    assert cfg.train.micro_batch == 8
    assert cfg.budget.steps == 2000


def test_explicit_full_method_options():
    cfg = load_config(base(method={"name": "full"}))
    assert isinstance(cfg.method, FullOptions)


def test_method_as_string_shorthand():
    cfg = load_config(base(method="lora"))
    assert isinstance(cfg.method, LoraOptions) and cfg.method.r == 16


# --------------------------------------------------------------------------- overrides


def test_parse_overrides_forms():
    out = parse_overrides(["--budget.time", "90s", "--method.name=lora", "--method.r", "8", "--data.train", "[a, b]"])
    assert out == {"budget": {"time": "90s"}, "method": {"name": "lora", "r": 8}, "data": {"train": ["a", "b"]}}


def test_parse_overrides_yaml_values():
    out = parse_overrides(["--data.pack", "false", "--optim.lr=1e-3", "--eval.every", "null", "--x.y=[unclosed"])
    assert out["data"]["pack"] is False
    assert out["optim"]["lr"] == "1e-3"  # YAML 1.1: no dot → string; coerced to float by load_config
    assert out["eval"]["every"] is None
    assert out["x"]["y"] == "[unclosed"  # not valid YAML: kept as the raw string


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["budget.time", "90s"], "unexpected argument"),
        (["--"], "unexpected argument"),
        (["--budget.time"], "has no value"),
        (["--budget", "5", "--budget.time", "3"], "'budget' is not a section"),
    ],
)
def test_parse_overrides_errors(args, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_overrides(args)


def test_overrides_applied_by_load_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base(method={"name": "full"}, optim={"lr": 1e-4})))
    cfg = load_config(path, ["--budget.time", "2m", "--method.name=lora", "--method.r", "8", "--optim.lr=1.0e-3"])
    assert cfg.budget.time == "2m"
    assert isinstance(cfg.method, LoraOptions) and cfg.method.r == 8
    assert cfg.optim.lr == pytest.approx(1e-3)
    # the rest of the file survives a deep merge
    assert cfg.model.preset == "llama-test" and cfg.data.train == ["corpus.txt"]


def test_overrides_as_dict():
    cfg = load_config(base(), {"budget": {"steps": 10}})
    assert cfg.budget.steps == 10 and cfg.budget.time == "90s"


def test_override_on_method_string_shorthand_keeps_method():
    cfg = load_config(base(method="lora"), ["--method.r", "8"])
    assert isinstance(cfg.method, LoraOptions) and cfg.method.r == 8


def test_merge_is_deep_and_does_not_mutate():
    a = {"budget": {"time": "1m", "steps": 5}, "data": {"train": ["x"]}}
    b = {"budget": {"time": "2m"}, "optim": {"lr": 0.1}}
    assert merge(a, b) == {"budget": {"time": "2m", "steps": 5}, "data": {"train": ["x"]}, "optim": {"lr": 0.1}}
    assert a == {"budget": {"time": "1m", "steps": 5}, "data": {"train": ["x"]}}


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "data, key",
    [
        (merge(base(), {"bogus": 1}), "'bogus'"),
        (merge(base(), {"budget": {"tme": "5m"}}), "'budget.tme'"),
        (merge(base(), {"data": {"seqlen": 10}}), "'data.seqlen'"),
        (merge(base(), {"method": {"name": "full", "r": 8}}), "'method.r'"),
        (merge(base(), {"method": {"rank": 8}}), "'method.rank'"),
        (merge(base(), {"method": {"name": "lora", "rr": 8}}), "'method.rr'"),
    ],
)
def test_unknown_keys_name_the_key(data, key):
    with pytest.raises(ConfigError, match="unknown config key " + key):
        load_config(data)


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'time'"):
        load_config(merge(base(), {"budget": {"tme": "5m"}}))


def test_unknown_key_via_override():
    with pytest.raises(ConfigError, match="'optim.learning_rate'"):
        load_config(base(), ["--optim.learning_rate", "0.1"])


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "dotted, value",
    [
        ("train.micro_batch", "abc"),
        ("train.micro_batch", True),
        ("train.micro_batch", 2.5),
        ("data.seq_len", "long"),
        ("optim.lr", "fast"),
        ("optim.lr", False),
        ("data.pack", "yes please"),
        ("data.pack", 1),
        ("model.init", "random"),
        ("model.dtype", "int8"),
        ("model.arch", [1, 2]),
        ("data.train", {"a": 1}),
        ("tokenizer.name", 5),
        ("budget.tokens", 1.5),
        ("budget.tokens", "lots"),
        ("eval.every", True),
        ("method.r", "eight"),
    ],
)
def test_wrong_types_name_the_key(dotted, value):
    data = with_key(dotted, value)
    if dotted.startswith("method."):
        data["method"]["name"] = "lora"
    with pytest.raises(ConfigError, match=f"'{dotted}'"):
        load_config(data)


def test_section_must_be_mapping():
    with pytest.raises(ConfigError, match="config key 'data'"):
        load_config(base(data=["a.txt"]))


# --------------------------------------------------------------------------- invalid values


@pytest.mark.parametrize(
    "budget, fragment",
    [
        ({"time": 0}, "'budget.time': must be > 0"),
        ({"time": -5}, "'budget.time': must be > 0"),
        ({"time": "0s"}, "'budget.time': must be > 0"),
        ({"time": "-5s"}, "'budget.time'"),
        ({"time": "10 minutes"}, "'budget.time'"),
        ({"time": "soon"}, "'budget.time'"),
        ({"time": "5x"}, "'budget.time'"),
        ({"steps": 0}, "'budget.steps': must be > 0"),
        ({"steps": -3}, "'budget.steps'"),
        ({"tokens": 0}, "'budget.tokens'"),
        ({"tokens": "-1M"}, "'budget.tokens'"),
        ({"flops": "0"}, "'budget.flops'"),
        ({"flops": "many"}, "'budget.flops'"),
        ({"time": "1m", "reserve": -1}, "'budget.reserve'"),
        ({"time": "1m", "reserve": "later"}, "'budget.reserve'"),
        ({}, "no budget given"),
        ({"reserve": "10s"}, "no budget given"),
    ],
)
def test_bad_budgets(budget, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(base(budget=budget))


def test_zero_reserve_is_allowed():
    cfg = load_config(base(budget={"time": "1m", "reserve": 0}))
    assert cfg.budget.reserve == 0.0


@pytest.mark.parametrize(
    "dotted, value, fragment",
    [
        ("schedule.name", "triangle", "'schedule.name': unknown schedule 'triangle'"),
        ("optim.name", "lion9", "'optim.name': unknown optimizer 'lion9'"),
        ("method.name", "dora-xl", "'method.name': unknown method 'dora-xl'"),
        ("eval.every", 1.5, "'eval.every'"),
        ("eval.every", -0.25, "'eval.every'"),
        ("eval.every", "sometimes", "'eval.every'"),
        ("checkpoint.every", 2, "'checkpoint.every'"),
        ("schedule.warmup", 1.0, "'schedule.warmup'"),
        ("schedule.warmup", -0.1, "'schedule.warmup'"),
        ("schedule.decay", 0, "'schedule.decay'"),
        ("schedule.decay_shape", "cubic", "'schedule.decay_shape'"),
        ("data.seq_len", 0, "'data.seq_len'"),
        ("data.seq_len", 1, "'data.seq_len': must be at least 2"),
        ("data.eval_fraction", 1.0, "'data.eval_fraction'"),
        ("train.micro_batch", 0, "'train.micro_batch'"),
        ("train.grad_accum", -1, "'train.grad_accum'"),
        ("optim.lr", 0, "'optim.lr'"),
        ("optim.grad_clip", -1.0, "'optim.grad_clip'"),
        ("checkpoint.keep", 0, "'checkpoint.keep'"),
        ("data.train", [], "'data.train': required"),
    ],
)
def test_invalid_values_name_the_key(dotted, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(with_key(dotted, value))


def test_pretrained_needs_model_name():
    with pytest.raises(ConfigError, match="'model.name'"):
        load_config(base(model={"init": "pretrained"}))


def test_scratch_needs_an_architecture():
    with pytest.raises(ConfigError, match="model.init is 'scratch'"):
        load_config(base(model={"init": "scratch"}))


@pytest.mark.parametrize("every", [None, 0, 1, 0.1, "5m", "90s"])
def test_valid_intervals_accepted(every):
    cfg = load_config(with_key("eval.every", every))
    assert cfg.eval.every == every


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), (0, None), (0.25, ("progress", 0.25)), (1, ("progress", 1.0)), ("5m", ("seconds", 300.0)), ("90s", ("seconds", 90.0))],
)
def test_parse_interval(value, expected):
    assert parse_interval(value) == expected


@pytest.mark.parametrize("value", [1.01, -0.5, "often"])
def test_parse_interval_rejects(value):
    with pytest.raises(ValueError):
        parse_interval(value)


# --------------------------------------------------------------------------- paths and files


def test_expand_path_stdlib_and_home():
    stdlib = sysconfig.get_paths()["stdlib"]
    assert expand_path("{stdlib}/json/*.py") == f"{stdlib}/json/*.py"
    assert os.path.isdir(expand_path("{stdlib}/json"))
    assert expand_path("~/data.txt") == os.path.join(os.path.expanduser("~"), "data.txt")
    assert expand_path("plain/path.txt") == "plain/path.txt"


def test_builtin_demo_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./demo file shadows the built-in
    data = read_yaml("demo")
    assert data["model"]["preset"] == "llama-tiny"
    assert any("{stdlib}" in p for p in data["data"]["train"])
    cfg = load_config("demo")
    assert cfg.model.init == "scratch"
    assert cfg.budget.time == "3m"
    assert cfg.tokenizer.train_vocab_size == 2048


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_yaml(listy)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=str(binary.name)):
        read_yaml(binary)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty) == {}
