"""Procedural visual probes: synthetic questions whose evidence sits in known image-grid tokens.

Every probe is rendered with PIL from an integer seed (nothing is stored) and comes back as a
`Sample` in LLaVA conversation format, with a closed answer vocabulary and the row-major indices of
the grid tokens that hold the evidence. That gives an oracle pruner (keep exactly `evidence`) and an
evidence-recall metric for any token schedule.

Families, from robust to fragile (FAMILIES keeps this order):
    background  what colour is the background?           evidence: cells no object touches
    attribute   what colour is the <shape>?              the one object of that shape
    existence   is there a <colour> <shape>? yes/no      yes: that object; no: every object
    counting    how many <shape>s are there?             every object of that shape
    spatial     is the <c1> <s1> left of/above the <c2> <s2>? yes/no     both objects
    text        what letter is written?                  the letter's ink box

Seeds: make_probe(family, seed) mixes family and seed into a private random.Random (string seeds are
hashed with SHA-512, so streams are stable across runs and machines). probe_suite draws split
"train" from seeds [seed, seed + per_family) and split "test" from 1_000_000 + that range; ranges
may not cross SPLIT_SPAN, so the two splits never share an image. Yes/no answers follow seed parity
(even seed: "yes"), so any run of consecutive seeds is balanced exactly.

Boxes are (x0, y0, x1, y1) in pixels, half-open: a box covers x0 <= x < x1, y0 <= y < y1.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, model_validator

from hidrop.sample import GPT, HUMAN, IMAGE_PLACEHOLDER, Sample

FAMILIES: tuple[str, ...] = ("background", "attribute", "existence", "counting", "spatial", "text")
INSTRUCTION = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt

# Names are common single-token English words with distinct first tokens, so scoring by the first
# generated token is unambiguous. RGBs are at least ~100 apart, so no colour hides on another.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "yellow": (250, 225, 30),
    "orange": (245, 120, 0),
    "purple": (140, 40, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
YES_NO: tuple[str, ...] = ("yes", "no")
LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz")

MIN_OVERLAP = 0.1  # a cell is evidence when an evidence box covers >= 10% of its area
SPLIT_BASE = {"train": 0, "test": 1_000_000}
SPLIT_SPAN = 1_000_000  # seeds per split; a suite's seed range must stay inside its split
GAP = 4  # px kept free between objects, so they never touch and each box holds one object
_TRIES = 200  # rejection-sampling attempts per object before it is dropped

Box = tuple[int, int, int, int]
# what a family builder returns: question, answer, candidates, indices of evidence objects, extra meta
Built = tuple[str, str, tuple[str, ...], tuple[int, ...], dict]


class ProbeConfig(BaseModel):
    """Difficulty knobs. Defaults: 224 px canvas seen as 14 x 14 tokens (16 px cells, ViT-B/16), with
    objects of 12-28 px so a target covers only 1-4 cells. LLaVA-1.5 would be canvas=336, grid=24."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    canvas: int = 224  # square image side, px
    grid: int = 14  # tokens per side
    min_size: int = 12  # object bounding-box side, px
    max_size: int = 28
    distractors: int = 4  # extra objects besides the ones the question is about
    font_size: int = 20  # text family: letter size, px (cap height is ~0.7 of it)
    count_min: int = 1  # counting family: answer range, inclusive
    count_max: int = 6

    @model_validator(mode="after")
    def _check(self) -> ProbeConfig:
        if self.grid < 1 or self.canvas < self.grid or self.canvas % self.grid:
            raise ValueError(f"canvas ({self.canvas}) must be a positive multiple of grid ({self.grid})")
        if not 4 <= self.min_size <= self.max_size <= self.canvas // 4:
            raise ValueError(f"need 4 <= min_size <= max_size <= canvas/4, got {self.min_size}, {self.max_size}")
        if not 0 <= self.distractors <= 16:
            raise ValueError(f"distractors must be in 0..16, got {self.distractors}")
        if not 0 <= self.count_min <= self.count_max <= 9:
            raise ValueError(f"need 0 <= count_min <= count_max <= 9, got {self.count_min}, {self.count_max}")
        if not 8 <= self.font_size <= self.canvas // 2:
            raise ValueError(f"font_size must be in 8..canvas/2, got {self.font_size}")
        # the busiest scene (counting, or the 2 + distractors of existence/spatial) must fill at most a
        # third of the canvas, or rejection sampling stalls
        busiest = max(self.count_max, 2) + self.distractors
        if busiest * (self.max_size + GAP) ** 2 > self.canvas**2 / 3:
            raise ValueError(f"{busiest} objects of {self.max_size} px do not fit a {self.canvas} px canvas")
        return self


# ---- evidence ----------------------------------------------------------------------------------
def _cell_overlaps(box: Box, canvas: int, grid: int) -> dict[int, int]:
    """Pixel area of `box` inside each grid cell it touches."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= canvas and 0 <= y0 < y1 <= canvas):
        raise ValueError(f"box {box} is empty or leaves the {canvas} px canvas")
    s = canvas // grid
    areas = {}
    for r in range(y0 // s, (y1 - 1) // s + 1):
        h = min(y1, (r + 1) * s) - max(y0, r * s)
        for c in range(x0 // s, (x1 - 1) // s + 1):
            areas[r * grid + c] = h * (min(x1, (c + 1) * s) - max(x0, c * s))
    return areas


def evidence_cells(boxes: Sequence[Box], canvas: int, grid: int, min_overlap: float = MIN_OVERLAP) -> tuple[int, ...]:
    """Sorted row-major cells that some box covers by >= min_overlap of the cell area (0: any overlap).

    Each box counts on its own. A box too small to pass the threshold anywhere (a thin letter) still
    gets its largest-overlap cell(s), so no evidence object is ever invisible to an oracle pruner.
    """
    if canvas % grid:
        raise ValueError(f"canvas ({canvas}) must be a multiple of grid ({grid})")
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    need = min_overlap * (canvas // grid) ** 2
    cells: set[int] = set()
    for box in boxes:
        areas = _cell_overlaps(box, canvas, grid)
        passed = {c for c, a in areas.items() if a >= need}
        cells |= passed or {c for c, a in areas.items() if a == max(areas.values())}
    return tuple(sorted(cells))


# ---- scenes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thing:
    """One drawn object: a filled shape, or a letter ("text") whose box is its ink box."""

    shape: str
    color: str
    box: Box
    letter: str = ""


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=None)
def _glyph(letter: str, size: int) -> Box:
    """Tight ink box of `letter` drawn at the origin. font.getbbox includes the side bearings and
    advance, which would pad the evidence with blank cells, so rasterize once and measure."""
    font = _font(size)
    pad = size  # room for ink left of or above the origin
    im = Image.new("L", (3 * size + 2 * pad, 3 * size + 2 * pad), 0)
    ImageDraw.Draw(im).text((pad, pad), letter, fill=255, font=font)
    x0, y0, x1, y1 = im.getbbox()
    return (x0 - pad, y0 - pad, x1 - pad, y1 - pad)


def render(canvas: int, background: str, things: tuple[Thing, ...], font_size: int) -> Image.Image:
    """Draw a scene. Pure function of its arguments (what a probe's `image` callable wraps)."""
    im = Image.new("RGB", (canvas, canvas), COLORS[background])
    draw = ImageDraw.Draw(im)
    for t in things:
        x0, y0, x1, y1 = t.box
        rgb = COLORS[t.color]
        if t.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)  # PIL corners are inclusive
        elif t.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
        elif t.shape == "triangle":
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=rgb)
        elif t.shape == "text":
            left, top, _, _ = _glyph(t.letter, font_size)
            draw.text((x0 - left, y0 - top), t.letter, fill=rgb, font=_font(font_size))  # ink box lands on t.box
        else:
            raise ValueError(f"unknown shape {t.shape!r}")
    return im


class _Scene:
    """Rejection-sampled layout: boxes kept GAP px apart, each inside the canvas."""

    def __init__(self, rng: random.Random, config: ProbeConfig, background: str):
        self.rng, self.config, self.background = rng, config, background
        self.things: list[Thing] = []

    def free(self, box: Box) -> bool:
        return all(
            box[0] >= t.box[2] + GAP or t.box[0] >= box[2] + GAP or box[1] >= t.box[3] + GAP or t.box[1] >= box[3] + GAP
            for t in self.things
        )

    def random_box(self, w: Optional[int] = None, h: Optional[int] = None) -> Box:
        cfg, rng = self.config, self.rng
        w = w or rng.randint(cfg.min_size, cfg.max_size)
        h = h or w
        x, y = rng.randint(0, cfg.canvas - w), rng.randint(0, cfg.canvas - h)
        return (x, y, x + w, y + h)

    def add(self, shape: str, color: str, letter: str = "", size: Optional[tuple[int, int]] = None) -> Optional[int]:
        """Place one object; its index in `things`, or None when no free spot turned up (dropped)."""
        for _ in range(_TRIES):
            box = self.random_box(*(size or (None, None)))
            if self.free(box):
                self.things.append(Thing(shape, color, box, letter))
                return len(self.things) - 1
        return None

    def must_add(self, shape: str, color: str, letter: str = "", size: Optional[tuple[int, int]] = None) -> int:
        # question objects are placed before distractors, on a canvas ProbeConfig keeps sparse
        i = self.add(shape, color, letter, size)
        if i is None:
            raise RuntimeError(f"could not place the {color} {shape}; the config is too crowded")
        return i

    def colors(self) -> list[str]:
        return [c for c in COLORS if c != self.background]  # objects never match the background

    def distract(self, n: int, allowed: Callable[[str, str], bool]) -> int:
        """Up to n distractors whose (colour, shape) satisfies `allowed`; how many were placed."""
        pairs = [(c, s) for c in self.colors() for s in SHAPES if allowed(c, s)]
        placed = 0
        for _ in range(n):
            color, shape = self.rng.choice(pairs)
            placed += self.add(shape, color) is not None
        return placed


# ---- families ----------------------------------------------------------------------------------
def _background(sc: _Scene, seed: int) -> Built:
    sc.distract(sc.config.distractors, lambda c, s: True)
    return "What color is the background?", sc.background, tuple(COLORS), (), {}


def _attribute(sc: _Scene, seed: int) -> Built:
    shape, color = sc.rng.choice(SHAPES), sc.rng.choice(sc.colors())
    target = sc.must_add(shape, color)
    sc.distract(sc.config.distractors, lambda c, s: s != shape)  # the target is its shape's only one
    return f"What color is the {shape}?", color, tuple(COLORS), (target,), {"query": {"shape": shape}}


def _existence(sc: _Scene, seed: int) -> Built:
    rng, n = sc.rng, sc.config.distractors
    shape, color = rng.choice(SHAPES), rng.choice(sc.colors())
    yes = seed % 2 == 0
    if yes:
        sc.must_add(shape, color)

    # near misses (same colour other shape, same shape other colour) force binding colour to shape;
    # both answers draw distractors + 2 objects, so the object count does not leak the answer
    def other(c, s):
        return (c, s) != (color, shape)

    sc.distract(1, lambda c, s: c == color and s != shape)
    sc.distract(1, lambda c, s: s == shape and c != color)
    sc.distract(n - 1 if yes else n + 1, other)
    # "no" can only be seen by checking every object, so then all of them are evidence
    targets = [i for i, t in enumerate(sc.things) if (t.color, t.shape) == (color, shape) or not yes]
    article = "an" if color[0] in "aeiou" else "a"
    return (
        f"Is there {article} {color} {shape}?",
        "yes" if yes else "no",
        YES_NO,
        tuple(targets),
        {"query": {"shape": shape, "color": color}},
    )


def _counting(sc: _Scene, seed: int) -> Built:
    cfg, rng = sc.config, sc.rng
    shape, count = rng.choice(SHAPES), rng.randint(cfg.count_min, cfg.count_max)
    targets = tuple(sc.must_add(shape, rng.choice(sc.colors())) for _ in range(count))
    sc.distract(cfg.distractors, lambda c, s: s != shape)
    candidates = tuple(str(k) for k in range(cfg.count_min, cfg.count_max + 1))
    return f"How many {PLURALS[shape]} are there?", str(count), candidates, targets, {"query": {"shape": shape}}


def _spatial(sc: _Scene, seed: int) -> Built:
    rng = sc.rng
    s1, s2 = rng.sample(SHAPES, 2)
    c1, c2 = rng.choice(sc.colors()), rng.choice(sc.colors())
    relation = rng.choice(("left of", "above"))
    yes = seed % 2 == 0
    axis = 0 if relation == "left of" else 1  # x for "left of", y for "above"
    for _ in range(_TRIES):
        a, b = sc.random_box(), sc.random_box()
        first, second = (a, b) if yes else (b, a)
        # strict separation along the axis, so the answer is unambiguous whatever the other axis does
        if first[axis + 2] + GAP <= second[axis]:
            break
    else:
        raise RuntimeError("could not lay out the spatial pair; the config is too crowded")
    sc.things += [Thing(s1, c1, a), Thing(s2, c2, b)]
    sc.distract(sc.config.distractors, lambda c, s: (c, s) not in ((c1, s1), (c2, s2)))  # keep references unique
    question = f"Is the {c1} {s1} {relation} the {c2} {s2}?"
    return (
        question,
        "yes" if yes else "no",
        YES_NO,
        (0, 1),
        {"query": {"first": [c1, s1], "second": [c2, s2], "relation": relation}},
    )


def _text(sc: _Scene, seed: int) -> Built:
    letter, color = sc.rng.choice(LETTERS).upper(), sc.rng.choice(sc.colors())
    left, top, right, bottom = _glyph(letter, sc.config.font_size)
    target = sc.must_add("text", color, letter, size=(right - left, bottom - top))
    sc.distract(sc.config.distractors, lambda c, s: True)
    return "What letter is written in the image?", letter.lower(), LETTERS, (target,), {}


_BUILDERS: dict[str, Callable[[_Scene, int], Built]] = {
    "background": _background,
    "attribute": _attribute,
    "existence": _existence,
    "counting": _counting,
    "spatial": _spatial,
    "text": _text,
}


# ---- public API --------------------------------------------------------------------------------
def make_probe(family: str, seed: int, config: ProbeConfig = ProbeConfig()) -> Sample:
    """One probe of `family`, a pure function of (family, seed, config)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown probe family {family!r}; expected one of {FAMILIES}")
    rng = random.Random(f"hidrop.probes/{family}/{seed}")  # private stream: never the global state
    sc = _Scene(rng, config, background=rng.choice(tuple(COLORS)))
    question, answer, candidates, targets, extra = _BUILDERS[family](sc, seed)
    things = tuple(sc.things)
    boxes = [things[i].box for i in targets]
    if family == "background":  # the background is read off the cells that no object touches at all
        touched = set(evidence_cells([t.box for t in things], config.canvas, config.grid, min_overlap=0.0))
        evidence = tuple(c for c in range(config.grid**2) if c not in touched)
    else:
        evidence = evidence_cells(boxes, config.canvas, config.grid)
    meta = {
        "seed": seed,
        "config": config.model_dump(),
        "background": sc.background,
        "objects": [{"shape": t.shape, "color": t.color, "box": t.box, "letter": t.letter} for t in things],
        "targets": targets,  # indices into objects whose boxes define the evidence
        "evidence_boxes": boxes,
        **extra,
    }
    return Sample(
        id=f"{family}-{seed}",
        conversations=(
            {"from": HUMAN, "value": f"{IMAGE_PLACEHOLDER}\n{question}\n{INSTRUCTION}"},
            {"from": GPT, "value": answer},
        ),
        image=functools.partial(render, config.canvas, sc.background, things, config.font_size),
        answer=answer,
        candidates=candidates,
        family=family,
        evidence=evidence,
        meta=meta,
    )


def probe_suite(
    split: str = "test",
    per_family: int = 50,
    families: Sequence[str] = FAMILIES,
    config: ProbeConfig = ProbeConfig(),
    seed: int = 0,
) -> list[Sample]:
    """per_family probes of each family (family-major), seeds SPLIT_BASE[split] + seed + [0, per_family)."""
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_BASE)}")
    unknown = [f for f in families if f not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown probe families {unknown}; expected a subset of {FAMILIES}")
    if per_family < 0 or seed < 0 or seed + per_family > SPLIT_SPAN:
        raise ValueError(
            f"need per_family >= 0, seed >= 0 and seed + per_family <= {SPLIT_SPAN} (keeps splits disjoint)"
        )
    base = SPLIT_BASE[split] + seed
    return [make_probe(f, base + i, config) for f in families for i in range(per_family)]
