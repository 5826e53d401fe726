"""Preference tuning (objective.name dpo / orpo / simpo): the losses and their gradients against
TRL's on the same tensors, pairs in packed rows against each sequence on its own, the preference
data format and its errors, and a tiny model that learns a preference."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from budgetune.config import load_config
from budgetune.data import build_rows
from budgetune.data.formats import PREF_CHOSEN, PREF_REJECTED
from budgetune.data.tokenize import tokenize_files
from budgetune.errors import DataError
from budgetune.objectives.base import pair_logps
from budgetune.objectives.dpo import dpo_loss
from budgetune.objectives.orpo import odds_ratio_term, orpo_loss
from budgetune.objectives.simpo import simpo_loss
from helpers import tiny_config, write_preference_jsonl

trl = pytest.importorskip("trl")


def _token_logps(pairs=5, width=9, seed=0):
    """Per-token log-probs of [chosen; rejected] answers (TRL's batch layout) and their answer masks."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2 * pairs, width, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    logps = (-torch.rand(2 * pairs, width, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    return logps, mask


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def test_dpo_loss_and_gradient_match_trl():
    from trl import DPOTrainer

    per_token, mask = _token_logps()
    n, width = per_token.shape[0] // 2, per_token.shape[1]
    ref = -torch.rand(2 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 20
    beta = 0.3

    class Model(torch.nn.Module):  # stands in for TRL's fused-head forward: returns the per-token log-probs
        def forward(self, **kwargs):
            return SimpleNamespace(log_probs=per_token * mask, entropy=torch.zeros_like(mask), mean_logits=torch.zeros_like(mask),
                                   is_top1=torch.zeros_like(mask, dtype=torch.bool))

    model = Model()
    stub = SimpleNamespace(model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                           f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    completion = torch.cat([torch.ones(2 * n, 1), mask], dim=1)  # TRL shifts by one: mask[:, 1:] is the answer mask
    inputs = {"input_ids": torch.zeros(2 * n, width + 1, dtype=torch.long), "attention_mask": torch.ones(2 * n, width + 1),
              "completion_mask": completion, "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    theirs = DPOTrainer._compute_loss(stub, model, inputs, False)
    (g_theirs,) = torch.autograd.grad(theirs, per_token)

    sums = (per_token * mask).sum(1)
    losses, chosen_r, rejected_r = dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta)
    ours = losses.mean()
    (g_ours,) = torch.autograd.grad(ours, per_token)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)
    # the logged reward accuracy and margin are TRL's too
    assert stub._metrics["train"]["rewards/accuracies"][0] == pytest.approx((chosen_r > rejected_r).double().mean().item())
    assert stub._metrics["train"]["rewards/margins"][0] == pytest.approx((chosen_r - rejected_r).mean().item())


def test_orpo_odds_ratio_term_and_gradient_match_trl():
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(2)
    avg = (-torch.rand(2, 7, generator=g) * 4 - 1e-3).requires_grad_(True)  # includes values near 0
    lam = 0.25
    stub = SimpleNamespace(beta=lam, accelerator=_Accelerator())
    theirs = ORPOTrainer.odds_ratio_loss(stub, avg[0], avg[1])[0]  # λ · log σ(log odds ratio)
    ours = lam * odds_ratio_term(avg[0], avg[1])
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), avg)[0], torch.autograd.grad(theirs.sum(), avg)[0])
    # the full ORPO loss: the chosen answer's mean token loss minus that term
    losses = orpo_loss(avg[0], avg[1], lam)[0]
    torch.testing.assert_close(losses, -avg[0] - theirs)


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (0.5, 0.0)])
def test_simpo_loss_and_gradient_match_trl(beta, gamma):
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(3)
    avg = (-torch.rand(2, 6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    stub = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo", label_smoothing=0.0, accelerator=_Accelerator())
    theirs, t_chosen, t_rejected = CPOTrainer.cpo_loss(stub, avg[0], avg[1])
    ours, o_chosen, o_rejected = simpo_loss(avg[0], avg[1], beta, gamma)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(o_chosen - o_rejected, t_chosen - t_rejected)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), avg)[0], torch.autograd.grad(theirs.sum(), avg)[0])


# --- data: the preference format, pairs in rows ----------------------------------------------------------


def _data_cfg(tmp_path, path, **data):
    cfg = tiny_config(tmp_path, path, objective={"name": "dpo"})
    cfg["data"].update(data)
    return load_config(cfg).data


def test_pairs_packed_give_each_sequences_own_logps(tmp_path, tokenizer):
    """Several pairs in one packed row: each answer's log-prob equals that sequence run alone (no
    attention across halves or pairs), in string and chat form."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")).eval()
    for chat in (False, True):
        path = write_preference_jsonl(tmp_path / f"p{chat}.jsonl", n=8, chat=chat)
        data = tokenize_files([path], tokenizer, _data_cfg(tmp_path, path), tmp_path / "cache", log=lambda m: None)
        assert data.format == "preference"
        rows = build_rows(data, 256, True, tokenizer.pad_token_id or 0)
        assert rows.pairs.min() >= 2  # pairs share rows
        batch = rows.batch(list(range(len(rows))))
        segments = batch.pop("segments")
        with torch.no_grad():
            packed = pair_logps(model, batch, segments)[0]
        alone = []
        for i in range(len(data)):
            ids = torch.from_numpy(data.tokens[data.offsets[i] : data.offsets[i + 1]].astype(np.int64))
            mask = torch.from_numpy(data.loss_mask[data.offsets[i] : data.offsets[i + 1]].astype(np.int64))
            split = int((mask >= 2).nonzero()[0])
            for half, m in ((ids[:split], mask[:split] == PREF_CHOSEN), (ids[split:], mask[split:] == PREF_REJECTED)):
                with torch.no_grad():
                    logits = model(half[None]).logits[0, :-1].log_softmax(-1)
                alone.append(logits.gather(1, half[1:, None])[:, 0][m[1:]].sum())
        alone = torch.stack(alone).view(-1, 2)
        # rows hold pairs in packing order: match them by value (each pair's log-probs are distinct)
        order = [int(torch.argmin((alone - p).abs().sum(1))) for p in packed]
        assert sorted(order) == list(range(len(data)))
        torch.testing.assert_close(packed, alone[order], rtol=1e-4, atol=1e-4)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_string_pair_masks_only_the_answers(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Say yes\n", "chosen": "yes yes", "rejected": "no no"}])
    data = tokenize_files([path], tokenizer, _data_cfg(tmp_path, path), tmp_path / "cache", log=lambda m: None)
    mask, tokens = data.loss_mask, data.tokens
    split = int(np.argmax(mask >= 2))
    decode = lambda m, lo, hi: tokenizer.decode(tokens[lo:hi][mask[lo:hi] == m].tolist())  # noqa: E731
    assert decode(PREF_CHOSEN, 0, split).strip().startswith("yes yes")
    assert decode(PREF_REJECTED, split, len(tokens)).strip().startswith("no no")
    assert "Say" not in decode(PREF_CHOSEN, 0, split) and "Say" not in decode(PREF_REJECTED, split, len(tokens))


@pytest.mark.parametrize("record,message", [
    ({"prompt": "Q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "the same answer"),
    ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "b"}]}, "prompts of 'chosen' and 'rejected' differ"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}], "rejected": "b"}, "both be strings or both"),
])
def test_bad_pairs_name_file_and_line_or_are_skipped(tmp_path, tokenizer, record, message):
    good = {"prompt": "Say yes\n", "chosen": "yes", "rejected": "no"}
    path = _write(tmp_path / "p.jsonl", [good, record, good])
    with pytest.raises(DataError, match=rf"p\.jsonl:2: .*{message}") as e:
        tokenize_files([path], tokenizer, _data_cfg(tmp_path, path), tmp_path / "cache", log=lambda m: None)
    assert e.value.exit_code == 2
    data = tokenize_files([path], tokenizer, _data_cfg(tmp_path, path, on_error="skip"), tmp_path / "cache2", log=lambda m: None)
    assert len(data) == 2 and data.skipped == 1 and "p.jsonl:2" in data.skip_reasons[0]


def test_objective_and_data_must_agree(tmp_path):
    from budgetune.errors import ConfigError
    from budgetune.train import train
    from helpers import write_chat_jsonl

    chat = write_chat_jsonl(tmp_path / "chat.jsonl", n=20)
    with pytest.raises(ConfigError, match="objective.name.*dpo trains on preference pairs"):
        train(tiny_config(tmp_path, chat, objective={"name": "dpo"}, budget={"steps": 1}), quiet=True)
    pref = write_preference_jsonl(tmp_path / "p.jsonl", n=20)
    with pytest.raises(ConfigError, match="set objective.name"):
        train(tiny_config(tmp_path, pref, budget={"steps": 1}), quiet=True)
    assert not (tmp_path / "run").exists()  # nothing half-written


# --- training ------------------------------------------------------------------------------------------------------


def test_tiny_model_learns_a_preference_with_dpo(tmp_path):
    """DPO with LoRA on a constructed preference (chosen answers use one half of the vocabulary's words,
    rejected ones the other): held-out reward accuracy from 0 (the reference is the model itself) to high."""
    from budgetune.train import train

    data = write_preference_jsonl(tmp_path / "p.jsonl", n=200)
    cfg = tiny_config(tmp_path, data, objective={"name": "dpo", "beta": 0.1}, method={"name": "lora", "r": 8},
                      optim={"lr": 3e-3}, budget={"steps": 40})
    cfg["data"]["eval_fraction"] = 0.15
    summary = train(cfg, quiet=True)
    assert summary["eval_loss_before"] == pytest.approx(np.log(2), abs=1e-5)  # π = π_ref: every margin is 0
    pref = summary["preference_eval"]
    assert pref["reward_accuracy"] >= 0.9, pref
    assert pref["margin"] > 0 and summary["eval_loss_after"] < summary["eval_loss_before"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x and "event" not in x]
    assert {"reward_accuracy", "margin", "chosen_logp", "rejected_logp"} <= set(steps[-1])
    assert json.loads((tmp_path / "run" / "reference.json").read_text())["mode"] == "adapter"


def test_dpo_on_a_quantised_base(tmp_path):
    """QLoRA + DPO: the NF4 base stays frozen, the reference is that base with the adapter disabled
    (no second copy), and a few steps move the held-out reward margin."""
    pytest.importorskip("bitsandbytes")
    from budgetune.train import train

    data = write_preference_jsonl(tmp_path / "p.jsonl", n=80)
    cfg = tiny_config(tmp_path, data, model={"init": "scratch", "preset": "llama-test", "quantize": "nf4"},
                      objective={"name": "dpo", "beta": 0.1}, method={"name": "lora", "r": 8},
                      optim={"lr": 3e-3}, budget={"steps": 8})
    cfg["data"]["eval_fraction"] = 0.2
    summary = train(cfg, quiet=True)
    assert summary["eval_loss_before"] == pytest.approx(np.log(2), abs=1e-5)  # π = π_ref at step 0
    assert json.loads((tmp_path / "run" / "reference.json").read_text())["mode"] == "adapter"
    assert summary["eval_loss_after"] < summary["eval_loss_before"] and summary["preference_eval"]["margin"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_resumes_exactly_after_a_kill(tmp_path, monkeypatch, method):
    """Killed right after its first checkpoint and resumed: the same weights as a run never stopped —
    with the adapter-disabled reference (lora) and with reference log-probs cached once and read back (full)."""
    from helpers import interrupted_and_uninterrupted

    data = write_preference_jsonl(tmp_path / "p.jsonl", n=60)
    straight, resumed = interrupted_and_uninterrupted(tmp_path, data, monkeypatch, objective={"name": "dpo"},
                                                      method={"name": method}, budget={"steps": 8}, checkpoint={"every": 0.5})
    mode = json.loads((tmp_path / "b" / "run" / "reference.json").read_text())["mode"]
    assert mode == ("adapter" if method == "lora" else "cached")
    assert (tmp_path / "b" / "run" / "reference_logps.npz").exists() == (method == "full")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_preference_run_end_to_end_on_the_command_line(tmp_path):
    """`budgetune train` with a DPO config (chat-form pairs, LoRA), then eval, export of the adapter and
    of the merged model, which transformers loads."""
    import subprocess
    import sys

    import yaml

    data = write_preference_jsonl(tmp_path / "p.jsonl", n=60, chat=True)
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, data, objective={"name": "dpo", "beta": 0.2},
                                                 method={"name": "lora", "r": 4}, budget={"steps": 6})))
    cli = lambda *a: subprocess.run([sys.executable, "-m", "budgetune", *map(str, a)], capture_output=True, text=True, timeout=300)  # noqa: E731
    done = cli("train", config, "--quiet")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == "dpo" and set(summary["preference_eval"]) == {"reward_accuracy", "margin", "chosen_logp", "rejected_logp"}
    done = cli("eval", run, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["objective"] == "dpo" and 0 <= result["reward_accuracy"] <= 1
    assert result["eval_loss"] == pytest.approx(summary["eval_loss_after"], rel=1e-4)  # same split, same reference
    assert "reward accuracy" in (run / "report.html").read_text()
    assert cli("export", run).returncode == 0
    done = cli("export", run, "--merge")
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM

    merged = next(p for p in (run / "export").iterdir() if (p / "config.json").exists() and "merged" in p.name)
    assert AutoModelForCausalLM.from_pretrained(str(merged)).num_parameters() > 0
