"""One image-question record, the unit every dataset, benchmark and collator exchanges.

It is the LLaVA conversation format (the JSON of LLaVA-Pretrain-558K / LLaVA-v1.5-665K) plus what
evaluation needs: the reference answer, a closed answer vocabulary, a question family and, for the
procedural probes, which image-grid tokens hold the evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"

ImageSource = Union[str, Path, Image.Image, Callable[[], Image.Image], None]


@dataclass(frozen=True)
class Sample:
    id: str
    # LLaVA turns: {"from": "human" | "gpt", "value": str}; "<image>" marks the image (first human turn)
    conversations: tuple[dict, ...]
    image: ImageSource = None  # a path, a PIL image, or a zero-argument callable that renders it
    answer: Optional[str] = None  # reference answer to the last human question (evaluation)
    candidates: Optional[tuple[str, ...]] = None  # closed answer vocabulary, when the benchmark has one
    family: str = ""  # question family / benchmark category
    evidence: Optional[tuple[int, ...]] = None  # row-major indices into the image's token grid
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def load_image(self) -> Optional[Image.Image]:
        """The image as RGB, or None for a text-only sample."""
        src = self.image
        if src is None:
            return None
        if callable(src) and not isinstance(src, Image.Image):
            src = src()
        if isinstance(src, (str, Path)):
            with Image.open(src) as im:
                return im.convert("RGB")
        return src.convert("RGB")

    def question(self) -> str:
        """The last human turn without the image placeholder (for display and matching)."""
        human = [t["value"] for t in self.conversations if t["from"] == HUMAN]
        return human[-1].replace(IMAGE_PLACEHOLDER, "").strip() if human else ""

    def prompt_turns(self) -> tuple[dict, ...]:
        """The conversation up to and including the last human turn (what the model sees at evaluation)."""
        turns = list(self.conversations)
        while turns and turns[-1]["from"] == GPT:
            turns.pop()
        return tuple(turns)
