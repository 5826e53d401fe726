"""Data pipeline: sources, formats (loss masks), tokenisation cache, packing, splits, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import budgetune.data.tokenize as tokmod
from budgetune.config import DataConfig, load_config
from budgetune.data import IGNORE, iter_texts, prepare_data, split_heldout
from budgetune.data.formats import CHAT_ROLES, FORMATS, ChatFormat, PromptCompletionFormat, TextFormat, detect_format
from budgetune.data.packing import build_rows, pack_examples, split_long
from budgetune.data.sampler import RowSampler
from budgetune.data.sources import is_datasets_folder, parse_json_line, read_records, resolve
from budgetune.data.tokenize import TokenizedSet, default_cache_dir, tokenize_files
from budgetune.errors import ConfigError, DataError


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def dcfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def tokenize(paths, tokenizer, cache_dir, log=None, **kw) -> TokenizedSet:
    logs = [] if log is None else log
    return tokenize_files([Path(p) for p in paths], tokenizer, dcfg(**kw), cache_dir, log=logs.append)


def masked_runs(tokenizer, ids, mask) -> list[str]:
    """Decoded text of each maximal run of loss-masked tokens."""
    runs, cur = [], []
    for tok, m in zip(ids, mask):
        if m:
            cur.append(int(tok))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in runs]


def example(data: TokenizedSet, i: int) -> tuple[list[int], list[int]]:
    s, e = data.offsets[i], data.offsets[i + 1]
    return data.tokens[s:e].tolist(), data.loss_mask[s:e].tolist()


def make_set(lengths, fmt="prompt_completion", mask=None) -> TokenizedSet:
    """Example i holds tokens 1000*i + 1, 1000*i + 2, ... (distinct and recognisable)."""
    tokens = np.concatenate([1000 * i + np.arange(1, n + 1) for i, n in enumerate(lengths)]).astype(np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    loss = np.ones(len(tokens), np.uint8) if mask is None else np.asarray(mask, np.uint8)
    return TokenizedSet(tokens, loss, offsets, fmt)


# =========================================================================== sources


def test_resolve_file_folder_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    a = tmp_path / "a.txt"
    b = tmp_path / "sub" / "b.jsonl"
    c = tmp_path / "sub" / "c.md"
    junk = tmp_path / "sub" / "image.png"
    for p in (a, b, c):
        p.write_text("x")
    junk.write_bytes(b"\x89PNG")
    assert resolve([str(a)]) == [a]
    assert resolve([str(tmp_path)]) == [a, b, c]  # recursive, readable suffixes only, sorted
    assert resolve([str(tmp_path / "sub" / "*")]) == [b, c, junk]  # a glob takes what it matches
    assert resolve([str(tmp_path / "**" / "*.md")]) == [c]
    assert resolve([str(tmp_path)], max_files=2) == [a, b]


def test_resolve_stdlib_glob():
    files = resolve(["{stdlib}/json/*.py"])
    assert files and all(f.suffix == ".py" and f.parent.name == "json" for f in files)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: str(d / "missing.txt"), "no such file or folder"),
        (lambda d: str(d / "*.nothing"), "matches no files"),
        (lambda d: str(d), "has no readable files"),
    ],
)
def test_resolve_errors(tmp_path, make, fragment):
    (tmp_path / "data.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match=fragment):
        resolve([make(tmp_path)])


def test_folder_walk_counts_and_names_what_it_leaves_out(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("text")
    (tmp_path / "d" / "GPL-3").write_text("licence text")
    (tmp_path / "d" / "news.gz").write_bytes(b"\x1f\x8b\x08\x00\x00\x00")
    logs = []
    assert resolve([str(tmp_path / "d")], log=logs.append) == [tmp_path / "d" / "a.txt"]
    assert len(logs) == 1 and "reading 1 files, left out 2 files (" in logs[0]
    assert "no suffix: 1" in logs[0] and "suffix .gz: 1" in logs[0] and str(tmp_path / "d" / "GPL-3") in logs[0]
    assert "data.format: text" in logs[0] and f"'{tmp_path}/d/**/*'" in logs[0]
    # data.format text: files of any suffix, binary ones left out and counted
    logs.clear()
    assert resolve([str(tmp_path / "d")], all_files=True, log=logs.append) == [tmp_path / "d" / "GPL-3", tmp_path / "d" / "a.txt"]
    assert "left out 1 file (binary: 1; e.g. " in logs[0] and "news.gz" in logs[0]


def test_folder_of_suffixless_files_says_how_to_read_them(tmp_path):
    for name in ("GPL-3", "Artistic", "BSD"):
        (tmp_path / name).write_text(f"{name} licence")
    with pytest.raises(DataError, match=r"has no readable files: 3 files \(no suffix: 3; e\.g\. .*data\.format: text.*\*\*/\*") as err:
        resolve([str(tmp_path)])
    assert "config key 'data.train'" in str(err.value)
    assert len(resolve([str(tmp_path)], all_files=True)) == 3


def test_read_text_file(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("hello world\n", encoding="utf-8")
    assert list(read_records(p)) == [({"text": "hello world\n"}, str(p))]
    assert list(read_records(p, "body")) == [({"body": "hello world\n"}, str(p))]
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n")
    assert list(read_records(blank)) == []


def test_binary_file_rejected(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"PK\x03\x04\x00\x00\x01\x02" * 10)
    with pytest.raises(DataError, match="binary"):
        list(read_records(p))


def test_non_utf8_text_names_the_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"line one\nline two\ncaf\xe9\n")
    with pytest.raises(DataError, match=rf"{p.name}:3: not valid UTF-8"):
        list(read_records(p))


def test_jsonl_records_and_line_numbers(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert list(read_records(p)) == [({"text": "a"}, f"{p}:1"), ({"text": "b"}, f"{p}:3")]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n{"text": "d"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        list(read_records(p))
    assert f"{p}:3" in str(err.value)
    assert "not valid JSON" in str(err.value)


def test_json_error_message_reads_well():
    with pytest.raises(DataError, match=r"^f:3: not valid JSON \(Unterminated string starting at column 10\); each line") as err:
        parse_json_line(b'{"text": "x', "f:3")
    assert "at at" not in str(err.value)


def test_jsonl_non_object_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "a"}\n[1, 2, 3]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p.name}:2: expected a JSON object per line, got list"):
        list(read_records(p))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "completion": ["2", "4"]}), p)
    assert resolve([str(tmp_path)]) == [p]
    assert list(read_records(p)) == [
        ({"prompt": "1+1=", "completion": "2"}, f"{p}:row 0"),
        ({"prompt": "2+2=", "completion": "4"}, f"{p}:row 1"),
    ]


def test_bad_parquet(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_records(p))


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["first doc", "second doc"]}).save_to_disk(str(folder))
    assert is_datasets_folder(folder)
    assert resolve([str(folder)]) == [folder]  # the folder is one source, not its arrow files
    assert list(read_records(folder)) == [({"text": "first doc"}, f"{folder}:row 0"), ({"text": "second doc"}, f"{folder}:row 1")]


def test_datasets_dict_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ok = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}), "test": datasets.Dataset.from_dict({"text": ["e"]})}).save_to_disk(str(ok))
    assert [r for r, _ in read_records(ok)] == [{"text": "t"}]
    bad = tmp_path / "dd-no-train"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["v"]})}).save_to_disk(str(bad))
    with pytest.raises(DataError, match="without a 'train' split"):
        list(read_records(bad))


# =========================================================================== formats


def test_text_format_adds_eos_and_masks_nothing(tmp_path, tokenizer, cache_dir):
    text = "def add(a, b):\n    return a + b\n"
    p = tmp_path / "code.py"
    p.write_text(text)
    data = tokenize([p], tokenizer, cache_dir)
    assert data.format == "text" and len(data) == 1
    ids, mask = example(data, 0)
    assert ids == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert mask == [1] * len(ids)
    assert data.tokens.dtype == np.int32 and data.loss_mask.dtype == np.uint8


def test_text_format_does_not_double_eos(tokenizer):
    (ids, mask), = TextFormat.encode([{"text": "the end<|endoftext|>"}], ["x"], tokenizer, dcfg())
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert mask == [1] * len(ids)


def test_prompt_completion_masks_the_prompt_exactly(tmp_path, tokenizer, cache_dir):
    records = [
        {"prompt": "User: hello, how are you?\nAssistant:", "completion": " I am fine, thank you."},
        {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
    ]
    p = write_jsonl(tmp_path / "pc.jsonl", records)
    data = tokenize([p], tokenizer, cache_dir)
    assert data.format == "prompt_completion" and len(data) == 2
    for i, r in enumerate(records):
        ids, mask = example(data, i)
        p_ids = tokenizer(r["prompt"])["input_ids"]
        c_ids = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids == p_ids + c_ids
        assert mask == [0] * len(p_ids) + [1] * len(c_ids)
        learned = [t for t, m in zip(ids, mask) if m]
        assert tokenizer.decode(learned, clean_up_tokenization_spaces=False) == r["completion"] + "<|endoftext|>"


def test_prompt_completion_errors(tokenizer):
    with pytest.raises(DataError, match=r"f\.jsonl:4: empty 'completion'"):
        PromptCompletionFormat.encode([{"prompt": "a", "completion": "  "}], ["f.jsonl:4"], tokenizer, dcfg())
    with pytest.raises(DataError, match=r"f\.jsonl:2: field 'prompt' must be a string"):
        PromptCompletionFormat.encode([{"prompt": 3, "completion": "x"}], ["f.jsonl:2"], tokenizer, dcfg())


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "I am fine."},
    {"role": "user", "content": "and you?"},
    {"role": "assistant", "content": "Good, thanks!"},
]


def test_chat_masks_only_assistant_turns(tmp_path, tokenizer, cache_dir):
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    data = tokenize([p], tokenizer, cache_dir)
    assert data.format == "chat"
    ids, mask = example(data, 0)
    # the whole rendered conversation is there, token for token
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    runs = masked_runs(tokenizer, ids, mask)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(assistant)
    for run, content in zip(runs, assistant):
        # the reply and its end-of-turn marker (plus the template's trailing newline) — no role header
        assert run.rstrip("\n") == content + "<|im_end|>"
        assert "<|im_start|>" not in run and "assistant" not in run
    learned = "".join(runs)
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] not in learned
    # the number of learned <|im_end|> tokens is exactly one per assistant turn
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for t, m in zip(ids, mask) if m and t == im_end) == len(assistant)
    assert sum(1 for t in ids if t == im_end) == len(CONVERSATION)


def test_chat_mask_is_exact_for_merged_boundaries(tokenizer):
    """Offsets, not token counts, decide the mask; contents with leading spaces/newlines stay exact."""
    msgs = [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "\n    return a + b\n"}]
    (ids, mask), = ChatFormat.encode([{"messages": msgs}], ["x"], tokenizer, dcfg())
    runs = masked_runs(tokenizer, ids, mask)
    assert [r.rstrip("\n") for r in runs] == ["\n    return a + b\n<|im_end|>"]


def test_chat_assistant_first_turn_header_not_learned(tokenizer):
    msgs = [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "hi"}]
    (ids, mask), = ChatFormat.encode([{"messages": msgs}], ["x"], tokenizer, dcfg())
    runs = masked_runs(tokenizer, ids, mask)
    assert [r.rstrip("\n") for r in runs] == ["Hello! How can I help?<|im_end|>"]


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}], "message 0 has unknown role 'wizard'"),
        ([{"role": "user", "content": "x"}], "no assistant message"),
        ([], "must be a non-empty list"),
        ("hello", "must be a non-empty list"),
        ([{"role": "user"}, {"role": "assistant", "content": "y"}], "message 0 must be an object"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}], "message 1 must be an object"),
    ],
)
def test_chat_errors_name_the_record(tokenizer, messages, fragment):
    with pytest.raises(DataError, match=fragment) as err:
        ChatFormat.encode([{"messages": messages}], ["chat.jsonl:7"], tokenizer, dcfg())
    assert "chat.jsonl:7" in str(err.value)


def test_chat_unknown_role_in_file(tmp_path, tokenizer, cache_dir):
    p = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": CONVERSATION}, {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}],
    )
    with pytest.raises(DataError, match=rf"{p.name}:2: message 0 has unknown role 'robot'"):
        tokenize([p], tokenizer, cache_dir)


def test_chat_roles():
    assert CHAT_ROLES == {"system", "user", "assistant", "tool"}



# ShareGPT and Alpaca: read as the chat conversation they stand for (same tokens, same mask)
SHAREGPT = {"system": "Be brief.", "conversations": [
    {"from": "human", "value": "hi there"}, {"from": "gpt", "value": "I am fine."},
    {"from": "human", "value": "and you?"}, {"from": "gpt", "value": "Good, thanks!"}]}


def test_sharegpt_is_the_chat_it_stands_for(tmp_path, tokenizer, cache_dir):
    chat = tokenize([write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])], tokenizer, cache_dir)
    share = tokenize([write_jsonl(tmp_path / "share.jsonl", [SHAREGPT])], tokenizer, cache_dir)
    assert share.format == "sharegpt"
    assert example(share, 0) == example(chat, 0)
    assert masked_runs(tokenizer, *example(share, 0))[0].startswith("I am fine.")


def test_sharegpt_role_names_mapped_by_data_roles(tmp_path, tokenizer, cache_dir):
    record = {"conversations": [{"from": "person", "value": "hi there"}, {"from": "bot", "value": "I am fine."}]}
    p = write_jsonl(tmp_path / "share.jsonl", [record])
    with pytest.raises(DataError, match=rf"{p.name}:1: message 0 has unknown role 'person'.*data.roles"):
        tokenize([p], tokenizer, cache_dir)
    data = tokenize([p], tokenizer, cache_dir, roles={"person": "user", "bot": "assistant"})
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "I am fine."}]
    assert example(data, 0)[0] == tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]


def test_chat_roles_mapped_too(tokenizer):
    record = {"messages": [{"role": "human", "content": "x"}, {"role": "bot", "content": "y"}]}
    (ids, mask), = ChatFormat.encode([record], ["c:1"], tokenizer, dcfg(roles={"bot": "assistant"}))
    assert masked_runs(tokenizer, ids, mask)[0].startswith("y")


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"conversations": []}, "'conversations' must be a non-empty list"),
        ({"conversations": [{"from": "human"}]}, "turn 0 of 'conversations' must be an object with string 'from' and 'value'"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant message"),
        ({"conversations": [{"from": "gpt", "value": "x"}], "system": 3}, "field 'system' must be a string"),
    ],
)
def test_sharegpt_errors_name_the_record(tokenizer, record, fragment):
    with pytest.raises(DataError, match=fragment) as err:
        FORMATS["sharegpt"].encode([record], ["s.jsonl:3"], tokenizer, dcfg())
    assert str(err.value).startswith("s.jsonl:3: ")


def test_chat_with_sharegpt_turns_says_what_to_set(tokenizer):
    with pytest.raises(DataError, match="set data.format: sharegpt and data.conversations_field: messages"):
        ChatFormat.encode([{"messages": SHAREGPT["conversations"]}], ["c:1"], tokenizer, dcfg())


def test_alpaca_is_a_user_turn_and_an_assistant_turn(tmp_path, tokenizer, cache_dir):
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be brief.", "history": [["ping", "pong"]]}]
    data = tokenize([write_jsonl(tmp_path / "alpaca.jsonl", records)], tokenizer, cache_dir)
    assert data.format == "alpaca" and len(data) == 2
    expected = [
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"},
         {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
    ]
    for i, messages in enumerate(expected):
        ids, mask = example(data, i)
        assert ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        runs = masked_runs(tokenizer, ids, mask)
        assert [r.split("<|im_end|>")[0] for r in runs] == [m["content"] for m in messages if m["role"] == "assistant"]


def test_alpaca_custom_fields_and_errors(tmp_path, tokenizer, cache_dir):
    cfg = dcfg(instruction_field="q", input_field="ctx", output_field="a")
    assert detect_format({"q": "x", "a": "y"}, "f:1", cfg) == "alpaca"
    p = write_jsonl(tmp_path / "a.jsonl", [{"q": "x", "a": "y"}, {"q": "x", "a": ""}])
    with pytest.raises(DataError, match=rf"{p.name}:2: empty 'a'"):
        tokenize([p], tokenizer, cache_dir, instruction_field="q", input_field="ctx", output_field="a")
    with pytest.raises(DataError, match=r"a:7: field 'history' must be a list of \[instruction, response\]"):
        FORMATS["alpaca"].encode([{"instruction": "x", "output": "y", "history": ["z"]}], ["a:7"], tokenizer, dcfg())


def test_data_roles_must_name_a_chat_role():
    base = {"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": ["x"]}, "budget": {"steps": 1}}
    with pytest.raises(ConfigError, match="'data.roles.bot': 'robot' is not one of"):
        load_config(base, {"data": {"roles": {"bot": "robot"}}})
    assert load_config(base, ["--data.roles", "{bot: assistant}"]).data.roles == {"bot": "assistant"}


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"text": "x"}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"prompt": "p", "completion": "c", "text": "t"}, "prompt_completion"),
        ({"messages": [], "text": "t"}, "chat"),
        ({"messages": [], "prompt": "p", "completion": "c"}, "chat"),
        ({"conversations": [], "text": "t"}, "sharegpt"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o", "text": "t"}, "alpaca"),
        ({"instruction": "i", "text": "t"}, "text"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record, "f:1", dcfg()) == expected


def test_detect_format_custom_fields_and_failure():
    cfg = dcfg(text_field="body", prompt_field="q", completion_field="a", messages_field="conv")
    assert detect_format({"body": "x"}, "f:1", cfg) == "text"
    assert detect_format({"q": "x", "a": "y"}, "f:1", cfg) == "prompt_completion"
    assert detect_format({"conv": []}, "f:1", cfg) == "chat"
    with pytest.raises(DataError, match=r"f:9: cannot tell the data format from fields \['prompt'\]"):
        detect_format({"prompt": "only"}, "f:9", dcfg())


def test_custom_text_field_end_to_end(tmp_path, tokenizer, cache_dir):
    p = write_jsonl(tmp_path / "d.jsonl", [{"body": "hello world"}])
    data = tokenize([p], tokenizer, cache_dir, text_field="body")
    assert data.format == "text"
    assert example(data, 0)[0] == tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id]


def test_mixing_formats_in_one_file(tmp_path, tokenizer, cache_dir):
    p = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a doc"}, {"text": "b doc"}, {"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=rf"{p.name}:3: this record is prompt_completion data but earlier records are text"):
        tokenize([p], tokenizer, cache_dir)


def test_explicit_format_mismatch(tmp_path, tokenizer, cache_dir):
    p = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match="prompt_completion data but earlier records are chat"):
        tokenize([p], tokenizer, cache_dir, format="chat")


def test_explicit_format_text_on_text_files(tmp_path, tokenizer, cache_dir):
    p = tmp_path / "a.txt"
    p.write_text("some words")
    assert tokenize([p], tokenizer, cache_dir, format="text").format == "text"


def test_non_string_text_field(tmp_path, tokenizer, cache_dir):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": 42}])
    with pytest.raises(DataError, match=rf"{p.name}:2: field 'text' must be a string, got int"):
        tokenize([p], tokenizer, cache_dir)


def test_iter_texts_yields_all_text_fields(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "P1", "completion": "C1"}, {"messages": [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}]}])
    b = tmp_path / "b.txt"
    b.write_text("plain text")
    cfg = load_config({"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": [str(a), str(b)]}, "budget": {"steps": 1}})
    assert list(iter_texts(cfg)) == ["P1", "C1", "U1", "A1", "plain text"]
    assert list(iter_texts(cfg, limit_bytes=3)) == ["P1", "C1"]  # stops after the record that crosses the limit


def test_iter_texts_reads_sharegpt_and_alpaca_and_checks_the_data(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"conversations": [{"from": "human", "value": "H1"}, {"from": "gpt", "value": "G1"}]},
                                           {"instruction": "I1", "input": "N1", "output": "O1"}])
    base = {"model": {"init": "scratch", "preset": "llama-test"}, "budget": {"steps": 1}}
    assert list(iter_texts(load_config({**base, "data": {"train": [str(a)]}}))) == ["H1", "G1", "I1", "N1", "O1"]
    # what no format reads stops here, before a tokenizer is trained on it, naming file:line
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "fine"}, {"body": "?"}])
    with pytest.raises(DataError, match=rf"{b.name}:2: cannot tell the data format"):
        list(iter_texts(load_config({**base, "data": {"train": [str(b)]}})))
    with pytest.raises(DataError, match=rf"{b.name}:1: this record is text data, not chat"):
        list(iter_texts(load_config({**base, "data": {"train": [str(b)], "format": "chat"}})))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no examples found in .*empty.jsonl"):
        list(iter_texts(load_config({**base, "data": {"train": [str(empty)]}})))


def test_empty_data_is_an_error(tmp_path, tokenizer, cache_dir):
    p = tmp_path / "empty.txt"
    p.write_text("   \n")
    with pytest.raises(DataError, match="no examples found"):
        tokenize([p], tokenizer, cache_dir)


# =========================================================================== tokenisation cache


def test_cache_reused_on_second_call(tmp_path, tokenizer, cache_dir, monkeypatch):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i}"} for i in range(5)])
    logs: list[str] = []
    first = tokenize([p], tokenizer, cache_dir, log=logs)
    assert not any("from cache" in m for m in logs)
    assert list((cache_dir / "tokenized").iterdir())

    def boom(*a, **k):
        raise AssertionError("re-tokenised instead of using the cache")

    monkeypatch.setattr(tokmod, "_tokenize", boom)
    logs.clear()
    second = tokenize([p], tokenizer, cache_dir, log=logs)
    assert any("from cache" in m for m in logs)
    assert second.format == first.format == "text"
    np.testing.assert_array_equal(second.tokens, first.tokens)
    np.testing.assert_array_equal(second.loss_mask, first.loss_mask)
    np.testing.assert_array_equal(second.offsets, first.offsets)


def test_cache_invalidated_by_changes(tmp_path, tokenizer, cache_dir, monkeypatch):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}])
    tokenize([p], tokenizer, cache_dir)
    calls = []
    real = tokmod._tokenize

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tokmod, "_tokenize", counting)
    tokenize([p], tokenizer, cache_dir)
    assert calls == []  # cached
    write_jsonl(p, [{"text": "one"}, {"text": "two"}, {"text": "three"}])  # file changed
    data = tokenize([p], tokenizer, cache_dir)
    assert len(calls) == 1 and len(data) == 3
    tokenize([p], tokenizer, cache_dir, format="text")  # format setting changed
    assert len(calls) == 2
    tokenize([p], tokenizer, cache_dir, format="text")  # and that is cached in turn
    assert len(calls) == 2


def test_default_cache_dir_uses_env(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("BUDGETUNE_CACHE", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    p = tmp_path / "a.txt"
    p.write_text("hello")
    tokenize_files([p], tokenizer, dcfg(), None, log=lambda m: None)
    assert list((tmp_path / "envcache" / "tokenized").iterdir())


def test_session_cache_is_not_home():
    assert Path.home() / ".cache" / "budgetune" != default_cache_dir()


# =========================================================================== packing


def test_pack_best_fit_into_one_row():
    assert [sorted(r) for r in pack_examples([5, 3, 2], 10)] == [[0, 1, 2]]


@pytest.mark.parametrize(
    "lengths, seq_len, n_rows",
    [([6, 6, 6], 10, 3), ([7, 3, 6, 4], 10, 2), ([10, 10], 10, 2), ([1] * 20, 10, 2), ([], 10, 0), ([9, 2, 8, 1], 10, 2)],
)
def test_pack_row_counts(lengths, seq_len, n_rows):
    rows = pack_examples(lengths, seq_len)
    assert len(rows) == n_rows
    assert all(sum(lengths[i] for i in r) <= seq_len for r in rows)


def test_pack_best_fit_pairs():
    rows = {tuple(sorted(r)) for r in pack_examples([7, 3, 6, 4], 10)}
    assert rows == {(0, 1), (2, 3)}


def test_pack_prefers_the_fullest_row_that_fits():
    # best fit: 4 goes into the row holding 6 (exactly full), not the emptier row holding 5
    rows = {tuple(sorted(r)) for r in pack_examples([6, 5, 4, 3, 2], 10)}
    assert rows == {(0, 2), (1, 3, 4)}


@pytest.mark.parametrize("seed", range(5))
def test_pack_every_index_once_and_fits(seed):
    rng = np.random.default_rng(seed)
    seq_len = 64
    lengths = rng.integers(1, seq_len + 1, size=300).tolist()
    rows = pack_examples(lengths, seq_len)
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(0 < sum(lengths[i] for i in r) <= seq_len for r in rows)
    # best-fit decreasing is near-optimal: within 20% of the lower bound
    assert len(rows) <= 1.2 * np.ceil(sum(lengths) / seq_len) + 1


def test_build_rows_packed_positions_and_labels():
    data = make_set([5, 3, 2])
    rows = build_rows(data, seq_len=12, pack=True, pad_id=0)
    assert len(rows) == 1 and rows.attention_mask is None
    ids, labels, pos = rows.input_ids[0], rows.labels[0], rows.position_ids[0]
    starts = [c for c in range(10) if pos[c] == 0]
    assert len(starts) == 3 and starts[0] == 0
    # each example is contiguous, positions restart at 0 at each example start
    for s in starts:
        example_id = ids[s] // 1000
        n = [5, 3, 2][example_id]
        np.testing.assert_array_equal(ids[s : s + n], 1000 * example_id + np.arange(1, n + 1))
        np.testing.assert_array_equal(pos[s : s + n], np.arange(n))
        assert labels[s] == IGNORE  # first token is never predicted across examples
        np.testing.assert_array_equal(labels[s + 1 : s + n], ids[s + 1 : s + n])
    # padding: pad id, no labels
    np.testing.assert_array_equal(ids[10:], [0, 0])
    np.testing.assert_array_equal(labels[10:], [IGNORE, IGNORE])
    assert rows.real_tokens.tolist() == [10]
    assert rows.padding_fraction == pytest.approx(2 / 12)
    assert rows.input_ids.dtype == np.int64 and rows.labels.dtype == np.int64


def test_build_rows_respects_loss_mask():
    data = make_set([4, 4], mask=[0, 0, 1, 1, 0, 1, 1, 1])
    rows = build_rows(data, seq_len=8, pack=True, pad_id=0)
    assert len(rows) == 1
    by_example = {}
    for c in range(8):
        by_example.setdefault(int(rows.input_ids[0, c]) // 1000, []).append(int(rows.labels[0, c]))
    assert by_example[0] == [IGNORE, IGNORE, 3, 4]
    assert by_example[1] == [IGNORE, 1002, 1003, 1004]


def test_build_rows_padded_have_attention_mask():
    data = make_set([5, 3, 2])
    rows = build_rows(data, seq_len=8, pack=False, pad_id=7)
    assert len(rows) == 3 and rows.position_ids is None
    assert rows.attention_mask.tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5, [1] * 2 + [0] * 6]
    assert rows.real_tokens.tolist() == [5, 3, 2]
    assert rows.input_ids[1].tolist() == [1001, 1002, 1003, 7, 7, 7, 7, 7]
    assert rows.labels[1].tolist() == [IGNORE, 1002, 1003] + [IGNORE] * 5
    assert rows.padding_fraction == pytest.approx(1 - 10 / 24)


def test_rows_batch_trims_padding_and_keeps_positions():
    torch = pytest.importorskip("torch")
    padded = build_rows(make_set([5, 3, 2]), seq_len=8, pack=False, pad_id=0)
    batch = padded.batch([1, 2])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == (2, 3) and batch["input_ids"].dtype == torch.int64
    packed = build_rows(make_set([5, 3, 2]), seq_len=12, pack=True, pad_id=0)
    batch = packed.batch([0])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (1, 12)


def test_long_text_is_chunked_not_truncated():
    data = make_set([25, 4], fmt="text")
    spans, truncated = split_long(data, 10, chunk=True)
    assert spans == [(0, 10), (10, 20), (20, 25), (25, 29)] and truncated == 0
    rows = build_rows(data, seq_len=10, pack=True, pad_id=0)
    assert rows.truncated == 0 and rows.real_tokens.sum() == 29


def test_chunk_remainder_of_one_token_dropped():
    spans, _ = split_long(make_set([21], fmt="text"), 10, chunk=True)
    assert spans == [(0, 10), (10, 20)]


def test_long_instruction_examples_are_truncated():
    data = make_set([25, 4], fmt="prompt_completion")
    rows = build_rows(data, seq_len=10, pack=True, pad_id=0)
    assert rows.truncated == 1
    assert rows.real_tokens.sum() == 14
    assert (rows.input_ids <= 1004).all() and (rows.input_ids[rows.input_ids < 1000] <= 10).all()


# =========================================================================== held-out split


def test_split_heldout_disjoint_and_deterministic():
    data = make_set([3 + (i % 4) for i in range(20)])
    train, held = split_heldout(data, 0.25, seed=0)
    assert len(train) == 15 and len(held) == 5
    first = lambda s: {int(s.tokens[o]) // 1000 for o in s.offsets[:-1]}  # noqa: E731
    assert first(train).isdisjoint(first(held))
    assert first(train) | first(held) == set(range(20))
    # examples are moved whole, with their masks
    assert len(train.tokens) + len(held.tokens) == len(data.tokens)
    for s in (train, held):
        for i in range(len(s)):
            ids, _ = example(s, i)
            k = ids[0] // 1000
            assert ids == (1000 * k + np.arange(1, 3 + (k % 4) + 1)).tolist()
    again_train, again_held = split_heldout(data, 0.25, seed=0)
    np.testing.assert_array_equal(again_held.tokens, held.tokens)
    np.testing.assert_array_equal(again_train.offsets, train.offsets)
    others = [first(split_heldout(data, 0.25, seed=s)[1]) for s in range(1, 6)]
    assert any(o != first(held) for o in others)  # the seed matters


def test_split_heldout_edges():
    data = make_set([3] * 10)
    train, held = split_heldout(data, 0.0, seed=0)
    assert len(train) == 10 and len(held) == 0 and held.tokens.size == 0
    train, held = split_heldout(data, 0.01, seed=0)
    assert len(held) == 1 and len(train) == 9  # at least one held-out example
    train, held = split_heldout(make_set([3]), 0.5, seed=0)
    assert len(train) == 1 and len(held) == 0  # one example stays for training


# =========================================================================== sampler


def take(sampler: RowSampler, n: int) -> list[list[int]]:
    return [sampler.next() for _ in range(n)]


def test_sampler_deterministic():
    a = take(RowSampler(50, 4, seed=3), 20)
    b = take(RowSampler(50, 4, seed=3), 20)
    c = take(RowSampler(50, 4, seed=4), 20)
    assert a == b and a != c
    assert all(len(x) == 4 for x in a)


def test_sampler_epochs_are_permutations():
    s = RowSampler(10, 5, seed=0)
    rows = [i for b in take(s, 4) for i in b]
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert s.epoch == pytest.approx(2.0)


def test_sampler_epoch_straddling_batches():
    s = RowSampler(10, 4, seed=1)
    rows = [i for b in take(s, 5) for i in b]  # 20 rows = exactly 2 epochs, batches straddle
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))


def test_sampler_two_ranks_disjoint_and_cover_an_epoch():
    n, mb = 24, 3
    r0 = RowSampler(n, mb, seed=7, world_size=2, rank=0)
    r1 = RowSampler(n, mb, seed=7, world_size=2, rank=1)
    steps = n // (mb * 2)
    rows0 = [i for b in take(r0, steps) for i in b]
    rows1 = [i for b in take(r1, steps) for i in b]
    assert set(rows0).isdisjoint(rows1)
    assert sorted(rows0 + rows1) == list(range(n))
    assert r0.position == r1.position == n
    # together they see the single-process order, interleaved by micro-batch
    single = [i for b in take(RowSampler(n, mb, seed=7), 2 * steps) for i in b]
    interleaved = [i for k in range(steps) for i in rows0[k * mb : (k + 1) * mb] + rows1[k * mb : (k + 1) * mb]]
    assert interleaved == single


def test_sampler_resume_from_position():
    full = RowSampler(37, 4, seed=11)
    before = take(full, 6)
    saved = full.position
    assert saved == 24
    after = take(full, 10)
    resumed = RowSampler(37, 4, seed=11, position=saved)
    assert take(resumed, 10) == after
    assert before  # (rows before the save are not replayed)


def test_sampler_resume_multi_rank():
    ref = [RowSampler(30, 2, seed=5, world_size=2, rank=r) for r in (0, 1)]
    for s in ref:
        take(s, 4)
    expected = [take(s, 6) for s in ref]
    resumed = [RowSampler(30, 2, seed=5, world_size=2, rank=r, position=ref[0].position - 6 * 4) for r in (0, 1)]
    assert [take(s, 6) for s in resumed] == expected


def test_sampler_rejects_empty():
    with pytest.raises(ValueError):
        RowSampler(0, 4, seed=0)


# =========================================================================== end to end (no model)


def test_prepare_data_text_folder(tmp_path, tokenizer, cache_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(f"The quick brown fox number {i} jumps over the lazy dog. " * (1 + i % 3))
    cfg = load_config(
        {
            "model": {"init": "scratch", "preset": "llama-test"},
            "data": {"train": [str(folder)], "seq_len": 32, "eval_fraction": 0.25, "cache_dir": str(cache_dir)},
            "budget": {"steps": 1},
        }
    )
    logs: list[str] = []
    bundle = prepare_data(cfg, tokenizer, seed=0, log=logs.append)
    assert bundle.format == "text"
    assert bundle.train_examples == 9 and bundle.eval_examples == 3
    assert bundle.train.input_ids.shape[1] == 32 and bundle.eval is not None
    s = bundle.summary()
    assert s["train_rows"] == len(bundle.train) and s["truncated_examples"] == 0
    all_tokens = sum(len(tokenizer(p.read_text())["input_ids"]) + 1 for p in folder.iterdir())
    # every token of every document lands in exactly one row (chunks of < 2 tokens aside)
    assert all_tokens - 12 <= s["train_tokens"] + s["eval_tokens"] <= all_tokens
    # second run: from cache
    logs.clear()
    prepare_data(cfg, tokenizer, seed=0, log=logs.append)
    assert any("from cache" in m for m in logs)


def test_prepare_data_padded_rows(tmp_path, tokenizer, cache_dir):
    p = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"q{i}", "completion": f" answer {i}"} for i in range(6)])
    cfg = load_config(
        {
            "model": {"init": "scratch", "preset": "llama-test"},
            "data": {"train": [str(p)], "eval": [str(p)], "seq_len": 16, "pack": False, "cache_dir": str(cache_dir)},
            "budget": {"steps": 1},
        }
    )
    bundle = prepare_data(cfg, tokenizer, log=lambda m: None)
    assert bundle.train_examples == 6 and bundle.eval_examples == 6
    assert bundle.train.attention_mask is not None and bundle.train.position_ids is None
    assert bundle.eval.position_ids is not None  # eval rows are always packed
    assert len(bundle.train) == 6
