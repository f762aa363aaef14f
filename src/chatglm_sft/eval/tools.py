"""`eval --task tools`: did the model call the right tools with the right arguments, and only when it should?

Each record holds `reference_tool_calls` (a list of ``{"name", "arguments"}``; null or [] when no call is expected)
and either predicted `tool_calls` (the same shape, or OpenAI's ``{"function": {...}}``) or a raw `response`, read
with the family's parser (`chatglm_sft.tools.parse_reply`, with the record's `tools` when it has them). Arguments
are compared as parsed JSON, calls as multisets (order does not matter, repeats do).

* ``call_recall``: of records expecting a call, the share with a predicted call;
* ``call_precision``: of records with a predicted call, the share expecting one;
* ``name_accuracy``: of records expecting a call, the share whose predicted names equal the expected names;
* ``arguments_exact``: of records expecting a call, the share whose (name, arguments) pairs equal the expected ones;
* ``no_call_accuracy``: of records expecting no call, the share with none;
* ``parse_errors``: responses that started a call that did not parse.

A share over no records is 0.0; the counts beside the shares say how many records each one is over.
"""

from __future__ import annotations

import json
from collections import Counter

from chatglm_sft.errors import UserError
from chatglm_sft.families import Family
from chatglm_sft.tools import parse_reply

METRICS = ("call_recall", "call_precision", "name_accuracy", "arguments_exact", "no_call_accuracy", "parse_errors")


def _arguments(value: object) -> object:
    """Arguments as a parsed JSON value (text that is not JSON stays text, and so never equals an object)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def normalise_calls(calls: object, where: str) -> list[tuple[str, str]]:
    """Calls as (name, canonical arguments JSON) pairs; None and [] are no calls."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise UserError(f"{where} must be a list of {{name, arguments}} or null")
    pairs = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f"{where}: each call needs a name")
        canonical = json.dumps(_arguments(function.get("arguments", {})), sort_keys=True, ensure_ascii=False)
        pairs.append((function["name"], canonical))
    return pairs


def _predicted(row: dict, family: Family | None, where: str) -> tuple[list[tuple[str, str]], bool]:
    """(predicted calls, whether a raw response started a call that did not parse)."""
    if "tool_calls" in row:
        return normalise_calls(row["tool_calls"], f"{where} tool_calls"), False
    if "response" not in row:
        raise UserError(f"{where} has neither 'tool_calls' nor 'response'")
    if family is None:
        raise UserError(f"{where} has a raw 'response': pass --family (or --model) to read its calls")
    message, broken = parse_reply(family, str(row["response"] or ""), row.get("tools"))
    return normalise_calls(message.get("tool_calls"), f"{where} response"), broken > 0


def score(rows: list[dict], family: Family | None = None, source: str = "predictions") -> tuple[dict, list[dict]]:
    """Metrics (see the module docstring) and one result per record."""
    details = []
    for i, row in enumerate(rows):
        where = f"{source}: record {i + 1}"
        if "reference_tool_calls" not in row:
            raise UserError(f"{where} has no 'reference_tool_calls' field")
        expected = normalise_calls(row["reference_tool_calls"], f"{where} reference_tool_calls")
        predicted, parse_error = _predicted(row, family, where)
        details.append(
            {
                **row,
                "predicted_tool_calls": [{"name": n, "arguments": json.loads(a)} for n, a in predicted],
                "expects_call": bool(expected),
                "has_call": bool(predicted),
                "name_match": Counter(n for n, _ in expected) == Counter(n for n, _ in predicted),
                "arguments_match": Counter(expected) == Counter(predicted),
                "parse_error": parse_error,
            }
        )
    return _metrics(details), details


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _metrics(details: list[dict]) -> dict:
    expecting = [d for d in details if d["expects_call"]]
    calling = [d for d in details if d["has_call"]]
    quiet = [d for d in details if not d["expects_call"]]
    return {
        "call_recall": _share(sum(d["has_call"] for d in expecting), len(expecting)),
        "call_precision": _share(sum(d["expects_call"] for d in calling), len(calling)),
        "name_accuracy": _share(sum(d["name_match"] for d in expecting), len(expecting)),
        "arguments_exact": _share(sum(d["arguments_match"] for d in expecting), len(expecting)),
        "no_call_accuracy": _share(sum(not d["has_call"] for d in quiet), len(quiet)),
        "parse_errors": sum(d["parse_error"] for d in details),
        "expecting_call": len(expecting),
        "predicted_call": len(calling),
        "expecting_none": len(quiet),
        "total": len(details),
    }


def generate_responses(engine, records: list[dict], prompts: list[list[int]], params, batch_size: int) -> list[dict]:
    """Model mode: each record plus the `response` the model gives, its reply segments kept apart (see
    `chatglm_sft.tools.decode_reply`) so a thought and a call stay two segments."""
    from chatglm_sft.tools import decode_reply

    rows = []
    for start in range(0, len(prompts), batch_size):
        generations = engine.generate(prompts[start : start + batch_size], params)
        for record, generation in zip(records[start : start + batch_size], generations, strict=True):
            rows.append({**record, "response": decode_reply(engine.tokenizer, generation.token_ids)})
    return rows
