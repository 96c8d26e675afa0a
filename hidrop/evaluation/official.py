"""The official scoring rules of the paper's eleven benchmarks, as plain functions (no model, no files).

- VQA accuracy (VQAv2, VizWiz, TextVQA): answers normalized the way the VQA evaluation does it
  (punctuation, number words to digits, articles dropped, common contractions restored), then
  min(1, matching humans / 3) averaged over the ten leave-one-out subsets of the human answers.
- Exact match after light normalization (GQA, as LLaVA's eval_gqa: lower case, trailing period off).
- Yes/no parsing and POPE's accuracy / precision / recall / F1 / yes-ratio.
- MME: per category acc and acc+ (both questions of an image right), score = acc + acc+; perception =
  the sum over its ten perception categories.
- Multiple choice: the option letter a free-form answer names, and MMBench's circular evaluation.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping, Optional, Sequence

# ---- VQA answer normalization ------------------------------------------------------------------------

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
# apostrophe-less spellings restored to the form the human answers use (the common ones)
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "lets": "let's",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "shant": "shan't",
    "shed": "she'd",
    "shes": "she's",
    "shouldnt": "shouldn't",
    "shouldve": "should've",
    "thats": "that's",
    "thered": "there'd",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "wed": "we'd",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # what the reference regex does in effect: "2." -> "2", "3.5" stays


def _punctuation(text: str) -> str:
    """Punctuation next to a space (or any, in a number like 1,000) is deleted; elsewhere it splits
    words ("black/white" -> "black white"). Periods go unless a digit follows."""
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa(answer: str) -> str:
    """The VQA evaluation's normalization: "Two dogs." -> "2 dogs", "the cat" -> "cat", "dont" -> "don't"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """min(1, matches / 3) averaged over the leave-one-out subsets of the human answers (ten in VQAv2).
    Prediction and human answers are both normalized, as LLaVA's TextVQA evaluator (and its VQAv2
    answer processor before submission) do."""
    if not human_answers:
        raise ValueError("no human answers to score against")
    pred = normalize_vqa(prediction)
    gts = [normalize_vqa(a) for a in human_answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    total = 0.0
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        total += min(1.0, sum(g == pred for g in others) / 3.0)
    return total / len(gts)


def gqa_match(prediction: str, answer: str) -> float:
    """LLaVA's eval_gqa: lower case, trailing period removed, then exact match."""

    def clean(text: str) -> str:
        text = text.strip().lower()
        return text[:-1] if text.endswith(".") else text

    return float(clean(prediction) == clean(answer))


# ---- yes / no, POPE, MME -----------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
    """LLaVA's POPE rule: the first sentence; "no" if it contains the words no / not, else "yes"."""
    first = text.strip().split(".", 1)[0].replace(",", " ")
    words = first.lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = "yes") and the yes-ratio, in percent."""
    pred = [parse_yes_no(p) == "yes" for p in predictions]
    gold = [normalize_vqa(l) == "yes" for l in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n if n else float("nan"),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * sum(pred) / n if n else float("nan"),
    }


MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(records: Iterable[tuple[str, str, bool]]) -> dict[str, float]:
    """records: (category, image, correct) per question (two questions per image). Per category: acc
    (% questions right), acc+ (% images with every question right), score = acc + acc+; `perception`
    and `cognition` sum their categories' scores (MME's totals, out of 2000 and 800)."""
    by_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for category, image, correct in records:
        by_category[category][image].append(bool(correct))
    out: dict[str, float] = {}
    for category, images in by_category.items():
        answers = [c for per_image in images.values() for c in per_image]
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(all(per_image) for per_image in images.values()) / len(images)
        out[f"{category}/acc"], out[f"{category}/acc_plus"], out[category] = acc, acc_plus, acc + acc_plus
    out["perception"] = sum(out[c] for c in MME_PERCEPTION if c in out)
    out["cognition"] = sum(out[c] for c in MME_COGNITION if c in out)
    return out


# ---- multiple choice ---------------------------------------------------------------------------------

LETTERS = "ABCDEFGH"


def option_letter(prediction: str, options: Mapping[str, str]) -> Optional[str]:
    """The option a free-form answer names: a bare letter ("B", "B.", "(B)", "B) cat", "Answer: B"), else
    the one option whose text the answer equals (case and punctuation aside). None when unclear."""
    text = prediction.strip()
    letters = "".join(sorted(options))
    patterns = (
        rf"^\(?([{letters}])\)?(?:[.:)\s]|$)",
        rf"^(?:answer|option)\s*(?:is)?\s*:?\s*\(?([{letters}])\)?(?:[.:)\s]|$)",
    )
    for pattern in patterns:
        found = re.match(pattern, text, flags=re.IGNORECASE if pattern.startswith("^(?:") else 0)
        if found:
            return found.group(1).upper()
    norm = normalize_vqa(text)
    same = [k for k, v in options.items() if normalize_vqa(str(v)) == norm]
    return same[0] if len(same) == 1 else None


def circular_accuracy(groups: Mapping[object, Sequence[bool]]) -> float:
    """MMBench's CircularEval: a question counts only if it is answered right under every rotation of
    its options; percent of questions."""
    if not groups:
        return float("nan")
    return 100.0 * sum(all(v) for v in groups.values()) / len(groups)


def rotate_options(options: Mapping[str, str], answer: str, k: int) -> tuple[dict[str, str], str]:
    """The options shifted by k places (A B C D -> B C D A for k=1) and where the answer went."""
    keys = sorted(options)
    values = [options[key] for key in keys]
    shifted = values[k:] + values[:k]
    rotated = dict(zip(keys, shifted))
    return rotated, keys[shifted.index(options[answer])]
