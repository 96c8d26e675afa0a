"""Scoring rules and the paper's aggregate figures (no model code)."""

from __future__ import annotations

import re
import string
from typing import Iterable, Mapping, Optional, Sequence

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, first line only, punctuation removed, whitespace collapsed ("Yes." -> "yes")."""
    text = text.strip().split("\n", 1)[0].lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def relative_score(method: Mapping[str, float], reference: Mapping[str, float]) -> Optional[float]:
    """The paper's Avg(%): mean over benchmarks of method / unpruned x 100.

    Only benchmarks both sides scored count; None when the reference scored 0 on any of them (the ratio
    is undefined) or nothing is shared.
    """
    shared = [b for b in method if b in reference and method[b] is not None and reference[b] is not None]
    if not shared or any(reference[b] == 0 for b in shared):
        return None
    return 100.0 * mean(method[b] / reference[b] for b in shared)


def evidence_recall(kept: Sequence[bool], evidence: Sequence[int]) -> Optional[float]:
    """Fraction of the evidence grid tokens that survived (None when the question has no evidence)."""
    if not evidence:
        return None
    return sum(1 for i in evidence if kept[i]) / len(evidence)
