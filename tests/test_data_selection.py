"""Data under a budget: dedup, weighted mixtures with replay, selection (issue 17)."""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path
import numpy as np
import pytest

from budgetune.config import SelectConfig, load_config
from budgetune.data import prepare_data
from budgetune.data.dedup import find_duplicates
from budgetune.data.mixture import mix
from budgetune.data.select import _order, score, select, tokens_in_budget
from budgetune.data.tokenize import TokenizedSet
from budgetune.errors import ConfigError, DataError

from helpers import tiny_config, write_chat_jsonl

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue cyan magenta yellow black white").split()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def pc_records(n: int, seed: int = 0, prefix: str = "") -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{prefix}Q{i}: " + " ".join(rng.choices(WORDS, k=6)) + "\n",
             "completion": " ".join(rng.choices(WORDS, k=rng.randint(3, 20)))} for i in range(n)]


def make_set(lengths, answer=None, fmt="prompt_completion") -> TokenizedSet:
    """Example i: `lengths[i]` tokens, the last `answer[i]` of them carry the loss."""
    tokens = np.concatenate([1000 * i + np.arange(1, n + 1) for i, n in enumerate(lengths)]).astype(np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    answer = answer if answer is not None else [n // 2 for n in lengths]
    mask = np.concatenate([np.r_[np.zeros(n - a), np.ones(a)] for n, a in zip(lengths, answer)]).astype(np.uint8)
    return TokenizedSet(tokens, mask, offsets, fmt)


def cfg_for(tmp_path, train, **data):
    return load_config({"model": {"name": "unused"}, "budget": {"steps": 1},
                        "data": {"train": train, "seq_len": 64, "eval_fraction": 0.1, "cache_dir": str(tmp_path / "cache"), **data}})


# =========================================================================== dedup


def test_near_dedup_finds_planted_duplicates_and_keeps_distinct_texts():
    rng = random.Random(0)
    originals = [" ".join(rng.choices(WORDS, k=40)) for _ in range(30)]
    texts = list(originals)
    texts.append(originals[3].upper())  # exact after normalisation
    texts.append("  ".join(originals[5].split()))  # whitespace only: exact after normalisation
    near = originals[7].split()
    near[10] = "CHANGED"
    texts.append(" ".join(near))  # one word of 40 changed: a near duplicate
    report = find_duplicates(texts, "near", 0.7)
    assert report.exact == 2 and report.near == 1
    assert report.kept.tolist() == list(range(30))  # first occurrences kept; every distinct text kept
    assert any("near duplicate of example 7" in e for e in report.examples)
    exact_only = find_duplicates(texts, "exact")
    assert exact_only.exact == 2 and exact_only.near == 0 and len(exact_only.kept) == 31


def test_dedup_in_prepare_data_is_cached_and_reported(tmp_path, tokenizer):
    records = pc_records(40)
    records += [dict(records[2]), dict(records[9])]  # planted exact duplicates, across two files
    write_jsonl(tmp_path / "a.jsonl", records[:30])
    write_jsonl(tmp_path / "b.jsonl", records[30:])
    cfg = cfg_for(tmp_path, [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], dedup="exact")
    logs = []
    bundle = prepare_data(cfg, tokenizer, log=logs.append)
    assert bundle.dedup["dropped_exact"] == 2
    assert bundle.train_examples + bundle.eval_examples == 40
    logs.clear()
    again = prepare_data(cfg, tokenizer, log=logs.append)
    assert any("dedup (exact) from cache" in m for m in logs)
    assert again.summary()["dedup"] == bundle.summary()["dedup"]


# =========================================================================== mixtures


def test_mix_hits_weights_in_tokens_and_goes_epoch_by_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=900)
    source = np.r_[np.zeros(600, int), np.ones(250, int), np.full(50, 2)]
    share = [0.5, 0.3, 0.2]
    total = float(lengths.sum())
    picked = mix(lengths, source, share, total, seed=0)
    got = [lengths[picked[source[picked] == s]].sum() / lengths[picked].sum() for s in range(3)]
    assert np.allclose(got, share, atol=0.01)
    # source 2 holds ~2.3% of the tokens but gets 20%: several epochs, each a full pass before any repeat
    small = picked[source[picked] == 2]
    assert len(small) > 3 * 50
    assert sorted(small[:50].tolist()) == list(range(850, 900))
    # source 0 is under-sampled: no example twice
    big = picked[source[picked] == 0]
    assert len(np.unique(big)) == len(big)


def test_weighted_sources_with_own_formats_and_replay(tmp_path, tokenizer):
    write_jsonl(tmp_path / "new.jsonl", [{"text": "new domain text about " + " ".join(random.Random(i).choices(WORDS, k=30))}
                                        for i in range(80)])
    write_jsonl(tmp_path / "old.jsonl", [{"body": "old domain text about " + " ".join(random.Random(-i).choices(WORDS, k=30))}
                                        for i in range(400)])
    cfg = cfg_for(tmp_path, [str(tmp_path / "new.jsonl")],
                  replay=[str(tmp_path / "old.jsonl")], replay_weight=0.25)
    with pytest.raises(DataError, match=r"old.jsonl:1: cannot tell the data format from fields \['body'\]"):  # the old data names its text field differently
        prepare_data(cfg, tokenizer, log=lambda m: None)
    cfg = cfg_for(tmp_path, [{"path": [str(tmp_path / "new.jsonl")], "weight": 3, "name": "new"},
                             {"path": [str(tmp_path / "old.jsonl")], "weight": 1, "text_field": "body", "name": "old"}])
    logs = []
    bundle = prepare_data(cfg, tokenizer, log=logs.append)
    sources = bundle.summary()["sources"]
    assert abs(sources["new"]["share"] - 0.75) < 0.03 and abs(sources["old"]["share"] - 0.25) < 0.03
    assert sources["new"]["epochs"] > 1.0 > sources["old"]["epochs"]
    assert any(m.startswith("data sources: new:") for m in logs)


def test_replay_weight_takes_its_share(tmp_path, tokenizer):
    write_jsonl(tmp_path / "new.jsonl", [{"text": " ".join(random.Random(i).choices(WORDS, k=30))} for i in range(100)])
    write_jsonl(tmp_path / "old.jsonl", [{"text": " ".join(random.Random(-i).choices(WORDS, k=30))} for i in range(300)])
    cfg = cfg_for(tmp_path, [str(tmp_path / "new.jsonl")], replay=[str(tmp_path / "old.jsonl")], replay_weight=0.2)
    bundle = prepare_data(cfg, tokenizer, log=lambda m: None)
    assert abs(bundle.sources["replay"]["share"] - 0.2) < 0.03


@pytest.mark.parametrize("train, extra, fragment", [
    ([{"path": ["a"], "weight": -1}], {}, r"data.train\[0\].weight': must be a number ≥ 0"),
    ([{"path": ["a"], "weight": 0}, {"path": ["b"], "weight": 0}], {}, "weights sum to 0"),
    ([{"weight": 0.5}], {}, r"data.train\[0\].path': required .* names no files"),
    ([{"path": ["a"], "weight": 1}, {"path": ["b"]}], {}, r"data.train\[1\]': has no weight"),
    ([{"path": ["a"], "wieght": 1}], {}, r"unknown config key 'data.train\[0\].wieght' \(did you mean 'weight'"),
    (["a"], {"replay": ["b"], "replay_weight": 1.5}, "data.replay_weight"),
    (["a"], {"select": {"method": "loss", "fraction": 1.5}}, "data.select.fraction"),
    (["a"], {"select": {"method": "loss", "fraction": "most"}}, "data.select.fraction"),
    (["a"], {"select": {"method": "ifd", "target": ["t.jsonl"]}}, "data.select.target"),
    (["a"], {"select": {"method": "best"}}, "data.select.method"),
])
def test_bad_mixture_and_selection_config(train, extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config({"model": {"name": "x"}, "budget": {"steps": 1}, "data": {"train": train, **extra}})


# =========================================================================== selection


def test_each_method_ranks_a_constructed_case():
    data = make_set([10, 40, 20, 30], answer=[2, 30, 10, 5])
    idx = np.arange(4)
    assert _order("length", data, {}, None, 0, 0, idx).tolist() == [1, 2, 3, 0]
    cond = np.array([1.0, 3.0, 2.0, np.nan])
    assert _order("loss", data, {"cond": cond}, None, 0, 0, idx).tolist() == [1, 2, 0, 3]
    # IFD: 0.5, 0.9, 1.2 (the prompt hurts: last), 0.7
    scores = {"cond": np.array([1.0, 1.8, 2.4, 1.4]), "uncond": np.array([2.0, 2.0, 2.0, 2.0])}
    assert _order("ifd", data, scores, None, 0, 0, idx).tolist() == [1, 3, 0, 2]
    # RDS: the examples nearest to the targets first
    vec = np.array([[1, 0], [0, 1], [0.9, 0.1], [-1, 0]], dtype=np.float32)
    assert _order("rds", data, {"wmean": vec}, np.array([[1.0, 0.0]]), 0, 0, idx).tolist() == [0, 2, 1, 3]
    perm = _order("random", data, {}, None, 0, 3, idx)
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and perm.tolist() == _order("random", data, {}, None, 0, 3, idx).tolist()


def test_cdas_keeps_every_cluster_and_its_hardest_examples():
    rng = np.random.default_rng(0)
    # two well separated clusters of 30 and 10 examples
    mean = np.r_[rng.normal([5, 0], 0.1, (30, 2)), rng.normal([0, 5], 0.1, (10, 2))].astype(np.float32)
    cond = rng.uniform(0.2, 0.9, 40)
    scores = {"mean": mean, "cond": cond, "uncond": np.ones(40)}
    ranked = _order("cdas", make_set([8] * 40), scores, None, 2, 0, np.arange(40))
    top = ranked[:8]
    assert (top < 30).sum() == 6 and (top >= 30).sum() == 2  # each cluster in proportion (30:10)
    assert set(top[top >= 30]) == set(30 + np.argsort(-cond[30:])[:2])  # its highest-IFD examples
    assert set(top[top < 30]) == set(np.argsort(-cond[:30])[:6])


def test_fraction_keeps_that_share_of_tokens_and_auto_what_the_budget_buys():
    data = make_set([10] * 100)
    scfg = SelectConfig(method="length", fraction=0.4)
    keep, report = select(data, np.zeros(100, int), None, scfg, 64, log=None)
    assert len(keep) == 40 and report.tokens_kept == 400
    auto = SelectConfig(method="random", fraction="auto")
    keep, report = select(data, np.zeros(100, int), None, auto, 64, budget_tokens=lambda: 250.0, log=None)
    assert report.tokens_kept == 250 and report.fraction == 0.25
    # with weighted sources, each source gets its share of what the budget buys
    source = np.r_[np.zeros(50, int), np.ones(50, int)]
    keep, _ = select(data, source, [0.8, 0.2], auto, 64, budget_tokens=lambda: 250.0, log=None)
    assert (keep < 50).sum() == 20 and (keep >= 50).sum() == 5
    with pytest.raises(ConfigError, match="'auto' needs a budget"):
        select(data, source, None, auto, 64, budget_tokens=lambda: None, log=None)


def test_tokens_in_budget_from_the_planner():
    cfg = load_config({"model": {"name": "x"}, "data": {"train": ["a"], "seq_len": 128},
                       "train": {"micro_batch": 4, "grad_accum": 2}, "budget": {"steps": 10, "time": "100s"}})
    assert tokens_in_budget(cfg, None, 1.0, 0.0) == 10 * 8 * 128
    assert tokens_in_budget(cfg, {"tokens_per_s": 50.0}, 1.0, 40.0) == 60 * 50.0  # time left × predicted speed
    cfg = load_config({"model": {"name": "x"}, "data": {"train": ["a"]}, "budget": {"time": "100s"}})
    assert tokens_in_budget(cfg, None, 1.0, 0.0) is None


def test_selection_needs_prompts_and_a_good_target(tmp_path, tokenizer):
    write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(random.Random(i).choices(WORDS, k=20))} for i in range(30)])
    cfg = cfg_for(tmp_path, [str(tmp_path / "text.jsonl")], select={"method": "ifd", "fraction": 0.5})
    with pytest.raises(ConfigError, match="ifd scores how much the prompt helps"):
        prepare_data(cfg, tokenizer, log=lambda m: None)
    write_jsonl(tmp_path / "pc.jsonl", pc_records(30))
    (tmp_path / "empty.jsonl").write_text("")
    cfg = cfg_for(tmp_path, [str(tmp_path / "pc.jsonl")], select={"method": "rds", "target": [str(tmp_path / "empty.jsonl")]})
    with pytest.raises(DataError, match=r"data.select.target': no examples found .*empty.jsonl"):
        prepare_data(cfg, tokenizer, log=lambda m: None, model=object())
    cfg = cfg_for(tmp_path, [str(tmp_path / "pc.jsonl")], select={"method": "rds", "target": [str(tmp_path / "text.jsonl")]})
    with pytest.raises(DataError, match="target examples are text data but the training data is prompt_completion"):
        prepare_data(cfg, tokenizer, log=lambda m: None, model=object())


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_model_scores_match_a_direct_computation_and_are_cached(tmp_path, tokenizer, tiny_model, monkeypatch):
    import torch
    import torch.nn.functional as F

    selmod = importlib.import_module("budgetune.data.select")  # the module: `budgetune.data.select` is the function

    data = make_set([12, 7, 20, 9], answer=[5, 3, 8, 1])
    data.tokens[:] = data.tokens % 250 + 3  # ids inside the tiny vocabulary
    scores, cached = score(tiny_model, data, ("cond", "uncond", "wmean"), 64, 3, tmp_path, log=None)
    assert not cached
    for i in range(4):
        s, e = data.offsets[i], data.offsets[i + 1]
        ids = torch.from_numpy(data.tokens[s:e].astype(np.int64))[None]
        m = torch.from_numpy(data.loss_mask[s:e])[1:].bool()
        with torch.no_grad():
            nll = F.cross_entropy(tiny_model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
        assert scores["cond"][i] == pytest.approx(nll[m].mean().item(), rel=1e-4)
        answer = ids[:, torch.from_numpy(data.loss_mask[s:e]).bool()]
        if answer.shape[1] > 1:
            with torch.no_grad():
                un = F.cross_entropy(tiny_model(answer).logits[0, :-1], answer[0, 1:]).item()
            assert scores["uncond"][i] == pytest.approx(un, rel=1e-4)
        else:
            assert np.isnan(scores["uncond"][i])  # a one-token answer has nothing to predict alone
    monkeypatch.setattr(selmod, "_measure", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not cached")))
    again, cached = score(tiny_model, data, ("cond", "wmean"), 64, 3, tmp_path, log=None)
    assert cached and np.array_equal(again["cond"], scores["cond"])


def test_select_in_prepare_data_with_the_model(tmp_path, tokenizer, tiny_model):
    write_jsonl(tmp_path / "pc.jsonl", pc_records(60))
    cfg = cfg_for(tmp_path, [str(tmp_path / "pc.jsonl")], select={"method": "ifd", "fraction": 0.5})
    full = prepare_data(cfg_for(tmp_path, [str(tmp_path / "pc.jsonl")]), tokenizer, log=lambda m: None)
    logs = []
    bundle = prepare_data(cfg, tokenizer, log=logs.append, model=tiny_model)
    sel = bundle.selection
    assert sel["method"] == "ifd" and sel["examples_before"] == full.train_examples
    assert abs(sel["fraction"] - 0.5) < 0.05 and sel["scoring_s"] > 0 and not sel["cached"]
    assert bundle.eval_examples == full.eval_examples  # the held-out split is untouched
    assert any("data.select ifd: kept" in m and "of the budget" in m for m in logs)
    assert prepare_data(cfg, tokenizer, log=lambda m: None, model=tiny_model).selection["cached"]


@pytest.mark.slow
def test_train_with_selection_mixture_and_dedup(tmp_path):
    from budgetune.train import train

    a = write_chat_jsonl(tmp_path / "a.jsonl", n=60, seed=1)
    b = write_chat_jsonl(tmp_path / "b.jsonl", n=60, seed=2)
    cfg = tiny_config(tmp_path, a)
    cfg["data"].update({"train": [{"path": [str(a)], "weight": 0.7}, {"path": [str(b)], "weight": 0.3}],
                        "dedup": "near", "select": {"method": "loss", "fraction": "auto"}})
    summary = train(cfg, quiet=True)
    data = summary["data"]
    assert data["selection"]["method"] == "loss" and data["selection"]["scoring_s"] > 0
    assert set(data["sources"]) == {str(a), str(b)} and "dedup" in data
    # steps 12 × micro-batch 4 × 64 tokens is what the budget buys: ~3k tokens of the ~7k held
    assert data["selection"]["tokens_kept"] <= 12 * 4 * 64 * 1.1
    from budgetune.report import report

    page = report([summary["run_dir"]]).read_text()
    assert "<h2>Data</h2>" in page and f"source {a}" in page and "select loss" in page and "dedup near" in page


def test_planner_note_shows_each_source_share_and_epochs(tmp_path):
    from budgetune.data.mixture import plan_note

    (tmp_path / "a.txt").write_text("x" * 36000)  # ≈ 10k tokens at 3.6 characters per token
    (tmp_path / "b.txt").write_text("y" * 3600)  # ≈ 1k tokens
    cfg = load_config({"model": {"name": "x"}, "budget": {"tokens": 4000},
                       "data": {"train": [{"path": [str(tmp_path / "a.txt")], "weight": 3, "name": "big"},
                                          {"path": [str(tmp_path / "b.txt")], "weight": 1, "name": "small"}]}})
    note = plan_note(cfg, 4000.0)
    assert "big ≈ 10,000 tokens, 75% = 0.30 epochs" in note and "small ≈ 1,000 tokens, 25% = 1.00 epochs" in note
    single = load_config({"model": {"name": "x"}, "budget": {"tokens": 4000}, "data": {"train": [str(tmp_path / "a.txt")]}})
    assert plan_note(single, 4000.0) is None


def test_a_resumed_run_selects_what_the_budget_bought_the_first_time(tmp_path, tokenizer):
    write_jsonl(tmp_path / "pc.jsonl", pc_records(60))
    cfg = cfg_for(tmp_path, [str(tmp_path / "pc.jsonl")], select={"method": "length", "fraction": "auto"})
    run = tmp_path / "run"
    run.mkdir()
    first = prepare_data(cfg, tokenizer, log=lambda m: None, budget_tokens=lambda: 600.0, run_dir=run)
    # on --resume the clock has moved on and the planner would answer differently: the run keeps its data
    again = prepare_data(cfg, tokenizer, log=lambda m: None, budget_tokens=lambda: 9000.0, run_dir=run)
    assert again.selection == first.selection and np.array_equal(again.train.input_ids, first.train.input_ids)
    assert first.selection["tokens_kept"] <= 600 + 64 < prepare_data(cfg, tokenizer, log=lambda m: None,
                                                                      budget_tokens=lambda: 9000.0).selection["tokens_kept"]
