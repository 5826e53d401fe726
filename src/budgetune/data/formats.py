"""Example formats: records → token ids + a loss mask.

- text: plain documents; loss on every token.
- prompt_completion: `{"prompt", "completion"}`; loss on the completion only.
- chat: `{"messages": [{"role", "content"}, ...]}` rendered with the tokenizer's chat
  template; loss on assistant turns only.
- sharegpt: `{"conversations": [{"from", "value"}, ...]}` (roles human/gpt/system, mapped
  to user/assistant/system; `data.roles` adds or overrides names), optional `"system"`;
  read as chat.
- alpaca: `{"instruction", "input", "output"}` (optional `"system"`, `"history"` of
  [instruction, response] pairs): the user turn is the instruction, then the input; read
  as chat, so the loss is on the output (and the history's responses).
- preference: `{"prompt", "chosen", "rejected"}` strings (prompt + answer, like
  prompt_completion), or chat form: `chosen`/`rejected` message lists that share every turn
  but the last assistant one (or an explicit `prompt` message list), rendered with the chat
  template. A pair is one example: the chosen sequence, then the rejected one, with loss
  mask values PREF_CHOSEN / PREF_REJECTED on the answers (packing.py keeps the pair in one
  row and restarts positions between its halves).

Adding a format is adding a class to FORMATS: `detect(record, cfg)`, `encode(records,
wheres, tokenizer, cfg)` and `texts(record, cfg)` (the strings a tokenizer is trained on).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError

Encoded = tuple[list[int], list[int]]  # (token ids, loss mask 0/1)

# Loss-mask values of a preference pair (bit 0: an answer token, bit 1: the rejected half)
PREF_CHOSEN, PREF_REJECTED_PROMPT, PREF_REJECTED = 1, 2, 3

# A plain ChatML template, used when the tokenizer has none (tokenizer.chat_template unset).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_ROLES = {"system", "user", "assistant", "tool"}
# Role names of other tools' chat data, mapped onto CHAT_ROLES; data.roles adds to / overrides these
DEFAULT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool", "observation": "tool"}


def role_map(cfg) -> dict:
    """Source role name → chat role: the defaults, then the user's data.roles."""
    return {**DEFAULT_ROLES, **(getattr(cfg, "roles", None) or {})}


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

    @staticmethod
    def texts(record: dict, cfg) -> list:
        return [record.get(cfg.text_field)]


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

    @staticmethod
    def texts(record: dict, cfg) -> list:
        return [record.get(cfg.prompt_field), record.get(cfg.completion_field)]


class ChatFormat:
    name = "chat"

    @staticmethod
    def detect(record: dict, cfg) -> bool:
        return cfg.messages_field in record

    @staticmethod
    def encode(records: Sequence[dict], wheres: Sequence[str], tokenizer, cfg) -> list[Encoded]:
        return [_encode_messages(_chat_messages(r, w, cfg), w, tokenizer) for r, w in zip(records, wheres)]

    @staticmethod
    def texts(record: dict, cfg) -> list:
        messages = record.get(cfg.messages_field)
        return [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


class ShareGPTFormat:
    """ShareGPT / LLaMA-Factory / Axolotl conversations: `from`/`value` turns (or `role`/`content`)."""

    name = "sharegpt"

    @staticmethod
    def detect(record: dict, cfg) -> bool:
        return cfg.conversations_field in record

    @staticmethod
    def encode(records: Sequence[dict], wheres: Sequence[str], tokenizer, cfg) -> list[Encoded]:
        return [_encode_messages(_sharegpt_messages(r, w, cfg), w, tokenizer) for r, w in zip(records, wheres)]

    @staticmethod
    def texts(record: dict, cfg) -> list:
        turns = record.get(cfg.conversations_field)
        if not isinstance(turns, list):
            return []
        return [record.get("system")] + [t.get("value", t.get("content")) for t in turns if isinstance(t, dict)]


class AlpacaFormat:
    """Alpaca instructions: `instruction`, optional `input`, `output` (optional `system`, `history`)."""

    name = "alpaca"

    @staticmethod
    def detect(record: dict, cfg) -> bool:
        return cfg.instruction_field in record and cfg.output_field in record

    @staticmethod
    def encode(records: Sequence[dict], wheres: Sequence[str], tokenizer, cfg) -> list[Encoded]:
        return [_encode_messages(_alpaca_messages(r, w, cfg), w, tokenizer) for r, w in zip(records, wheres)]

    @staticmethod
    def texts(record: dict, cfg) -> list:
        history = record.get("history")
        pairs = [x for pair in history if isinstance(pair, list) for x in pair] if isinstance(history, list) else []
        return [record.get("system"), *pairs, record.get(cfg.instruction_field), record.get(cfg.input_field),
                record.get(cfg.output_field)]


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


def _chat_messages(record: dict, where: str, cfg) -> list[dict]:
    """The `messages` list of a chat record, checked, with data.roles applied."""
    return _checked_messages(record.get(cfg.messages_field), where, cfg, cfg.messages_field)


def _checked_messages(messages, where: str, cfg, field: str) -> list[dict]:
    """A list of {role, content} messages (the value of `field`), checked, with data.roles applied."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{field}' must be a non-empty list of {{role, content}} objects")
    roles = role_map(cfg)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            hint = (f"; it has 'from'/'value' (ShareGPT): set data.format: sharegpt and data.conversations_field: "
                    f"{field}") if isinstance(m, dict) and "from" in m and "value" in m else ""
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'{hint}")
        out.append({**m, "role": _chat_role(m["role"], roles, where, i)})
    return out


def _chat_role(name: str, roles: dict, where: str, i: int) -> str:
    role = roles.get(name, name)
    if role not in CHAT_ROLES:
        raise DataError(f"{where}: message {i} has unknown role {name!r} (use one of {', '.join(sorted(CHAT_ROLES))}, "
                        f"or map it with data.roles, e.g. data.roles: {{{name}: assistant}})")
    return role


def _sharegpt_messages(record: dict, where: str, cfg) -> list[dict]:
    field = cfg.conversations_field
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{field}' must be a non-empty list of {{from, value}} objects")
    roles = role_map(cfg)
    messages = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
        if system.strip():
            messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        name, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) and "from" in turn else (
            (turn.get("role"), turn.get("content")) if isinstance(turn, dict) else (None, None))
        if not isinstance(name, str) or not isinstance(value, str):
            raise DataError(f"{where}: turn {i} of '{field}' must be an object with string 'from' and 'value'")
        messages.append({"role": _chat_role(name, roles, where, i), "content": value})
    return messages


def _alpaca_messages(record: dict, where: str, cfg) -> list[dict]:
    instruction = _field(record, cfg.instruction_field, where, "alpaca", required=True)
    extra = _field(record, cfg.input_field, where, "alpaca") if record.get(cfg.input_field) is not None else ""
    output = _field(record, cfg.output_field, where, "alpaca", required=True)
    messages = []
    if record.get("system") is not None:
        system = _field(record, "system", where, "alpaca")
        if system.strip():
            messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                                for p in history):
        raise DataError(f"{where}: field 'history' must be a list of [instruction, response] string pairs")
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _encode_messages(messages: list[dict], where: str, tokenizer, last_only: bool = False) -> Encoded:
    """Render the whole conversation once; mark the characters each assistant turn adds.

    The assistant span of turn i runs from where its content starts (after the role
    header) to the end of render(messages[:i+1]): the reply and its end-of-turn marker. Token labels come from the tokenizer's offsets, so the
    mask is exact even where BPE merges across a boundary.
    """
    for i, m in enumerate(messages):
        _text(m["content"], where, f"message {i}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message — nothing to learn from this conversation")
    full = _render(tokenizer, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_only and i != len(messages) - 1):
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


class PreferenceFormat:
    """Preference pairs for dpo / orpo / simpo: a prompt, a chosen and a rejected answer."""

    name = "preference"

    @staticmethod
    def detect(record: dict, cfg) -> bool:
        return cfg.chosen_field in record or cfg.rejected_field in record  # one without the other: named as missing

    @staticmethod
    def encode(records: Sequence[dict], wheres: Sequence[str], tokenizer, cfg) -> list[Encoded]:
        out = []
        for record, where in zip(records, wheres):
            (c_ids, c_mask), (r_ids, r_mask) = _preference_halves(record, where, tokenizer, cfg)
            if not any(c_mask) or not any(r_mask):
                raise DataError(f"{where}: the {'chosen' if not any(c_mask) else 'rejected'} answer has no tokens; fill or remove this pair")
            out.append((c_ids + r_ids, [PREF_CHOSEN if m else 0 for m in c_mask]
                        + [PREF_REJECTED if m else PREF_REJECTED_PROMPT for m in r_mask]))
        return out

    @staticmethod
    def texts(record: dict, cfg) -> list:
        out = []
        for key in (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field):
            value = record.get(key)
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, list):
                out += [m.get("content") for m in value if isinstance(m, dict)]
        return out


def _preference_halves(record: dict, where: str, tokenizer, cfg) -> tuple[Encoded, Encoded]:
    """(chosen, rejected) as (ids, 0/1 answer mask), after the checks that make a pair usable."""
    cf, rf, pf = cfg.chosen_field, cfg.rejected_field, cfg.prompt_field
    for key in (cf, rf):
        if record.get(key) is None:
            raise DataError(f"{where}: missing field '{key}' for preference data (found: {', '.join(map(str, record))}); "
                            f"a pair needs '{cf}' and '{rf}' (fix or remove it, or set data.on_error: skip)")
    chosen, rejected = record.get(cf), record.get(rf)
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = _field(record, pf, where, "preference")
        chosen, rejected = _field(record, cf, where, "preference", True), _field(record, rf, where, "preference", True)
        if chosen == rejected:
            raise DataError(f"{where}: '{cf}' and '{rf}' are the same answer — nothing to prefer; fix or remove this pair "
                            "(or set data.on_error: skip)")
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        a_ids = [_with_eos(ids, tokenizer) for ids in tokenizer([chosen, rejected], add_special_tokens=False)["input_ids"]]
        if not p_ids:  # no prompt: the answer still opens with the tokenizer's special tokens (if any), without loss
            p_ids = tokenizer("", add_special_tokens=True)["input_ids"]
        return tuple((p_ids + a, [0] * len(p_ids) + [1] * len(a)) for a in a_ids)
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise DataError(f"{where}: '{cf}' and '{rf}' must both be strings or both be lists of chat messages, got "
                        f"{type(chosen).__name__} and {type(rejected).__name__}")
    conversations = []
    for key, value in ((cf, chosen), (rf, rejected)):
        messages = _checked_messages(value, where, cfg, key) if value else []
        if record.get(pf) is not None:  # explicit prompt: a message list (or a user turn as a string) before the answer
            prompt = record[pf]
            prompt = [{"role": "user", "content": _field(record, pf, where, "preference")}] if isinstance(prompt, str) else (
                _checked_messages(prompt, where, cfg, pf))
            messages = prompt + messages
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: '{key}' must end with an assistant message (the answer that is preferred or rejected)")
        conversations.append(messages)
    c_msgs, r_msgs = conversations
    if c_msgs[:-1] != r_msgs[:-1]:
        turn = next((i for i, (a, b) in enumerate(zip(c_msgs[:-1], r_msgs[:-1])) if a != b), min(len(c_msgs), len(r_msgs)) - 1)
        raise DataError(f"{where}: the prompts of '{cf}' and '{rf}' differ (at message {turn}); a pair must share every "
                        "message but the final assistant answer")
    if c_msgs[-1]["content"] == r_msgs[-1]["content"]:
        raise DataError(f"{where}: '{cf}' and '{rf}' end with the same answer — nothing to prefer; fix or remove this pair "
                        "(or set data.on_error: skip)")
    return _encode_messages(c_msgs, where, tokenizer, last_only=True), _encode_messages(r_msgs, where, tokenizer, last_only=True)


# In the order `auto` tries them: preference pairs and conversations first, text last (chat and
# instruction records may also carry a 'text' field). Each is told apart by fields the others lack.
FORMATS = {f.name: f for f in (PreferenceFormat, ChatFormat, ShareGPTFormat, PromptCompletionFormat, AlpacaFormat, TextFormat)}


def detect_format(record: dict, where: str, cfg) -> str:
    for name, fmt in FORMATS.items():
        if fmt.detect(record, cfg):
            return name
    raise DataError(
        f"{where}: cannot tell the data format from fields {sorted(map(str, record))}; expected "
        f"'{cfg.text_field}', '{cfg.prompt_field}'+'{cfg.completion_field}', '{cfg.messages_field}' (chat), "
        f"'{cfg.conversations_field}' (sharegpt), '{cfg.instruction_field}'+'{cfg.output_field}' (alpaca) "
        f"or '{cfg.chosen_field}'+'{cfg.rejected_field}' (preference) "
        "(or set data.format and the data.*_field keys)"
    )
