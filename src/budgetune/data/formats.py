"""Example formats: records → token ids + a loss mask.

- text: plain documents; loss on every token.
- prompt_completion: `{"prompt", "completion"}`; loss on the completion only.
- chat: `{"messages": [{"role", "content"}, ...]}` rendered with the tokenizer's chat
  template; loss on assistant turns only.

Adding a format is adding a class to FORMATS.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError

Encoded = tuple[list[int], list[int]]  # (token ids, loss mask 0/1)

# A plain ChatML template, used when the tokenizer has none (tokenizer.chat_template unset).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_ROLES = {"system", "user", "assistant", "tool"}


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def _text(value: str, where: str, what: str) -> str:
    # JSON can escape a lone surrogate ("\ud800"): a Python string, but not text any tokenizer takes
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: {what} holds a lone surrogate escape (such as \\ud800), which is not text; fix or remove this record") from None
    return value


def _field(record: dict, name: str, where: str, fmt: str, required: bool = False):
    """The string field `name`; `required`: it must hold more than whitespace."""
    if name not in record:
        raise DataError(f"{where}: missing field '{name}' for {fmt} data (found: {', '.join(map(str, record)) or 'nothing'})")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: empty '{name}' — nothing to learn from this record; fill or remove it (or set data.on_error: skip)")
    return _text(value, where, f"field '{name}'")


class TextFormat:
    name = "text"

    @staticmethod
    def detect(record: dict, cfg) -> bool:
        return cfg.text_field in record

    @staticmethod
    def encode(records: Sequence[dict], wheres: Sequence[str], tokenizer, cfg) -> list[Encoded]:
        texts = [_field(r, cfg.text_field, w, "text", required=True) for r, w in zip(records, wheres)]
        batch = tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [(ids, [1] * len(ids)) for ids in (_with_eos(ids, tokenizer) for ids in batch)]


class PromptCompletionFormat:
    name = "prompt_completion"

    @staticmethod
    def detect(record: dict, cfg) -> bool:
        return cfg.prompt_field in record and cfg.completion_field in record

    @staticmethod
    def encode(records: Sequence[dict], wheres: Sequence[str], tokenizer, cfg) -> list[Encoded]:
        prompts = [_field(r, cfg.prompt_field, w, "prompt_completion") for r, w in zip(records, wheres)]
        completions = [_field(r, cfg.completion_field, w, "prompt_completion", required=True) for r, w in zip(records, wheres)]
        p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        out = []
        for p, c in zip(p_ids, c_ids):
            c = _with_eos(c, tokenizer)
            out.append((p + c, [0] * len(p) + [1] * len(c)))
        return out


class ChatFormat:
    name = "chat"

    @staticmethod
    def detect(record: dict, cfg) -> bool:
        return cfg.messages_field in record

    @staticmethod
    def encode(records: Sequence[dict], wheres: Sequence[str], tokenizer, cfg) -> list[Encoded]:
        return [_encode_chat(r, w, tokenizer, cfg) for r, w in zip(records, wheres)]


def _render(tokenizer, messages, add_generation_prompt: bool, where: str) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateSyntaxError as e:  # the template itself is broken: no record can fix that
        raise ConfigError(f"config key 'tokenizer.chat_template': the chat template is not valid Jinja ({e.message}, "
                          f"template line {e.lineno}); set tokenizer.chat_template to one that is") from None
    except jinja2.TemplateError as e:  # the template refuses this conversation (e.g. roles must alternate)
        raise DataError(f"{where}: the chat template refused this conversation ({e}); fix the record "
                        "or set tokenizer.chat_template to a template that accepts it") from None


def _encode_chat(record: dict, where: str, tokenizer, cfg) -> Encoded:
    """Render the whole conversation once; mark the characters each assistant turn adds.

    The assistant span of turn i runs from where its content starts (after the role
    header) to the end of render(messages[:i+1]): the reply and its end-of-turn marker. Token labels come from the tokenizer's offsets, so the
    mask is exact even where BPE merges across a boundary.
    """
    messages = record.get(cfg.messages_field)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{cfg.messages_field}' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: message {i} has unknown role {m['role']!r} (use one of {', '.join(sorted(CHAT_ROLES))})")
        _text(m["content"], where, f"message {i}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message — nothing to learn from this conversation")
    full = _render(tokenizer, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # the reply starts where its content appears after the previous turns (this skips
        # the role header for any template, including a conversation opened by the assistant)
        before = len(_render(tokenizer, messages[:i], False, where)) if i else 0
        found = full.find(m["content"], before) if m["content"] else -1
        start = found if found >= 0 else (len(_render(tokenizer, messages[:i], True, where)) if i else before)
        end = len(_render(tokenizer, messages[: i + 1], False, where))
        if full[:end] != _render(tokenizer, messages[: i + 1], False, where) or start > end:
            raise DataError(
                f"{where}: the chat template does not render conversations prefix by prefix, so assistant turns "
                "cannot be located; set tokenizer.chat_template to a template that does"
            )
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=np.int8)
    for start, end in spans:
        mask |= (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
    return list(ids), mask.tolist()


FORMATS = {f.name: f for f in (ChatFormat, PromptCompletionFormat, TextFormat)}


def detect_format(record: dict, where: str, cfg) -> str:
    for name, fmt in FORMATS.items():  # chat first: chat records may also carry a 'text' field
        if fmt.detect(record, cfg):
            return name
    raise DataError(
        f"{where}: cannot tell the data format from fields {sorted(map(str, record))}; expected "
        f"'{cfg.text_field}', '{cfg.prompt_field}'+'{cfg.completion_field}', or '{cfg.messages_field}' "
        "(or set data.format and the data.*_field keys)"
    )
