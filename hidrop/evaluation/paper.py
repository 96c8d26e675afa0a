"""The paper's eleven benchmarks, read from local copies in the layouts their releases and LLaVA-1.5's
evaluation preparation use, scored with their official rules (hidrop.evaluation.official).

Every benchmark takes `root` (its folder) and, to override the default layout, the paths of its files
(relative to `root` or absolute). A missing file or folder is an error naming the path (the harness adds the
benchmark's name).
Prompts follow LLaVA-1.5's evaluation prompts. `limit` keeps the first N questions in file order (MMBench:
the first N questions, each with all its rotations).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hidrop.evaluation.official import (
    LETTERS,
    MME_COGNITION,
    MME_PERCEPTION,
    circular_accuracy,
    gqa_match,
    mme_scores,
    option_letter,
    parse_yes_no,
    pope_metrics,
    rotate_options,
    vqa_accuracy,
)
from hidrop.evaluation.registry import Benchmark, register
from hidrop.sample import GPT, HUMAN, IMAGE_PLACEHOLDER, Sample

SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE = "Answer with the option's letter from the given choices directly."
CHOICE_CN = "请直接回答选项字母。"
VIZWIZ = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER

# the order of the paper's Table 1 columns
PAPER_BENCHMARKS = (
    "mme",
    "mmbench",
    "mmbench_cn",
    "gqa",
    "vqav2",
    "scienceqa_img",
    "vizwiz",
    "textvqa",
    "pope",
    "seed_image",
    "mmstar",
)
PAPER_NAMES = {
    "mme": "MME",
    "mmbench": "MMB",
    "mmbench_cn": "MMB-CN",
    "gqa": "GQA",
    "vqav2": "VQAv2",
    "scienceqa_img": "SQA-IMG",
    "vizwiz": "VizWiz",
    "textvqa": "TextVQA",
    "pope": "POPE",
    "seed_image": "SEED-I",
    "mmstar": "MMStar",
}


def _sample(sid: str, prompt: str, image, answer: Optional[str], family: str = "", candidates=None, **meta) -> Sample:
    turns = (
        {"from": HUMAN, "value": f"{IMAGE_PLACEHOLDER}\n{prompt}" if image is not None else prompt},
        {"from": GPT, "value": answer or ""},
    )
    return Sample(
        id=sid,
        conversations=turns,
        image=image,
        answer=answer,
        family=family,
        candidates=tuple(candidates) if candidates else None,
        meta=meta,
    )


def _b64_image(data: str) -> Callable:
    def load():
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(data)))

    return load


def _choices_prompt(question: str, options: dict[str, str], suffix: str, hint: str = "") -> str:
    lines = ([hint] if hint else []) + [question] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines) + "\n" + suffix


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan", "NaN")


class LocalBenchmark(Benchmark):
    """A benchmark read from `root`; `paths` maps each file role to its default location under it."""

    default_mode = "generate"
    paths: dict[str, str] = {}

    def __init__(self, limit: Optional[int] = None, seed: int = 0, root: Optional[str] = None, **files):
        unknown = sorted(set(files) - set(self.paths))
        if unknown:
            raise TypeError(f"{self.name}: unknown option(s) {unknown}; options: root, {', '.join(self.paths)}")
        super().__init__(limit=limit, seed=seed, root=root, **files)
        self.root = Path(root).expanduser() if root else None
        self.files = {**self.paths, **files}

    def path(self, role: str) -> Path:
        given = Path(str(self.files[role])).expanduser()
        if not given.is_absolute():
            if self.root is None:
                raise FileNotFoundError(f"set `root` (the benchmark's folder) or an absolute `{role}` path")
            given = self.root / given
        if not given.exists():
            raise FileNotFoundError(f"{role} not found at {given}")
        return given

    def take(self, items: list) -> list:
        return items if self.limit is None else items[: self.limit]


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_tsv(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # embedded base64 images are long
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# ---- open-ended VQA ----------------------------------------------------------------------------------


@register("vqav2")
class VQAv2(LocalBenchmark):
    """VQAv2 with answers (a val split, or test-dev answers you hold): the questions and annotations
    JSON of the release, COCO images named COCO_<split>_<image_id:012d>.jpg. VQA accuracy."""

    description = "VQAv2 (questions + annotations JSON, COCO images), VQA accuracy"
    paths = {
        "questions": "v2_OpenEnded_mscoco_val2014_questions.json",
        "annotations": "v2_mscoco_val2014_annotations.json",
        "images": "val2014",
        "image_prefix": "COCO_val2014_",
    }

    def load(self) -> list[Sample]:
        questions = _read_json(self.path("questions"))["questions"]
        answers = {
            a["question_id"]: [x["answer"] for x in a["answers"]]
            for a in _read_json(self.path("annotations"))["annotations"]
        }
        images, prefix = self.path("images"), self.files["image_prefix"]
        out = []
        for q in self.take(questions):
            if q["question_id"] not in answers:
                raise ValueError(
                    f"question {q['question_id']} has no annotation (test-dev answers are "
                    "scored by the evaluation server; use a split with answers)"
                )
            out.append(
                _sample(
                    str(q["question_id"]),
                    f"{q['question']}\n{SHORT_ANSWER}",
                    images / f"{prefix}{int(q['image_id']):012d}.jpg",
                    answers[q["question_id"]][0],
                    answers=answers[q["question_id"]],
                )
            )
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        return vqa_accuracy(prediction, sample.meta["answers"])


@register("textvqa")
class TextVQA(VQAv2):
    """TextVQA 0.5.1 val: {"data": [{question_id, image_id, question, answers}]}, images/<image_id>.jpg."""

    description = "TextVQA val (TextVQA_0.5.1_val.json + train_images), VQA accuracy"
    paths = {"questions": "TextVQA_0.5.1_val.json", "images": "train_images"}

    def load(self) -> list[Sample]:
        data, images = _read_json(self.path("questions"))["data"], self.path("images")
        return [
            _sample(
                str(q["question_id"]),
                f"{q['question']}\n{SHORT_ANSWER}",
                images / f"{q['image_id']}.jpg",
                q["answers"][0],
                answers=list(q["answers"]),
            )
            for q in self.take(data)
        ]


@register("vizwiz")
class VizWiz(VQAv2):
    """VizWiz-VQA val: [{image, question, answers: [{answer, answer_confidence}]}], images in val/."""

    description = "VizWiz val (val.json + val images), VQA accuracy, 'unanswerable' included"
    paths = {"questions": "val.json", "images": "val"}

    def load(self) -> list[Sample]:
        data, images = _read_json(self.path("questions")), self.path("images")
        out = []
        for q in self.take(data):
            answers = [a["answer"] for a in q["answers"]]
            out.append(
                _sample(
                    Path(q["image"]).stem,
                    f"{q['question']}\n{VIZWIZ}",
                    images / q["image"],
                    answers[0],
                    answers=answers,
                )
            )
        return out


@register("gqa")
class GQA(LocalBenchmark):
    """GQA testdev-balanced: {qid: {imageId, question, answer, ...}}, images/<imageId>.jpg. Exact match."""

    description = "GQA testdev-balanced (questions JSON + images), exact match"
    paths = {"questions": "testdev_balanced_questions.json", "images": "images"}

    def load(self) -> list[Sample]:
        data, images = _read_json(self.path("questions")), self.path("images")
        return [
            _sample(qid, f"{q['question']}\n{SHORT_ANSWER}", images / f"{q['imageId']}.jpg", q["answer"])
            for qid, q in self.take(list(data.items()))
        ]

    def score(self, sample: Sample, prediction: str) -> float:
        return gqa_match(prediction, sample.answer or "")


# ---- yes / no ----------------------------------------------------------------------------------------


@register("pope")
class POPE(LocalBenchmark):
    """POPE: coco_pope_{adversarial,popular,random}.json (JSON lines: question_id, image, text, label) over
    COCO val2014 images. The score is the mean F1 over the splits; accuracy, precision, recall, F1 and
    yes-ratio are reported per split."""

    description = "POPE adversarial / popular / random (JSON lines + COCO val2014), F1 and yes-ratio"
    paths = {"annotations": ".", "images": "val2014", "splits": "adversarial,popular,random"}

    def load(self) -> list[Sample]:
        folder, images = self.path("annotations"), self.path("images")
        out = []
        for split in str(self.files["splits"]).split(","):
            path = folder / f"coco_pope_{split.strip()}.json"
            if not path.exists():
                raise FileNotFoundError(f"split {split.strip()!r} not found at {path}")
            for q in self.take(_read_jsonl(path)):
                out.append(
                    _sample(
                        f"{split.strip()}-{q['question_id']}",
                        f"{q['text']}\n{SHORT_ANSWER}",
                        images / q["image"],
                        q["label"],
                        family=split.strip(),
                        candidates=("yes", "no"),
                    )
                )
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        return float(parse_yes_no(prediction) == (sample.answer or "").strip().lower())

    def stratum(self, sample: Sample) -> str:
        return sample.family  # the split: the score is the mean of the per-split F1

    def aggregate(self, samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
        # the per-sample score says right / wrong; the prediction's yes / no follows from it and the label
        predictions = ["yes" if (s.answer == "yes") == bool(sc) else "no" for s, sc in zip(samples, scores)]
        out, f1s = {}, []
        for split in sorted({s.family for s in samples}):
            idx = [i for i, s in enumerate(samples) if s.family == split]
            m = pope_metrics([predictions[i] for i in idx], [samples[i].answer or "" for i in idx])
            out.update({f"{split}/{k}": v for k, v in m.items()})
            f1s.append(m["f1"])
        out["score"] = sum(f1s) / len(f1s) if f1s else float("nan")
        return out


@register("mme")
class MME(LocalBenchmark):
    """MME (MME_Benchmark_release_version): per category folder, images with a questions_answers_YN/<stem>.txt
    of "question<TAB>Yes|No" lines (or image and .txt side by side). The score is the perception total
    (sum of acc + acc+ over its ten categories); every category's acc and acc+ are reported."""

    description = "MME perception (per-category folders), acc + acc+ per category"
    paths = {"images": ".", "categories": "perception"}

    def load(self) -> list[Sample]:
        root = self.path("images")
        wanted = {"perception": MME_PERCEPTION, "cognition": MME_COGNITION, "all": MME_PERCEPTION + MME_COGNITION}.get(
            str(self.files["categories"])
        )
        if wanted is None:
            wanted = tuple(c.strip() for c in str(self.files["categories"]).split(","))
        out = []
        for category in wanted:
            folder = root / category
            if not folder.is_dir():
                raise FileNotFoundError(f"category {category!r} not found at {folder}")
            qa = folder / "questions_answers_YN"
            texts = sorted(qa.glob("*.txt")) if qa.is_dir() else sorted(folder.glob("*.txt"))
            image_dir = folder / "images" if (folder / "images").is_dir() else folder
            per_category = []
            for txt in texts:
                image = next(
                    (p for p in (image_dir / f"{txt.stem}{ext}" for ext in (".jpg", ".png", ".jpeg")) if p.exists()),
                    None,
                )
                if image is None:
                    raise FileNotFoundError(f"no image for {txt} in {image_dir}")
                for n, line in enumerate(l for l in txt.read_text(encoding="utf-8").splitlines() if l.strip()):
                    question, answer = line.rsplit("\t", 1)
                    per_category.append(
                        _sample(
                            f"{category}/{txt.stem}/{n}",
                            question.strip(),
                            image,
                            answer.strip().lower(),
                            family=category,
                            candidates=("yes", "no"),
                            image_key=f"{category}/{txt.stem}",
                        )
                    )
            out += self.take(per_category)  # the limit applies per category (keeps the image pairs whole)
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        return float(parse_yes_no(prediction) == sample.answer)

    def unit(self, sample: Sample) -> str:
        return f"{sample.family}/{sample.meta['image_key']}"  # acc+ needs both of an image's questions

    def stratum(self, sample: Sample) -> str:
        return sample.family  # the score sums per-category figures: every resample keeps every category

    def relabel(self, sample: Sample, copy: int) -> Sample:
        return dataclasses.replace(sample, meta={**sample.meta, "image_key": f"{sample.meta['image_key']}#{copy}"})

    def aggregate(self, samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
        m = mme_scores((s.family, s.meta["image_key"], bool(sc)) for s, sc in zip(samples, scores))
        total = m["perception"] if any(s.family in MME_PERCEPTION for s in samples) else m["cognition"]
        return {
            "score": total,
            **{k: v for k, v in m.items() if k not in ("perception", "cognition")},
            "perception": m["perception"],
            "cognition": m["cognition"],
        }


# ---- multiple choice ---------------------------------------------------------------------------------


class ChoiceBenchmark(LocalBenchmark):
    """Multiple choice: the answer is an option letter, read from the prediction by `option_letter`."""

    def score(self, sample: Sample, prediction: str) -> float:
        return float(option_letter(prediction, sample.meta["options"]) == sample.answer)


@register("mmbench")
class MMBench(ChoiceBenchmark):
    """MMBench dev TSV (index, question, hint, A-D, answer, category, image as base64). CircularEval: each
    question is asked once per rotation of its options and counts only if every rotation is right. A TSV
    that already holds the rotations (indices shifted by multiples of 1e6) is grouped as it is."""

    description = "MMBench dev (TSV with base64 images), CircularEval"
    paths = {"tsv": "mmbench_dev_20230712.tsv", "circular": "true"}
    suffix = CHOICE

    def load(self) -> list[Sample]:
        rows = _read_tsv(self.path("tsv"))
        circular = str(self.files["circular"]).lower() in ("true", "1", "yes")
        expanded = any(int(r["index"]) >= 1_000_000 for r in rows)
        groups: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            groups[int(r["index"]) % 1_000_000].append(r)
        out = []
        for group in self.take(list(groups)):
            for r in groups[group]:
                options = {k: str(r[k]) for k in LETTERS if k in r and not _blank(r[k])}
                hint = "" if _blank(r.get("hint")) else str(r["hint"])
                rotations = range(len(options)) if circular and not expanded else range(1)
                for k in rotations:
                    opts, answer = rotate_options(options, r["answer"], k)
                    out.append(
                        _sample(
                            f"{r['index']}-{k}",
                            _choices_prompt(str(r["question"]), opts, self.suffix, hint),
                            _b64_image(r["image"]),
                            answer,
                            family=str(r.get("category", "")),
                            candidates=tuple(opts),
                            options=opts,
                            group=group,
                        )
                    )
        return out

    def unit(self, sample: Sample) -> str:
        return str(sample.meta["group"])  # CircularEval: a question counts when all its rotations are right

    def relabel(self, sample: Sample, copy: int) -> Sample:
        return dataclasses.replace(sample, meta={**sample.meta, "group": f"{sample.meta['group']}#{copy}"})

    def aggregate(self, samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
        groups: dict[int, list[bool]] = defaultdict(list)
        by_category: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for s, sc in zip(samples, scores):
            groups[s.meta["group"]].append(bool(sc))
            by_category[s.family][s.meta["group"]].append(bool(sc))
        out = {"score": circular_accuracy(groups)}
        for category, g in sorted(by_category.items()):
            if category:
                out[f"category/{category}"] = circular_accuracy(g)
        return out


@register("mmbench_cn")
class MMBenchCN(MMBench):
    description = "MMBench-CN dev (TSV with base64 images), CircularEval, Chinese prompt"
    paths = {"tsv": "mmbench_dev_cn_20231003.tsv", "circular": "true"}
    suffix = CHOICE_CN


@register("scienceqa_img")
class ScienceQAImg(ChoiceBenchmark):
    """ScienceQA test, questions with an image: problems.json + pid_splits.json, images/test/<pid>/image.png."""

    description = "ScienceQA-IMG test (problems.json + pid_splits.json + images), accuracy"
    paths = {"problems": "problems.json", "splits": "pid_splits.json", "images": "images/test", "split": "test"}

    def load(self) -> list[Sample]:
        problems = _read_json(self.path("problems"))
        pids = _read_json(self.path("splits"))[str(self.files["split"])]
        images = self.path("images")
        out = []
        for pid in pids:
            p = problems[pid]
            if not p.get("image"):
                continue
            options = {LETTERS[i]: c for i, c in enumerate(p["choices"])}
            context = (p.get("hint") or "").strip()
            question = f"Context: {context}\n{p['question']}" if context else p["question"]
            out.append(
                _sample(
                    pid,
                    _choices_prompt(question, options, CHOICE),
                    images / pid / p["image"],
                    LETTERS[int(p["answer"])],
                    family=str(p.get("subject", "")),
                    candidates=tuple(options),
                    options=options,
                )
            )
            if self.limit is not None and len(out) >= self.limit:
                break
        return out


@register("seed_image")
class SEEDImage(ChoiceBenchmark):
    """SEED-Bench image questions: SEED-Bench.json {"questions": [{question_id, question, choice_a..d,
    answer, data_type, data_id}]} and the image folder. Accuracy."""

    description = "SEED-Bench image part (SEED-Bench.json + images), accuracy"
    paths = {"questions": "SEED-Bench.json", "images": "SEED-Bench-image"}

    def load(self) -> list[Sample]:
        data, images = _read_json(self.path("questions"))["questions"], self.path("images")
        picked = [q for q in data if q.get("data_type", "image") == "image"]
        out = []
        for q in self.take(picked):
            options = {L: q[f"choice_{L.lower()}"] for L in "ABCD"}
            out.append(
                _sample(
                    str(q["question_id"]),
                    _choices_prompt(q["question"], options, CHOICE),
                    images / q["data_id"],
                    q["answer"],
                    family=str(q.get("question_type_id", "")),
                    candidates=tuple(options),
                    options=options,
                )
            )
        return out


@register("mmstar")
class MMStar(ChoiceBenchmark):
    """MMStar TSV (index, question with its options, answer, category, l2_category, image as base64).
    Accuracy."""

    description = "MMStar (TSV with base64 images), accuracy"
    paths = {"tsv": "MMStar.tsv"}

    def load(self) -> list[Sample]:
        out = []
        for r in self.take(_read_tsv(self.path("tsv"))):
            options = {L: L for L in "ABCD"}  # the options are written inside the question
            out.append(
                _sample(
                    str(r["index"]),
                    f"{r['question']}\n{CHOICE}",
                    _b64_image(r["image"]),
                    str(r["answer"]).strip(),
                    family=str(r.get("category", "")),
                    candidates=tuple(options),
                    options=options,
                )
            )
        return out


# ---- the paper's Avg(%) and table --------------------------------------------------------------------


def format_delta(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:+.{digits}f}"


def comparison_rows(comparison: dict, columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """The two rows shown under a measured one for a published comparison (`Comparison.to_dict()` of
    hidrop.evaluation.published): the paper's figures and the differences (measured - published), as
    cells for `columns` then Avg (%). A benchmark the paper lacks reads "n/a"; the Avg cell says what it
    rests on when that is not the paper's own basis."""
    pub, delta = [], []
    for b in columns:
        if b in comparison["published"]:
            pub.append(f"{comparison['published'][b]:.1f}")
            delta.append(format_delta(comparison["deltas"][b]))
        else:
            pub.append("n/a")
            delta.append("")
    avg = f"{comparison['published_avg']:.1f}"
    printed = comparison["published_avg_printed"]
    if printed is not None and f"{printed:.1f}" != avg:  # recomputed and printed differ: show both
        avg += f" (printed {printed:.1f})"
    if comparison["not_measured"]:
        avg += f" (over {len(comparison['benchmarks'])})"
    pub.append(avg)
    delta.append(format_delta(comparison["delta_avg"]))
    return pub, delta


def paper_table(
    rows: dict[str, dict[str, float]], reference: str, published: Optional[dict[str, list[dict]]] = None
) -> str:
    """Markdown in Table 1's layout: one row per method, the eleven columns in the paper's order (those
    present), then Avg(%) against the `reference` row (mean of per-benchmark ratios x 100). `published`
    (method -> published comparisons) adds, under a method, each matching paper row and the differences."""
    from hidrop.evaluation.metrics import relative_score

    columns = [b for b in PAPER_BENCHMARKS if any(b in r for r in rows.values())]
    lines = [
        "| method | " + " | ".join(PAPER_NAMES[b] for b in columns) + " | Avg (%) |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for name, scores in rows.items():
        rel = relative_score({b: scores[b] for b in columns if b in scores}, rows[reference])
        cells = [f"{scores[b]:.1f}" if b in scores else "-" for b in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if rel is None else f'{rel:.1f}'} |")
        for comparison in (published or {}).get(name, []):
            pub, delta = comparison_rows(comparison, columns)
            lines.append(f"| ↳ {comparison['description']} | " + " | ".join(pub) + " |")
            lines.append("| ↳ measured − paper | " + " | ".join(delta) + " |")
    return "\n".join(lines) + "\n"
