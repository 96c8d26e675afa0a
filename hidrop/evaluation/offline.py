"""Benchmarks that run with no download: easy-vqa (real images) and the procedural probe suite."""

from __future__ import annotations

from typing import Optional, Sequence

from hidrop.evaluation.registry import Benchmark, register
from hidrop.sample import Sample


@register("easy_vqa")
class EasyVQA(Benchmark):
    """easy-vqa test split (or train): one coloured shape per 64x64 image, 13 answers, exact match."""

    description = "easy-vqa: colour / shape / yes-no questions about one shape (real images)"

    def __init__(self, limit: Optional[int] = 500, seed: int = 0, split: str = "test"):
        super().__init__(limit=limit, seed=seed, split=split)
        self.split = split

    def load(self) -> list[Sample]:
        from hidrop.data import easy_vqa_samples

        return easy_vqa_samples(self.split, limit=self.limit, seed=self.seed)


@register("probes")
class Probes(Benchmark):
    """The procedural probe suite: graded families, evidence tokens per question (oracle + recall).

    `grid` and `canvas` are set by the harness from the model's token grid, so the evidence indexes the
    tokens the model really sees.
    """

    description = "procedural probes: background, attribute, existence, counting, spatial, text"
    diagnostic = True  # per-family scores and evidence recall; not in the default relative score

    def __init__(
        self,
        limit: Optional[int] = 40,  # per family
        seed: int = 0,
        split: str = "test",
        families: Optional[Sequence[str]] = None,
        grid: int = 14,
        **knobs,
    ):
        super().__init__(limit=limit, seed=seed, split=split, families=families, grid=grid, **knobs)
        self.split, self.families, self.grid, self.knobs = split, families, grid, knobs

    def for_grid(self, grid: int) -> "Probes":
        if grid == self.grid:
            return self
        return Probes(self.limit, self.seed, self.split, self.families, grid, **self.knobs)

    def load(self) -> list[Sample]:
        from hidrop.probes import FAMILIES, ProbeConfig, probe_suite

        knobs = dict(self.knobs)
        # 16 px cells unless the caller chose otherwise; on a grid other than 14 x 14 the default sizes
        # shrink or grow with the canvas so objects still cover the same share of the image
        knobs.setdefault("canvas", self.grid * 16)
        scale = knobs["canvas"] / ProbeConfig().canvas
        if scale != 1:
            base = ProbeConfig()
            knobs.setdefault("min_size", max(4, round(base.min_size * scale)))
            knobs.setdefault("max_size", max(knobs["min_size"], round(base.max_size * scale)))
            knobs.setdefault("font_size", max(8, round(base.font_size * scale)))
            knobs.setdefault("distractors", min(base.distractors, round(base.distractors * scale * scale)))
        config = ProbeConfig(grid=self.grid, **knobs)
        return probe_suite(
            self.split,
            per_family=self.limit or 40,
            families=tuple(self.families or FAMILIES),
            config=config,
            seed=self.seed,
        )
