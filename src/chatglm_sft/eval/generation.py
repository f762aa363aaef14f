"""ROUGE-1/2/L and BLEU-4 as THUDM's P-Tuning scripts compute them for ADGEN.

ROUGE: F1 of `rouge-chinese` on jieba-segmented words (0 when either side has no words). BLEU-4: nltk
`sentence_bleu` on characters with `SmoothingFunction().method3`. Each x100 per record, then averaged.
"""

from __future__ import annotations

import logging

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    hypothesis = " ".join(jieba.cut(prediction)).strip()
    ref_words = " ".join(jieba.cut(reference)).strip()
    scores = dict.fromkeys(KEYS, 0.0)
    if hypothesis and ref_words:
        try:
            result = Rouge().get_scores(hypothesis, ref_words)[0]
            for key in ("rouge-1", "rouge-2", "rouge-l"):
                scores[key] = result[key]["f"] * 100
        except ValueError:  # rouge-chinese rejects texts that are only punctuation
            pass
    if prediction and reference:
        bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"] = float(bleu) * 100
    return scores


def score(rows: list[dict], response_field: str = "response", reference_field: str = "reference"):
    """Averaged metrics and per-record scores."""
    details = []
    for row in rows:
        details.append({**row, **score_pair(str(row.get(response_field) or ""), str(row.get(reference_field) or ""))})
    total = len(details)
    metrics = {key: (sum(d[key] for d in details) / total if total else 0.0) for key in KEYS}
    return metrics | {"total": total}, details
