"""Turn `Sample`s into token ids and labels, batch them, and load the LLaVA / easy-VQA data.

Templates are written out as string pieces rather than taken from the tokenizer's jinja chat
template so the answer spans are known exactly: labels are IGNORE_INDEX everywhere except the
answer text and its end-of-turn token, which is also what the engine's multi-round query rule
reads (a query is the unsupervised token right before each answer span).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from hidrop.sample import GPT, HUMAN, IMAGE_PLACEHOLDER, Sample

IGNORE_INDEX = -100

_ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}


# ---------------------------------------------------------------------------------------------
# templates


@dataclass(frozen=True)
class ChatTemplate:
    """How turns become text. `{content}` / `{system}` are filled in; nothing here is tokenizer-specific."""

    name: str
    system: str = ""
    system_format: str = "{system}"  # rendered only when `system` is non-empty
    user_format: str = "{content}"  # one human turn
    assistant_prefix: str = ""  # opens an assistant turn (prompt side, unsupervised)
    answer_end: str = ""  # closes the answer; supervised together with it (end-of-turn token)
    assistant_suffix: str = ""  # after the answer, unsupervised
    generation_prompt: str = ""  # what a prompt ends with when the model is to answer
    add_bos: bool = False  # prepend tokenizer.bos_token_id as an id
    plain: bool = False  # LLaVA stage-1: image + first answer only, human text dropped


TEMPLATES: dict[str, ChatTemplate] = {
    # LLaVA pretraining ("plain"): <image>{caption}\n, the caption and newline supervised
    "plain": ChatTemplate(name="plain", answer_end="\n", plain=True),
    # ChatML (SmolLM2, Qwen, ...); no default system block, to keep prompts short
    "chatml": ChatTemplate(
        name="chatml",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        answer_end="<|im_end|>",
        assistant_suffix="\n",
        generation_prompt="<|im_start|>assistant\n",
    ),
    # LLaVA-1.5 conv_vicuna_v1 (SeparatorStyle.TWO, sep=" ", sep2="</s>"): the system prompt and each
    # user message end with sep, each answer with sep2, and the next "USER:" follows sep2 directly
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1",
        system=(
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions."
        ),
        system_format="{system} ",
        user_format="USER: {content} ",
        assistant_prefix="ASSISTANT: ",
        answer_end="</s>",
        generation_prompt="ASSISTANT:",
        add_bos=True,
    ),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None


def _as_template(template: Union[ChatTemplate, str]) -> ChatTemplate:
    return get_template(template) if isinstance(template, str) else template


# ---------------------------------------------------------------------------------------------
# encoding


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except answer tokens
    sample_id: str
    pixel_values: Optional[torch.Tensor] = None  # (C, H, W), set by the dataset when the sample has an image


def _normalized_turns(sample: Sample) -> list[tuple[str, str]]:
    """(role, text) with roles mapped to human/gpt, checked to alternate from human, placeholders fixed up."""
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(sample.conversations):
        role = _ROLE_ALIASES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"sample {sample.id}: turn {i} is not a human/gpt turn with a string value: {turn!r}")
        expected = HUMAN if i % 2 == 0 else GPT
        if role != expected:
            raise ValueError(
                f"sample {sample.id}: turns must alternate human/gpt starting with human (turn {i} is {role})"
            )
        turns.append((role, turn["value"]))
    if not turns:
        raise ValueError(f"sample {sample.id}: empty conversation")

    if any(role == GPT and IMAGE_PLACEHOLDER in text for role, text in turns):
        raise ValueError(f"sample {sample.id}: the image placeholder must be in a human turn")
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if n_placeholders > 1:
        raise ValueError(
            f"sample {sample.id}: {n_placeholders} image placeholders; only single-image samples are supported"
        )
    if sample.has_image and n_placeholders == 0:
        turns[0] = (HUMAN, IMAGE_PLACEHOLDER + "\n" + turns[0][1])  # LLaVA convention
    elif not sample.has_image and n_placeholders == 1:
        turns = [(r, _strip_placeholder(t)) for r, t in turns]
    return turns


def _strip_placeholder(text: str) -> str:
    if IMAGE_PLACEHOLDER not in text:
        return text
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()


def _render(turns: list[tuple[str, str]], template: ChatTemplate, has_image: bool, for_generation: bool):
    """The full text and the character spans of the supervised answers in it."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def add(text: str, supervised: bool = False) -> None:
        nonlocal pos
        if supervised and text:
            spans.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text)

    if template.plain:
        # LLaVA preprocess_plain: the human turn is replaced by the bare image
        add(IMAGE_PLACEHOLDER if has_image else "")
        answers = [text for role, text in turns if role == GPT]
        if not for_generation and answers:
            add(answers[0] + template.answer_end, supervised=True)
        return "".join(parts), spans

    if template.system:
        add(template.system_format.format(system=template.system))
    if for_generation:
        while turns and turns[-1][0] == GPT:  # same as Sample.prompt_turns()
            turns = turns[:-1]
    for role, text in turns:
        if role == HUMAN:
            add(template.user_format.format(content=text))
        else:
            add(template.assistant_prefix)
            add(text + template.answer_end, supervised=True)
            add(template.assistant_suffix)
    if for_generation:
        add(template.generation_prompt)
    return "".join(parts), spans


def _tokenize_run(tokenizer, text: str, start: int, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of one text run (no image inside) and whether each token lies in an answer span.

    The run is tokenized as a whole (as the model will see it at generation time) and answer
    tokens are found from character offsets, so a tokenizer that merges a space into the next
    word (sentencepiece "▁word") still gets the right boundary. Slow tokenizers, which have no
    offsets, get the run tokenized piece by piece instead.
    """
    if not text:
        return [], []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        flags = [any(s < start + b and start + a < e for s, e in spans) for a, b in enc["offset_mapping"]]
        return list(enc["input_ids"]), flags
    cuts = sorted({0, len(text)} | {min(max(p - start, 0), len(text)) for span in spans for p in span})
    ids: list[int] = []
    flags = []
    for a, b in zip(cuts, cuts[1:]):
        if a == b:
            continue
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= start + a and start + b <= e for s, e in spans)
        ids += piece
        flags += [inside] * len(piece)
    return ids, flags


def encode_sample(
    sample: Sample,
    tokenizer,
    template: Union[ChatTemplate, str],
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: Optional[int] = None,
    for_generation: bool = False,
) -> Encoded:
    """Token ids and labels of one sample; the image placeholder becomes `num_image_tokens` ids."""
    template = _as_template(template)
    if sample.has_image and num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    turns = _normalized_turns(sample)
    text, spans = _render(turns, template, sample.has_image, for_generation)
    if for_generation:
        spans = []  # a prompt has nothing to learn: earlier answers are context, not targets

    ids: list[int] = []
    labels: list[int] = []
    if template.add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    image_end = 0  # index just past the image block (0: no image)
    start = 0
    runs = text.split(IMAGE_PLACEHOLDER)
    for k, run in enumerate(runs):
        run_ids, flags = _tokenize_run(tokenizer, run, start, spans)
        ids += run_ids
        labels += [i if f else IGNORE_INDEX for i, f in zip(run_ids, flags)]
        start += len(run) + len(IMAGE_PLACEHOLDER)
        if k < len(runs) - 1:
            ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            image_end = len(ids)
    if not ids:
        raise ValueError(f"sample {sample.id}: the encoding is empty")

    if max_length is not None and len(ids) > max_length:
        if for_generation:  # the prompt must end with the generation prompt: never cut it
            raise ValueError(f"sample {sample.id}: prompt has {len(ids)} tokens > max_length {max_length}")
        if image_end > max_length:
            raise ValueError(
                f"sample {sample.id}: the image block ends at token {image_end} > max_length {max_length} "
                f"(sequence has {len(ids)} tokens)"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if not for_generation and all(lab == IGNORE_INDEX for lab in labels):
        raise ValueError(f"sample {sample.id}: no supervised tokens left (length {len(ids)}, max_length {max_length})")
    return Encoded(input_ids=ids, labels=labels, sample_id=sample.id)


# ---------------------------------------------------------------------------------------------
# batching


class Collator:
    """Pads `Encoded` items into a batch; images are stacked separately with the row each belongs to."""

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: Optional[int] = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer, padding_side: str = "right") -> "Collator":
        """Pads with the tokenizer's pad token, else its EOS (SmolLM2 and Llama have no pad token)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return cls(pad, padding_side=padding_side)

    def __call__(self, items: list[Encoded]) -> dict[str, Union[torch.Tensor, list]]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(len(it.input_ids) for it in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(items)
        input_ids = torch.full((B, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, length), dtype=torch.long)
        for row, it in enumerate(items):
            if len(it.labels) != len(it.input_ids):
                raise ValueError(f"sample {it.sample_id}: {len(it.input_ids)} ids but {len(it.labels)} labels")
            n = len(it.input_ids)
            cols = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(it.input_ids, dtype=torch.long)
            labels[row, cols] = torch.tensor(it.labels, dtype=torch.long)
            attention_mask[row, cols] = 1

        batch: dict[str, Union[torch.Tensor, list]] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sample_ids": [it.sample_id for it in items],
        }
        rows = [row for row, it in enumerate(items) if it.pixel_values is not None]
        if rows:
            shapes = {tuple(items[r].pixel_values.shape) for r in rows}
            if len(shapes) > 1:
                raise ValueError(f"images in a batch must share one shape, got {sorted(shapes)}")
            batch["pixel_values"] = torch.stack([items[r].pixel_values for r in rows])
        batch["image_rows"] = torch.tensor(rows, dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------
# datasets


class SupervisedDataset(torch.utils.data.Dataset):
    """Samples encoded on access; the image is loaded and processed only when a processor is given.

    Encoding errors (e.g. nothing supervised left after truncation) propagate as ValueError so the
    caller decides whether to skip the sample.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer,
        template: Union[ChatTemplate, str],
        *,
        image_token_id: int,
        num_image_tokens: int,
        image_processor: Optional[Callable[[Image.Image], torch.Tensor]] = None,
        max_length: Optional[int] = None,
        for_generation: bool = False,
    ):
        self.samples = samples
        self.tokenizer = tokenizer
        self.template = _as_template(template)
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.image_processor = image_processor
        self.max_length = max_length
        self.for_generation = for_generation

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        sample = self.samples[index]
        enc = encode_sample(
            sample,
            self.tokenizer,
            self.template,
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
            max_length=self.max_length,
            for_generation=self.for_generation,
        )
        if self.image_processor is not None and sample.has_image:
            pixels = self.image_processor(sample.load_image())
            if not isinstance(pixels, torch.Tensor) or pixels.ndim != 3:
                raise ValueError(f"sample {sample.id}: image_processor must return a (C, H, W) tensor")
            enc.pixel_values = pixels
        return enc


def _record_to_sample(record, image_folder: Optional[Path], where: str) -> Sample:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    if "id" not in record:
        raise ValueError(f"{where}: missing 'id'")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    for j, turn in enumerate(convs):
        role = _ROLE_ALIASES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {j} needs 'from' in {sorted(_ROLE_ALIASES)} and a string 'value'")
        turns.append({"from": role, "value": turn["value"]})
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise ValueError(f"{where}: 'image' must be a relative path string")
        image = str(image_folder / image) if image_folder is not None else image
    answers = [t["value"] for t in turns if t["from"] == GPT]
    return Sample(
        id=str(record["id"]),
        conversations=tuple(turns),
        image=image,
        answer=answers[-1] if answers else None,
    )


def load_llava_json(
    path: Union[str, Path], image_folder: Union[str, Path, None] = None, limit: Optional[int] = None
) -> list[Sample]:
    """LLaVA-format records (558K pretrain / 665K mix layouts) from a .json list or a .jsonl file.

    Image paths are only resolved against `image_folder`, never opened here (558K images are many).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file not found: {path}")
    folder = Path(image_folder) if image_folder is not None else None
    samples: list[Sample] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            index = 0
            for line in f:
                if limit is not None and len(samples) >= limit:
                    break
                if not line.strip():
                    continue
                where = f"{path} record {index}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e})") from e
                samples.append(_record_to_sample(record, folder, where))
                index += 1
        return samples
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if limit is not None:
        records = records[:limit]
    return [_record_to_sample(r, folder, f"{path} record {i}") for i, r in enumerate(records)]


_EASY_VQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})
_EASY_VQA_INSTRUCTION = "Answer the question using a single word or phrase."


def _easy_vqa_family(answer: str) -> str:
    if answer in ("yes", "no"):
        return "existence"
    return "shape" if answer in _EASY_VQA_SHAPES else "color"


def _answer_balanced(questions: Sequence[str], answers: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """The indices of a seeded subset in which every question text has each of its answers equally often
    (as often as its rarest one): "is a red shape present?" is "no" for 7 images in 8, so a model can
    score well on the raw split without looking; on this subset the text alone says nothing."""
    groups: dict[str, dict[str, list[int]]] = {}
    for i, (q, a) in enumerate(zip(questions, answers)):
        groups.setdefault(q, {}).setdefault(a, []).append(i)
    kept = []
    for by_answer in groups.values():
        if len(by_answer) < 2:
            continue  # one answer only: the text gives it away
        k = min(map(len, by_answer.values()))
        for ids in by_answer.values():
            kept.extend(rng.permutation(ids)[:k])
    return np.sort(np.array(kept, dtype=int))


def easy_vqa_samples(
    split: str = "train",
    limit: Optional[int] = None,
    seed: int = 0,
    per_family: Optional[int] = None,
    balance_answers: bool = False,
) -> list[Sample]:
    """easy-VQA (64x64 shapes) as single-word-answer samples; `limit` draws a seeded subset in original order.
    `per_family` draws that many of each question family (existence, shape, colour) instead: the split is
    mostly existence questions (colour about a tenth), which a short training otherwise barely sees.
    `balance_answers` first narrows the split to questions whose text does not predict the answer
    (`_answer_balanced`): without it a model learns existence questions' priors instead of looking."""
    import easy_vqa  # imported here: it reads its question files at import

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy_vqa split must be 'train' or 'test', got {split!r}")
    candidates = tuple(sorted(easy_vqa.get_answers()))

    indices = np.arange(len(questions))
    if balance_answers:
        indices = _answer_balanced(questions, answers, np.random.default_rng(seed))
    if per_family is not None:
        if limit is not None:
            raise ValueError("easy_vqa: give limit or per_family, not both")
        rng = np.random.default_rng(seed)
        families = np.array([_easy_vqa_family(answers[i]) for i in indices])
        picked = [rng.permutation(indices[families == f])[:per_family] for f in sorted(set(families))]
        indices = np.sort(np.concatenate(picked))
    elif limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if limit < len(indices):
            indices = np.sort(np.random.default_rng(seed).choice(indices, size=limit, replace=False))
    return [
        Sample(
            id=f"easyvqa-{split}-{i}",
            conversations=(
                {"from": HUMAN, "value": f"{IMAGE_PLACEHOLDER}\n{questions[i]}\n{_EASY_VQA_INSTRUCTION}"},
                {"from": GPT, "value": answers[i]},
            ),
            image=str(paths[image_ids[i]]),
            answer=answers[i],
            candidates=candidates,
            family=_easy_vqa_family(answers[i]),
            meta={"image_id": int(image_ids[i])},
        )
        for i in (int(j) for j in indices)
    ]
