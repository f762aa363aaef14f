"""Request validation without a server: what the schema in /openapi.json says is what is accepted."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from chatglm_sft.serve.schemas import ChatRequest

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "tools",
    [
        [{"type": "", "function": {}}],  # a function without a name, whatever the type
        [{"type": "function", "function": {"name": 5}}],
        [{"type": "function", "function": {"name": ""}}],
        [{"type": "function"}],
        [{"function": {"name": "f"}}],  # no type
    ],
)
def test_tools_the_schema_refuses_are_refused(tools):
    with pytest.raises(ValidationError, match=r"tools\[0\]"):
        ChatRequest.model_validate({"messages": USER, "tools": tools})


def test_tools_kept_as_sent():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"}}
    other = {"type": "retrieval"}
    request = ChatRequest.model_validate({"messages": USER, "tools": [tool, other]})
    assert request.tools == [tool, other]
    assert list(request.tools[0]["function"]) == ["name", "parameters", "description"]  # order shown to GLM-4


@pytest.mark.parametrize("field,value", [("top_k", 40.0), ("max_tokens", 5.0), ("seed", 7.0), ("n", 1.0)])
def test_whole_floats_are_integers(field, value):
    request = ChatRequest.model_validate({"messages": USER, field: value})
    assert getattr(request, field) == int(value) and isinstance(getattr(request, field), int)


@pytest.mark.parametrize("field,value", [("top_k", 40.5), ("max_tokens", "5"), ("seed", float("inf")), ("n", True)])
def test_other_numbers_are_not_integers(field, value):
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"messages": USER, field: value})
