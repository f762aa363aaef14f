"""ChatGLM3's `tool_call(...)` line: written as THUDM's fine-tuning writes it, read back with `ast`, never `eval`.

THUDM's `format_function_call` unparses ``ast.Call(tool_call, keywords=[k=Constant(v)])`` with `astunparse`: keys
verbatim, in the arguments' order, each value as its Python `repr`, pairs joined by ``", "``. Reading accepts
exactly that shape back: one call of ``tool_call`` with keyword arguments whose values are literals.
"""

from __future__ import annotations

import ast
import json

# astunparse writes a top-level infinite float as 1e309 (a literal that reads back as inf).
_INF = "1e309"


def _literal(value: object) -> str:
    if isinstance(value, float):
        return repr(value).replace("inf", _INF)
    return repr(value)


def format_tool_call(arguments: dict) -> str:
    """``tool_call(k1=v1, k2=v2)`` for a JSON object's values, exactly as THUDM's fine-tuning data has it."""
    return "tool_call(" + ", ".join(f"{key}={_literal(value)}" for key, value in arguments.items()) + ")"


def read_tool_call(code: str) -> dict | None:
    """The keyword arguments of one ``tool_call(...)`` with literal values, or None for anything else.

    Positional arguments, ``**kwargs``, names, calls, operators (``2**10``), several statements: all None.
    """
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        return None
    if call.args or any(k.arg is None for k in call.keywords):
        return None
    arguments = {}
    for keyword in call.keywords:
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    try:  # the value must also be JSON: no sets, bytes, complex numbers or infinities
        json.dumps(arguments, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return arguments
