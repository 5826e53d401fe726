"""Shared fixtures: a tiny locally trained tokenizer and an isolated cache directory.

Nothing here touches the network or ~/.cache.
"""

from __future__ import annotations

import os

import pytest

_WORDS = (
    "the quick brown fox jumps over the lazy dog while a small model learns to read and write "
    "simple english sentences about budgets time tokens steps and training data"
).split()

_PYTHON = '''\
def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Counter:
    def __init__(self, start=0):
        self.value = start

    def step(self, n=1):
        self.value += n
        return self.value


import os
for i in range(10):
    if i % 2 == 0:
        print(os.path.join("data", str(i)))
'''


def tiny_corpus(n_sentences: int = 200) -> list[str]:
    """Deterministic English + Python text for training the test tokenizer."""
    out = []
    for i in range(n_sentences):
        words = [_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(6 + i % 5)]
        out.append(" ".join(words).capitalize() + ".")
    out.extend([_PYTHON] * 20)
    out.extend(["User: hello, how are you?\nAssistant: I am fine, thank you."] * 20)
    return out


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Point BUDGETUNE_CACHE at a session tmp dir so no test writes to ~/.cache."""
    path = tmp_path_factory.mktemp("budgetune-cache")
    old = os.environ.get("BUDGETUNE_CACHE")
    os.environ["BUDGETUNE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("BUDGETUNE_CACHE", None)
    else:
        os.environ["BUDGETUNE_CACHE"] = old


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh cache directory for one test (pass as cache_dir= / data.cache_dir)."""
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny byte-level BPE tokenizer (vocab ~300) with ChatML specials and the default chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from budgetune.data.formats import DEFAULT_CHAT_TEMPLATE

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast
