"""The one conversation encoder: messages -> ids and labels (training) or a prompt (inference).

A chat template renders OpenAI-style messages into `Segment`s: plain text, or one special token. Text is always
encoded as text (a user who types ``<|assistant|>`` gets those characters), special tokens by id. Training and
inference call the same `render`; the inference prompt of a conversation is the training ids of that conversation
cut before the reply, by construction.

Templates follow THUDM's official `chat()` prompts (see ``NOTES.md`` in the reference material):

* ``chatglm-6b``: ``[Round i]\\n问：…\\n答：…\\n`` from 0, a first turn with no history is the bare query, then
  ``[gMASK] <sop>``; the reply follows with ``<eop>``. The history sits in the bidirectional prompt of the prefix-LM,
  so only the last reply is learned.
* ``chatglm2-6b``: ``[gMASK] sop`` then ``[Round i]\\n\\n问：…\\n\\n答：…\\n\\n`` from 1, encoded in one piece as the
  official `chat()` does; earlier replies are learned through character spans, the last one with ``</s>``.
* ``chatglm3`` / ``glm-4``: ``[gMASK] sop`` then ``<|role|>{metadata}\\n{content}`` per message, ending with
  ``<|assistant|>`` for generation. ChatGLM3 encodes the header and the content separately, GLM-4 as one string.
  A reply is learned together with the token that ends it (the next role token, or the end token after the last:
  eos for ChatGLM3, ``<|user|>`` for GLM-4, as THUDM's fine-tuning does). Tools, calls and tool results reach
  these templates through the family's tool format (`chatglm_sft.tools.formats`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chatglm_sft.errors import UserError
from chatglm_sft.families import FAMILIES, Family
from chatglm_sft.tools.formats import TOOL_FORMATS, uses_tools

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "observation")


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation."""

    text: str = ""
    """Plain text (encoded without special tokens); empty for a special token."""
    special: str | None = None
    """Name of a special token (a key of `Family.special_tokens`)."""
    turn: int | None = None
    """Index of the assistant reply whose labels this segment carries (None: no labels)."""
    spans: tuple[tuple[int, int, int], ...] = ()
    """For text encoded in one piece with several replies inside: (start, end, turn) character spans to label."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def check_messages(messages: Sequence[dict], allowed_roles: Sequence[str] = ROLES) -> list[dict]:
    """Validate family messages; return them as plain dicts with a `content` string (and `loss` when given)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise UserError("messages must be a list of {role, content} objects")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"message {i} is not an object")
        role, content = m.get("role"), m.get("content", "")
        if role not in allowed_roles:
            raise UserError(f"message {i}: unknown role {role!r} (expected one of {', '.join(allowed_roles)})")
        if not isinstance(content, str):
            raise UserError(f"message {i}: content must be a string")
        message = {"role": role, "content": content, "metadata": str(m.get("metadata") or "")}
        if "loss" in m:
            if not isinstance(m["loss"], bool):
                raise UserError(f"message {i}: loss must be true or false")
            message["loss"] = m["loss"]
        checked.append(message)
    return checked


def family_messages(family: Family, messages: Sequence[dict], tools: object = None) -> list[dict]:
    """OpenAI-style messages (and `tools`) as the family's template messages, validated.

    Families with a tool format map tools, calls and results through it (`chatglm_sft.tools.formats`); the others
    have none, so tools there are an error rather than a prompt that silently lacks them.
    """
    if family.tool_format is None:
        if isinstance(messages, Sequence) and uses_tools(messages, tools):
            raise UserError(
                f"{family.name} has no tool-calling format (tools work with "
                f"{', '.join(f.name for f in FAMILIES.values() if f.tool_format)})"
            )
        return check_messages(messages)
    return check_messages(TOOL_FORMATS[family.tool_format].to_family_messages(messages, tools))


def _rounds(messages: list[dict], template: str) -> tuple[str, list[tuple[str, str]], str, str | None]:
    """Split a round-based conversation into (system, [(query, reply)...], last query, last reply or None)."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    if any(r not in ("user", "assistant") for r in roles):
        raise UserError(f"the {template} template supports system, user and assistant messages only")
    expected = ["user", "assistant"] * (len(roles) // 2 + 1)
    if roles != expected[: len(roles)] or not roles:
        raise UserError("messages must alternate user, assistant, ... starting with user")
    contents = [m["content"] for m in messages]
    pairs = list(zip(contents[0::2], contents[1::2], strict=False))
    if roles[-1] == "assistant":
        *history, (query, reply) = pairs
        return system, history, query, reply
    return system, pairs, contents[-1], None


def _refuse_prompt_after_reply(reply: str | None, generation: bool, template: str) -> None:
    """A round-based prompt ends with a user message: after an assistant reply there is nothing for the model to
    continue (dropping the reply instead would lose it silently)."""
    if reply is not None and generation:
        raise UserError(f"the {template} template needs a user message last to prompt for a reply")


def _render_chatglm6b(messages: list[dict], generation: bool, end: str) -> list[Segment]:
    system, history, query, reply = _rounds(messages, "chatglm-6b")
    _refuse_prompt_after_reply(reply, generation, "chatglm-6b")
    if history:
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
        prompt += f"[Round {len(history)}]\n问：{query}\n答："
    else:
        prompt = query
    if system:
        prompt = f"{system}\n{prompt}"
    segments = [Segment(prompt), Segment(special="[gMASK]"), Segment(special="<sop>")]
    if reply is not None and not generation:
        turn = len(history)
        segments += [Segment(reply, turn=turn), Segment(special=end, turn=turn)]
    return segments


def _render_chatglm2(messages: list[dict], generation: bool, end: str) -> list[Segment]:
    system, history, query, reply = _rounds(messages, "chatglm2-6b")
    _refuse_prompt_after_reply(reply, generation, "chatglm2-6b")
    prompt, spans = (f"{system}\n\n" if system else ""), []
    for i, (q, a) in enumerate(history):
        prompt += f"[Round {i + 1}]\n\n问：{q}\n\n答："
        spans.append((len(prompt), len(prompt) + len(a), i))
        prompt += f"{a}\n\n"
    prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    segments = [Segment(special="[gMASK]"), Segment(special="sop"), Segment(prompt, spans=tuple(spans))]
    if reply is not None and not generation:
        turn = len(history)
        segments += [Segment(reply, turn=turn), Segment(special=end, turn=turn)]
    return segments


def _role_token_renderer(prefix: tuple[str, str], joined: bool) -> Callable[[list[dict], bool, str], list]:
    def render(messages: list[dict], generation: bool, end: str) -> list[Segment]:
        # THUDM's fine-tuning convention: a trained assistant message is learned after its role token, together
        # with the token that follows it (the next role token, or the end token). Consecutive assistant messages
        # (a thought, then a call) form one reply, so "the last reply" keeps them together.
        segments = [Segment(special=name) for name in prefix]
        reply, open_reply, previous = -1, None, None
        for m in messages:
            role = m["role"]
            segments.append(Segment(special=f"<|{role}|>", turn=open_reply))
            open_reply = None
            if role == "assistant":
                reply += previous != "assistant"
                open_reply = reply if m.get("loss", True) else None
            previous = role
            header = f"{m['metadata']}\n"
            if joined:
                segments.append(Segment(header + m["content"], turn=open_reply))
            else:
                segments += [Segment(header, turn=open_reply), Segment(m["content"], turn=open_reply)]
        segments.append(Segment(special="<|assistant|>" if generation else end, turn=open_reply))
        return segments

    return render


TEMPLATES: dict[str, Callable[[list[dict], bool, str], list[Segment]]] = {
    "chatglm-6b": _render_chatglm6b,
    "chatglm2-6b": _render_chatglm2,
    "chatglm3": _role_token_renderer(("[gMASK]", "sop"), joined=False),
    "glm-4": _role_token_renderer(("[gMASK]", "<sop>"), joined=True),
}


def _family(family: Family | str) -> Family:
    """A family record, also from its template name (what older callers pass)."""
    if isinstance(family, Family):
        return family
    return next(f for f in FAMILIES.values() if f.template == family)


def render(
    family: Family | str, messages: Sequence[dict], add_generation_prompt: bool, tools: object = None
) -> list[Segment]:
    """Render OpenAI-style messages (and tools) with the family's template."""
    family = _family(family)
    messages = family_messages(family, messages, tools)
    return TEMPLATES[family.template](messages, add_generation_prompt, family.reply_end_token)


def _encode_segments(tokenizer, segments: list[Segment], last_turn_only: bool) -> Encoded:
    """`tokenizer` must offer `special_id(name)`, `encode_plain(text)` and `encode_plain_with_offsets(text)`."""
    turns = [s.turn for s in segments if s.turn is not None] + [t for s in segments for *_, t in s.spans]
    last_turn = max(turns, default=None)

    def learn(turn):
        return turn is not None and (not last_turn_only or turn == last_turn)

    ids: list[int] = []
    labels: list[int] = []
    for seg in segments:
        if seg.special is not None:
            piece = [tokenizer.special_id(seg.special)]
            piece_labels = piece if learn(seg.turn) else [IGNORE_INDEX]
        elif seg.spans:
            piece, offsets = tokenizer.encode_plain_with_offsets(seg.text)
            piece_labels = [IGNORE_INDEX] * len(piece)
            for start, end, turn in seg.spans:
                if learn(turn):
                    for k, (a, b) in enumerate(offsets):
                        if start <= a and b <= end and b > a:
                            piece_labels[k] = piece[k]
        else:
            piece = tokenizer.encode_plain(seg.text)
            piece_labels = list(piece) if learn(seg.turn) else [IGNORE_INDEX] * len(piece)
        ids += piece
        labels += piece_labels
    return Encoded(ids, labels)


def encode_conversation(
    tokenizer,
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
    max_length: int | None = None,
    last_turn_only: bool = False,
    tools: object = None,
) -> Encoded:
    """Ids and labels for `messages` with the tokenizer's family template.

    With `add_generation_prompt` the result is the inference prompt (labels all ignored). Without it the
    conversation should end with an assistant reply, which is learned (every reply, or the last one only).
    Over `max_length`, the oldest rounds go first (a system message stays); a single round still too long has its
    last reply, then its last user message, shortened as text, so no special-token frame is ever cut.
    """
    family = tokenizer.family
    messages = family_messages(family, messages, tools)
    template = TEMPLATES[family.template]

    def encode(msgs):
        segments = template(msgs, add_generation_prompt, family.reply_end_token)
        encoded = _encode_segments(tokenizer, segments, last_turn_only)
        if add_generation_prompt:  # a prompt is only context: nothing in it is learned
            encoded.labels = [IGNORE_INDEX] * len(encoded.input_ids)
        return encoded

    encoded = encode(messages)
    if max_length is None or len(encoded.input_ids) <= max_length:
        return encoded
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    while len(encoded.input_ids) > max_length and _first_user_after(body, 1) is not None:
        body = body[_first_user_after(body, 1) :]
        encoded = encode(head + body)
    messages = head + body
    for role in ("assistant", "user"):
        messages, encoded = _shorten_last(encode, messages, role, max_length, encoded)
        if len(encoded.input_ids) <= max_length:
            return encoded
    raise UserError(f"conversation cannot be shortened to {max_length} tokens")


def _first_user_after(messages: list[dict], start: int) -> int | None:
    for i in range(start, len(messages)):
        if messages[i]["role"] == "user":
            return i
    return None


def _shorten_last(
    encode, messages: list[dict], role: str, max_length: int, encoded: Encoded
) -> tuple[list[dict], Encoded]:
    """Cut the last `role` message's text (a reply from the end, a query from the start) until the ids fit."""
    idx = max((i for i, m in enumerate(messages) if m["role"] == role), default=None)
    if idx is None:
        return messages, encoded
    text = messages[idx]["content"]
    for _ in range(256):
        overflow = len(encoded.input_ids) - max_length
        if overflow <= 0 or not text:
            break
        # A token usually spans one or more characters, so cutting `overflow` characters closes in from above.
        text = text[:-overflow] if role == "assistant" else text[overflow:]
        messages = [dict(m) for m in messages]
        messages[idx]["content"] = text
        encoded = encode(messages)
    return messages, encoded


def render_text(tokenizer, messages: Sequence[dict], add_generation_prompt: bool, tools: object = None) -> str:
    """The prompt as a string, special tokens written as their names (for display and `tokenize=False`)."""
    segments = render(tokenizer.family, messages, add_generation_prompt, tools)
    return "".join(s.special if s.special is not None else s.text for s in segments)
