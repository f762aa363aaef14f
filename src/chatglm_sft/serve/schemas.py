"""What the HTTP API accepts: request bodies and the bounds of every field, checked before anything is tokenized.

The sampling fields take their ranges from `SamplingParams` (the same rules as the command line), narrowed where a
server must also protect its other requests: a temperature between 0 and the smallest one sampling handles, a
repetition penalty that divides logits into infinities, or a seed past 64 bits would otherwise fail while a batch
is decoded. Limits that depend on the server (`--max-tokens-limit`, the model's context) are checked by the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from chatglm_sft.infer.sampling import MIN_TEMPERATURE, SamplingParams
from chatglm_sft.options import specs

MAX_MESSAGES = 1024
"""Messages in one chat request."""
MAX_MESSAGE_CHARS = 1 << 20
"""Characters in one message or prompt (the body-size limit usually binds first)."""
MAX_TOOLS = 128
"""Tools in one chat request (as OpenAI)."""
MAX_STOP = 4
"""Stop strings in one request (as OpenAI)."""
MAX_STOP_CHARS = 256
"""Characters in one stop string."""
MAX_TOP_K = 100_000
MAX_TEMPERATURE = 2.0
"""OpenAI's upper bound."""
REPETITION_PENALTY = (0.01, 100.0)
"""Penalties outside this range turn logits into infinities or zeros."""


def _sampling_bounds(name: str, **narrower: float) -> dict[str, float]:
    """The range `SamplingParams` allows for `name`, with the server's narrower bounds added."""
    rule = next(s.rule for s in specs(SamplingParams) if s.name == name)
    bounds = {k: getattr(rule, k) for k in ("ge", "gt", "le", "lt") if getattr(rule, k) is not None}
    return bounds | narrower


TEMPERATURE = _sampling_bounds("temperature", le=MAX_TEMPERATURE)
TOP_P = _sampling_bounds("top_p")
TOP_K = _sampling_bounds("top_k", le=MAX_TOP_K)
PENALTY = _sampling_bounds("repetition_penalty", ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])
SEED = _sampling_bounds("seed")


def _check_temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    return value


# What the validators below accept, described in /openapi.json too: a schema-valid request is never refused by a
# rule the schema does not show (clients generated from it, and fuzzers, rely on that).
TEMPERATURE_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "number", "const": 0},
            {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE},
        ]
    }
)
ZERO_ONLY_SCHEMA = WithJsonSchema(
    {"type": "number", "minimum": 0, "maximum": 0, "description": "Only 0: use repetition_penalty (e.g. 1.1)."}
)
TOOL_SCHEMA = WithJsonSchema(
    {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1}},
            },
        },
        "if": {"properties": {"type": {"const": "function"}}},
        "then": {"required": ["function"]},
        "description": "A tool as OpenAI's API takes it; a `function` tool needs a function with a name.",
    }
)


def _whole_float_as_int(value: Any) -> Any:
    """JSON has one number type: 40.0 is the integer 40 (JSON Schema's `integer` admits it, and clients that keep
    numbers as floats send it). 40.5 stays a float, which the strict integer check then refuses."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds: int) -> Any:
    """An integer field within `bounds` (ge, le) that takes a whole number written as 40.0 too, never a string. The
    bounds come before the validator: after it, pydantic writes them into the JSON schema under its own names."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole_float_as_int)]


class Strict(BaseModel):
    """JSON types as written (no "0.5" for 0.5), no NaN or infinity, unknown fields ignored as OpenAI's clients
    send fields this server does not use."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]


class FunctionCall(Strict):
    name: StrictStr
    arguments: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] = "{}"
    """JSON text, passed on as sent."""


class ToolCall(Strict):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "observation", "tool", "function"]
    content: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | list[TextPart] | None = None
    """May be null on an assistant message that makes tool calls."""
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    """OpenAI's legacy single call."""
    tool_call_id: StrictStr | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        """The content as one string (OpenAI's text parts joined; null is empty)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: StrictBool = False
    """Send a last chunk with the token usage (and no choices), as OpenAI does."""


class SamplingFields(Strict):
    """Fields shared by chat and text completions."""

    model: StrictStr | None = None
    max_tokens: integer(ge=1) | None = None
    max_completion_tokens: integer(ge=1) | None = None
    """OpenAI's newer name for max_tokens."""
    temperature: Annotated[float, TEMPERATURE_SCHEMA] = Field(default=1.0, **TEMPERATURE)
    top_p: float = Field(default=1.0, **TOP_P)
    top_k: integer(**TOP_K) = 0
    repetition_penalty: float = Field(default=1.0, **PENALTY)
    presence_penalty: Annotated[float, ZERO_ONLY_SCHEMA] = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: Annotated[float, ZERO_ONLY_SCHEMA] = Field(default=0.0, ge=-2, le=2)
    seed: integer(**SEED) | None = None
    n: integer(ge=1, le=1) = 1
    """One choice per request (several: send several requests; they are batched)."""
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)]
        | None
    ) = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    _temperature = field_validator("temperature")(_check_temperature)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _openai_penalties(cls, value: float) -> float:
        if value != 0:
            raise ValueError("is not supported by this server; use repetition_penalty (e.g. 1.1)")
        return value

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class NamedFunction(Strict):
    name: StrictStr


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[Annotated[dict[str, Any], TOOL_SCHEMA]] | None = Field(default=None, max_length=MAX_TOOLS)
    """Kept as sent: GLM-4's prompt shows each function object as the client wrote it."""
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None

    @field_validator("tools")
    @classmethod
    def _tools_are_functions(cls, value: list[dict] | None) -> list[dict] | None:
        for i, tool in enumerate(value or []):
            if not isinstance(tool.get("type"), str):
                raise ValueError(f"tools[{i}] needs a type (function)")
            if tool["type"] == "function" or "function" in tool:
                function = tool.get("function")
                if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
                    raise ValueError(f"tools[{i}] needs a function with a name")
        return value


class CompletionRequest(SamplingFields):
    prompt: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]


class TextGenerateRequest(Strict):
    """The seed project's route: an instruction, optional text, generation settings."""

    instruction: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
    text: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] = ""
    max_new_tokens: integer(ge=1) | None = None
    """Default: the server's (256, cut to --max-tokens-limit and to what the context leaves)."""
    temperature: Annotated[float, TEMPERATURE_SCHEMA] = Field(default=0.0, **TEMPERATURE)
    top_p: float = Field(default=1.0, **TOP_P)
    top_k: integer(**TOP_K) = 0
    repetition_penalty: float = Field(default=1.0, **PENALTY)

    _temperature = field_validator("temperature")(_check_temperature)

    def as_sampling(self) -> SamplingFields:
        return SamplingFields(
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )
