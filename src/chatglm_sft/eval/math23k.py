"""Math23K scoring: one stated rule for reading a number out of a response, one for comparing it.

* The predicted answer is the first number after the last occurrence of ``答案``, ``答``, ``=`` or ``＝``; when none
  of these occurs, the last number in the response. No number there: wrong.
* Numbers may be negative, use thousands separators (``1,200``), decimals, fractions ``a/b`` (also ``(a)/(b)``),
  mixed numbers ``a又b/c`` or ``a(b/c)``, and percentages (``25%`` is 0.25). Full-width forms count
  (the response is NFKC-normalised first).
* Gold answers come as ``880``, ``5.5``, ``((2)/(3))``, ``5((7)/(10))``, ``25%``.
* Correct when |pred - gold| <= 1e-4 * |gold|, or <= 1e-6 when gold is 0.
"""

from __future__ import annotations

import re
import unicodedata

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER = re.compile(
    rf"(?P<sign>[-−])?(?:"
    rf"(?P<mw>{_NUM})又(?P<mn>{_NUM})/(?P<md>{_NUM})"  # 2又1/3
    rf"|(?P<pw>{_NUM})\((?P<pn>{_NUM})/(?P<pd>{_NUM})\)"  # 5(7/10)
    rf"|\(?(?P<fn>{_NUM})\)?/\(?(?P<fd>{_NUM})\)?"  # 2/3, (2)/(3)
    rf"|(?P<pc>{_NUM})%"  # 25%
    rf"|(?P<n>{_NUM})"
    rf")"
)
_MARKERS = ("答案", "答", "=")


def _float(text: str) -> float:
    return float(text.replace(",", ""))


def _value(match: re.Match) -> float | None:
    g = match.groupdict()
    if g["mw"] is not None:
        value = _float(g["mw"]) + _fraction(g["mn"], g["md"])
    elif g["pw"] is not None:
        value = _float(g["pw"]) + _fraction(g["pn"], g["pd"])
    elif g["fn"] is not None:
        value = _fraction(g["fn"], g["fd"])
    elif g["pc"] is not None:
        value = _float(g["pc"]) / 100
    else:
        value = _float(g["n"])
    if value is None:
        return None
    return -value if g["sign"] else value


def _fraction(numerator: str, denominator: str) -> float | None:
    d = _float(denominator)
    return None if d == 0 else _float(numerator) / d


def extract_answer(response: str) -> float | None:
    """The number a response gives as its answer (see the module docstring), or None."""
    text = unicodedata.normalize("NFKC", response)
    hits = [(text.rfind(marker), len(marker)) for marker in _MARKERS if marker in text]
    if hits:
        start, length = max(hits)  # the latest marker; at a tie the longer one (答案 over 答)
        match = _NUMBER.search(text, start + length)
        return _value(match) if match else None
    matches = list(_NUMBER.finditer(text))
    return _value(matches[-1]) if matches else None


_GOLD_MIXED = re.compile(rf"^(?P<sign>-)?(?P<w>{_NUM})?\(\((?P<n>{_NUM})\)/\((?P<d>{_NUM})\)\)$")


def parse_gold(answer: str | int | float) -> float | None:
    """Math23K's `ans` field as a number."""
    if isinstance(answer, int | float):
        return float(answer)
    text = unicodedata.normalize("NFKC", str(answer)).strip().replace(" ", "")
    mixed = _GOLD_MIXED.match(text)
    if mixed:
        value = _fraction(mixed["n"], mixed["d"])
        if value is None:
            return None
        value += _float(mixed["w"]) if mixed["w"] else 0.0
        return -value if mixed["sign"] else value
    match = _NUMBER.fullmatch(text) or _NUMBER.fullmatch(text.replace("(", "").replace(")", ""))
    return _value(match) if match else None


def is_correct(pred: float | None, gold: float | None) -> bool:
    if pred is None or gold is None:
        return False
    tolerance = 1e-6 if gold == 0 else 1e-4 * abs(gold)
    return abs(pred - gold) <= tolerance


def score(rows: list[dict], response_field: str = "response", answer_field: str = "ans") -> tuple[dict, list[dict]]:
    """Metrics and per-record results for rows holding a response and a gold answer."""
    details = []
    for row in rows:
        pred = extract_answer(str(row.get(response_field) or ""))
        gold = parse_gold(row[answer_field])
        details.append({**row, "pred_answer": pred, "gold_answer": gold, "correct": is_correct(pred, gold)})
    correct = sum(d["correct"] for d in details)
    total = len(details)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}, details
