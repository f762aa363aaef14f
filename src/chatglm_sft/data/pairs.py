"""Preference pairs: a prompt (a conversation so far) with a chosen and a rejected reply.

Three record shapes are read, all into the same `Pair`:

* alpaca-style: ``instruction``, optional ``input``, ``history`` and ``system``, and ``chosen``/``rejected`` strings;
* sharegpt-style: ``conversations`` (``from``/``value``) or ``messages`` (``role``/``content``) ending with the
  user's turn, and ``chosen``/``rejected`` as strings or as one assistant message each (LLaMA-Factory's shape);
* TRL's: ``prompt`` (a list of messages, or a string for one user turn) with ``chosen``/``rejected`` as lists holding
  one assistant message (or strings); without ``prompt``, ``chosen`` and ``rejected`` are whole conversations that
  must share everything before their last message (TRL's implicit prompt).

Pairs are encoded with the one conversation encoder (`chatglm_sft.conversation`), so the prompt of a pair is exactly
the inference prompt and the reply is learned with the family's end token, as in SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatglm_sft.conversation import IGNORE_INDEX, encode_conversation, render
from chatglm_sft.data.dataset import DataReport, check_each
from chatglm_sft.data.formats import RecordError, read_records, to_messages
from chatglm_sft.errors import UserError
from chatglm_sft.families import Family

PAIR_FIELDS = ("chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    prompt: list[dict]
    """The conversation before the reply (system, user, earlier rounds), ending with a user or observation turn."""
    chosen: str
    rejected: str


@dataclass
class EncodedPair:
    """Ids and labels of prompt + chosen and prompt + rejected; labels only on the reply (and its end token)."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]

    @property
    def length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def alike(self) -> bool:
        """Whether truncation left chosen and rejected the same tokens: a pair without a preference, whose margin is
        0 whatever the model (training leaves it out, `data check` lists it)."""
        return self.chosen_ids == self.rejected_ids


def is_pair_file(path: str | Path, look: int = 100) -> bool:
    """Whether the file's records are preference pairs (one of its first `look` records has chosen/rejected)."""
    for k, record in enumerate(read_records(path)):
        if isinstance(record.data, dict) and any(f in record.data for f in PAIR_FIELDS):
            return True
        if k + 1 >= look:
            break
    return False


def _reply(data: dict, key: str) -> str:
    """`chosen`/`rejected` as text: a string, one assistant message, or a list ending with one."""
    if key not in data or data[key] is None:
        raise RecordError(f"missing field {key!r}")
    value = data[key]
    if isinstance(value, list) and len(value) == 1:
        if not isinstance(value[0], dict):  # ["text"] is no documented shape; refused rather than guessed at
            raise RecordError(
                f"field {key!r} must be a string or one assistant message, not a list holding {_kind(value[0])}"
            )
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from"))
        if role is None:
            raise RecordError(f"field {key!r} must be an assistant message: the object has no 'role' (or 'from')")
        if role not in ("assistant", "gpt"):
            raise RecordError(f"field {key!r} must be an assistant message, not {role!r}")
        # The text under whichever key is there; when neither is, the error names the one of the role's style.
        text_key = next((k for k in ("content", "value") if k in value), "content" if "role" in value else "value")
        if not isinstance(value.get(text_key), str):
            raise RecordError(
                f"field {key!r}: the message's {text_key!r} must be a string, not {_kind(value.get(text_key))}"
            )
        value = value[text_key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string or one assistant message, not {_kind(value)}")
    if not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _kind(value: object) -> str:
    """A JSON value's kind as the user wrote it (`null`, not `NoneType`)."""
    if value is None:
        return "null"
    return {
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _prompt_of(data: dict) -> list[dict]:
    rest = {k: v for k, v in data.items() if k not in PAIR_FIELDS and k != "prompt"}
    if "prompt" in data:
        prompt = data["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise RecordError("field 'prompt' must be a string or a non-empty list of messages")
        messages = to_messages({**rest, "messages": prompt}, "sharegpt", need_reply=False)
    elif "instruction" in data or "conversations" in data or "messages" in data:
        messages = to_messages(rest, "auto", need_reply=False)
    else:
        raise RecordError("no prompt: expected prompt, instruction, conversations or messages beside chosen/rejected")
    if messages[-1]["role"] not in ("user", "observation"):
        raise RecordError("the prompt must end with a user (or observation) turn for the replies to answer")
    return messages


def _implicit(data: dict) -> tuple[list[dict], str, str]:
    """TRL's implicit prompt: chosen and rejected are whole conversations with the same beginning."""
    sides = []
    for key in PAIR_FIELDS:
        if key not in data or data[key] is None:
            raise RecordError(f"missing field {key!r}")
        try:
            messages = to_messages({"messages": data[key]}, "sharegpt", need_reply=True)
        except RecordError as error:  # its messages are this field's: say so
            raise RecordError(f"field {key!r}: {str(error).replace('messages[', f'{key}[')}") from None
        if messages[-1]["role"] != "assistant":
            raise RecordError(f"field {key!r} must end with an assistant message")
        sides.append(messages)
    (chosen, rejected) = sides
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("chosen and rejected have different prompts (everything before the last reply must match)")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def to_pair(data: object) -> Pair:
    """A record as a `Pair`; raises `RecordError` naming the problem."""
    if not isinstance(data, dict):
        raise RecordError(f"record is not a JSON object but {type(data).__name__}")
    if not any(key in data for key in PAIR_FIELDS):
        raise RecordError(
            "no 'chosen' or 'rejected' field: not a preference pair (an SFT record? use --objective sft)"
        )
    implicit = "prompt" not in data and isinstance(data.get("chosen"), list) and len(data["chosen"]) > 1
    if implicit:
        prompt, chosen, rejected = _implicit(data)
    else:
        prompt = _prompt_of(data)
        chosen, rejected = _reply(data, "chosen"), _reply(data, "rejected")
    if not chosen.strip() or not rejected.strip():
        raise RecordError("chosen and rejected must both be non-empty")
    if chosen == rejected:
        raise RecordError("chosen and rejected are identical")
    if chosen.strip() == rejected.strip():
        # A preference for a space or newline is a data bug, and tokenizers that drop surrounding whitespace would
        # encode the two alike: a pair without signal whose margin stays 0.
        raise RecordError("chosen and rejected differ only in leading or trailing whitespace")
    return Pair(prompt, chosen, rejected)


def check_pairs(path: str | Path, family: Family | None = None) -> DataReport:
    """Read and validate every pair (`check_each`: `report.good` holds (line, Pair)); with a family, its template
    must accept both conversations."""

    def checked_pair(data: dict) -> Pair:
        pair = to_pair(data)
        if family is not None:
            for reply in (pair.chosen, pair.rejected):
                render(family, [*pair.prompt, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        return pair

    return check_each(path, checked_pair)


def encode_pair(tokenizer, pair: Pair, max_length: int) -> EncodedPair:
    """Both conversations through the one encoder, learning only the reply. Over `max_length`, the prompt loses its
    oldest rounds the same way for both (decided by the longer side), then each reply is cut from its end; a prompt
    still too long loses the start of its last user message, the same for both as the replies are then empty."""
    prompt = list(pair.prompt)

    def encode(reply: str, messages: list[dict], limit: int | None = None):
        conversation = [*messages, {"role": "assistant", "content": reply}]
        return encode_conversation(tokenizer, conversation, max_length=limit, last_turn_only=True)

    whole = {reply: encode(reply, prompt) for reply in (pair.chosen, pair.rejected)}
    if all(len(side.input_ids) <= max_length for side in whole.values()):  # most pairs: nothing to cut
        chosen, rejected = whole[pair.chosen], whole[pair.rejected]
        return EncodedPair(chosen.input_ids, chosen.labels, rejected.input_ids, rejected.labels)
    longer = max(whole, key=lambda reply: len(whole[reply].input_ids))
    head = prompt[:1] if prompt[0]["role"] == "system" else []
    body = prompt[len(head) :]
    while len(encode(longer, head + body).input_ids) > max_length:
        later = [i for i in range(1, len(body)) if body[i]["role"] == "user"]
        if not later:
            break
        body = body[later[0] :]
    prompt = head + body
    chosen = encode(pair.chosen, prompt, max_length)
    rejected = encode(pair.rejected, prompt, max_length)
    for side in (chosen, rejected):
        if all(y == IGNORE_INDEX for y in side.labels):
            raise UserError(f"--max-length {max_length} leaves no reply tokens for a pair; raise it")
    return EncodedPair(chosen.input_ids, chosen.labels, rejected.input_ids, rejected.labels)
