"""The procedural probes: determinism, splits, answer vocabularies, and evidence checked from pixels.

The pixel checks re-derive everything a question depends on from the rendered image (colours, shapes by
fill ratio, extents, glyphs), using meta only for where each object's box is; a separate test first
proves those boxes are faithful (every non-background pixel sits in exactly one box of one colour).
"""

import pickle
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from hidrop.probes import (
    COLORS,
    FAMILIES,
    GAP,
    INSTRUCTION,
    MIN_OVERLAP,
    SPLIT_SPAN,
    ProbeConfig,
    evidence_cells,
    make_probe,
    probe_suite,
)
from hidrop.sample import Sample

SEEDS = range(40)


def pixels(s: Sample) -> np.ndarray:
    return np.asarray(s.load_image()).astype(int)


def ink(img: np.ndarray, bg: str) -> np.ndarray:
    """(H, W) bool: pixels that are not the background colour."""
    return (img != np.array(COLORS[bg])).any(-1)


def box_mask(box, canvas: int) -> np.ndarray:
    m = np.zeros((canvas, canvas), bool)
    m[box[1] : box[3], box[0] : box[2]] = True
    return m


def per_cell(mask: np.ndarray, grid: int) -> np.ndarray:
    """Pixel count of `mask` in each grid cell, row-major (grid * grid,)."""
    s = mask.shape[0] // grid
    return mask.reshape(grid, s, grid, s).sum((1, 3)).ravel()


def brute_evidence(boxes, canvas: int, grid: int, frac: float = MIN_OVERLAP) -> set[int]:
    """The evidence rule recomputed by counting pixels: per box, cells covered >= frac, else its fullest cells."""
    cells: set[int] = set()
    for box in boxes:
        counts = per_cell(box_mask(box, canvas), grid)
        passed = set(np.flatnonzero((counts >= frac * (canvas // grid) ** 2) & (counts > 0)).tolist())
        cells |= passed or set(np.flatnonzero(counts == counts.max()).tolist())
    return cells


def color_name(img: np.ndarray, box, bg: str) -> str:
    """The single non-background colour inside a shape's box."""
    x0, y0, x1, y1 = box
    patch = img[y0:y1, x0:x1]
    cols = {tuple(p) for p in patch[ink(patch, bg)].tolist()}
    assert len(cols) == 1, f"box {box} holds colours {cols}"
    (col,) = cols
    return next(n for n, rgb in COLORS.items() if tuple(rgb) == col)


def shape_name(img: np.ndarray, box, bg: str) -> str:
    """Shape from the fill ratio of its box: square 1.0, circle ~0.78, triangle ~0.52."""
    x0, y0, x1, y1 = box
    fill = ink(img[y0:y1, x0:x1], bg).mean()
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"


def objects(s: Sample, img: np.ndarray) -> list[tuple[str, str, tuple]]:
    """(colour, shape) of every drawn shape, read from pixels; letters are skipped."""
    bg = s.meta["background"]
    return [
        (color_name(img, o["box"], bg), shape_name(img, o["box"], bg), o["box"])
        for o in s.meta["objects"]
        if o["shape"] != "text"
    ]


# ---- determinism, splits, format ---------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_probe(family):
    a, b = make_probe(family, 7), make_probe(family, 7)
    assert np.array_equal(pixels(a), pixels(b))
    assert (a.answer, a.evidence, a.conversations, a.meta) == (b.answer, b.evidence, b.conversations, b.meta)
    # the probe pickles (image is a partial of a module-level function) and renders the same after
    c = pickle.loads(pickle.dumps(a))
    assert np.array_equal(pixels(a), pixels(c)) and c.evidence == a.evidence
    # different seeds give different images
    assert len({pixels(make_probe(family, s)).tobytes() for s in range(10)}) == 10


def test_suite_is_deterministic_and_splits_are_disjoint():
    train, test = probe_suite("train", per_family=20), probe_suite("test", per_family=20)
    assert [s.id for s in train] == [s.id for s in probe_suite("train", per_family=20)]
    assert [s.answer for s in test] == [s.answer for s in probe_suite("test", per_family=20)]
    assert len(train) == len(test) == 20 * len(FAMILIES)
    assert [s.family for s in train[::20]] == list(FAMILIES)  # family-major, in FAMILIES order

    def seeds(ss):
        return {s.meta["seed"] for s in ss}

    assert not seeds(train) & seeds(test)
    assert not {s.id for s in train} & {s.id for s in test}
    # pixels differ too, not only the bookkeeping
    assert not {pixels(s).tobytes() for s in train[:20]} & {pixels(s).tobytes() for s in test[:20]}
    # each family has its own random stream: same seeds, unrelated scenes
    backgrounds = {tuple(s.meta["background"] for s in train[i : i + 20]) for i in range(0, len(train), 20)}
    assert len(backgrounds) == len(FAMILIES)
    # `seed` shifts the range within the split
    shifted = probe_suite("test", per_family=5, families=("text",), seed=3)
    assert [s.meta["seed"] for s in shifted] == [s.meta["seed"] for s in test[-17:-12]]


def test_suite_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        probe_suite("val")
    with pytest.raises(ValueError, match="famil"):
        probe_suite(families=("colour",))
    with pytest.raises(ValueError, match="famil"):
        make_probe("ocr", 0)
    with pytest.raises(ValueError, match="disjoint"):
        probe_suite("train", per_family=10, seed=SPLIT_SPAN - 5)  # would run into the test seeds


@pytest.mark.parametrize("family", FAMILIES)
def test_format_and_vocabulary(family):
    answers = set()
    for seed in range(60):
        s = make_probe(family, seed)
        human, gpt = s.conversations
        assert human["from"] == "human" and gpt["from"] == "gpt" and gpt["value"] == s.answer
        assert human["value"].startswith("<image>\n") and human["value"].endswith("\n" + INSTRUCTION)
        assert s.question().endswith("?\n" + INSTRUCTION) and s.id == f"{family}-{seed}" and s.family == family
        assert isinstance(s.candidates, tuple) and s.answer in s.candidates
        assert len(set(s.candidates)) == len(s.candidates)
        assert all(c == c.lower() and c.isalnum() for c in s.candidates)
        assert s.evidence and s.evidence == tuple(sorted(set(s.evidence)))
        assert all(0 <= c < 14 * 14 for c in s.evidence)
        answers.add(s.answer)
    assert len(answers) >= min(4, len(s.candidates))  # answers actually vary over the vocabulary


@pytest.mark.parametrize("family", ["existence", "spatial"])
def test_yes_no_balanced(family):
    yes = sum(make_probe(family, seed).answer == "yes" for seed in range(100))
    assert 40 <= yes <= 60


def test_palette_contrasts():
    rgb = np.array(list(COLORS.values()), float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert dist[~np.eye(len(rgb), dtype=bool)].min() >= 100


# ---- the image matches meta --------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_meta_boxes_are_faithful(family):
    for seed in SEEDS:
        s = make_probe(family, seed)
        img, bg, canvas = pixels(s), s.meta["background"], s.meta["config"]["canvas"]
        assert img.shape == (canvas, canvas, 3)
        drawn = ink(img, bg)
        boxes = [o["box"] for o in s.meta["objects"]]
        inside = np.zeros_like(drawn)
        for o in s.meta["objects"]:
            assert o["color"] != bg
            m = box_mask(o["box"], canvas)
            assert (drawn & m).any(), f"{s.id}: nothing drawn in {o}"
            inside |= m
            if o["shape"] != "text":  # letters are anti-aliased; shapes are flat
                assert (color_name(img, o["box"], bg), shape_name(img, o["box"], bg)) == (o["color"], o["shape"])
        assert not (drawn & ~inside).any(), f"{s.id}: ink outside every box"
        for i, a in enumerate(boxes):  # boxes keep GAP px apart, so each holds one object
            for b in boxes[i + 1 :]:
                assert a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


# ---- answers and evidence from pixels ----------------------------------------------------------
def relevant_boxes(s: Sample, img: np.ndarray) -> list[tuple]:
    """Check the answer from pixels and return the boxes the question is about."""
    q, objs = s.question(), objects(s, img)
    if s.family == "attribute":
        shape = re.match(r"What color is the (\w+)\?", q).group(1)
        hits = [o for o in objs if o[1] == shape]
        assert len(hits) == 1 and hits[0][0] == s.answer
        return [hits[0][2]]
    if s.family == "existence":
        color, shape = re.match(r"Is there an? (\w+) (\w+)\?", q).groups()
        hits = [o[2] for o in objs if o[:2] == (color, shape)]
        assert s.answer == ("yes" if hits else "no")
        assert any(o[0] == color and o[1] != shape for o in objs) and any(o[1] == shape and o[0] != color for o in objs)
        return hits or [o[2] for o in objs]  # "no" needs every object checked
    if s.family == "counting":
        shape = re.match(r"How many (\w+)s are there\?", q).group(1)
        hits = [o[2] for o in objs if o[1] == shape]
        assert str(len(hits)) == s.answer
        return hits
    if s.family == "spatial":
        c1, s1, rel, c2, s2 = re.match(r"Is the (\w+) (\w+) (left of|above) the (\w+) (\w+)\?", q).groups()
        (a,) = [o[2] for o in objs if o[:2] == (c1, s1)]
        (b,) = [o[2] for o in objs if o[:2] == (c2, s2)]
        ys_a, xs_a = np.nonzero(ink(img, s.meta["background"]) & box_mask(a, img.shape[0]))
        ys_b, xs_b = np.nonzero(ink(img, s.meta["background"]) & box_mask(b, img.shape[0]))
        pa, pb = (xs_a, xs_b) if rel == "left of" else (ys_a, ys_b)
        assert pa.max() < pb.min() or pb.max() < pa.min()  # never ambiguous
        assert s.answer == ("yes" if pa.max() < pb.min() else "no")
        return [a, b]
    if s.family == "text":
        (obj,) = [o for o in s.meta["objects"] if o["shape"] == "text"]
        x0, y0, x1, y1 = obj["box"]
        alpha = glyph_alpha(s.answer.upper(), s.meta["config"]["font_size"])
        assert alpha.shape == (y1 - y0, x1 - x0)
        # the crop is the answer's glyph alpha-blended in the letter's colour over the background
        bg, fg = np.array(COLORS[s.meta["background"]]), np.array(COLORS[obj["color"]])
        expected = bg + alpha[..., None] / 255 * (fg - bg)
        assert np.abs(img[y0:y1, x0:x1] - expected).max() <= 2
        return [obj["box"]]
    raise AssertionError(s.family)


def glyph_alpha(letter: str, size: int) -> np.ndarray:
    """Coverage (0-255) of `letter` in the built-in font, cropped to its ink (drawn here, not by the probes)."""
    im = Image.new("L", (4 * size, 4 * size), 0)
    ImageDraw.Draw(im).text((size, size), letter, fill=255, font=ImageFont.load_default(size=size))
    a = np.asarray(im).astype(int)
    ys, xs = np.nonzero(a)
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "background"])
def test_answers_and_evidence_from_pixels(family):
    for seed in SEEDS:
        s = make_probe(family, seed)
        img = pixels(s)
        canvas, grid = s.meta["config"]["canvas"], s.meta["config"]["grid"]
        boxes = relevant_boxes(s, img)
        assert sorted(boxes) == sorted(s.meta["evidence_boxes"])
        assert set(s.evidence) == brute_evidence(boxes, canvas, grid)
        drawn = ink(img, s.meta["background"])
        for box in boxes:
            counts = per_cell(drawn & box_mask(box, canvas), grid)
            # a cell this object's own pixels fill >= MIN_OVERLAP is always evidence ...
            assert set(np.flatnonzero(counts >= MIN_OVERLAP * (canvas // grid) ** 2).tolist()) <= set(s.evidence)
            # ... and the oracle that keeps only the evidence still sees part of every evidence object
            assert counts[list(s.evidence)].sum() > 0


def test_background_answer_and_evidence_from_pixels():
    for seed in SEEDS:
        s = make_probe("background", seed)
        img = pixels(s)
        canvas, grid = s.meta["config"]["canvas"], s.meta["config"]["grid"]
        cols, freq = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(cols[freq.argmax()]) == COLORS[s.answer]  # the background is the commonest colour
        covered = np.zeros((canvas, canvas), bool)
        for o in s.meta["objects"]:
            covered |= box_mask(o["box"], canvas)
        # evidence = exactly the cells no object box touches, and they are pure background
        assert set(s.evidence) == set(np.flatnonzero(per_cell(covered, grid) == 0).tolist())
        assert per_cell(ink(img, s.answer), grid)[list(s.evidence)].sum() == 0


# ---- evidence_cells by hand --------------------------------------------------------------------
@pytest.mark.parametrize(
    "boxes, min_overlap, expected",
    [
        ([(32, 16, 48, 32)], MIN_OVERLAP, (1 * 14 + 2,)),  # exactly cell (1, 2)
        ([(8, 8, 24, 24)], MIN_OVERLAP, (0, 1, 14, 15)),  # a quarter of each of four cells
        ([(0, 0, 17, 16)], MIN_OVERLAP, (0,)),  # 1 px into cell 1 = 6% < 10%
        ([(0, 0, 17, 16)], 0.0, (0, 1)),  # any overlap counts
        ([(0, 0, 19, 16)], MIN_OVERLAP, (0, 1)),  # 3 px = 18.75%
        ([(0, 0, 16, 16)], 1.0, (0,)),
        ([(14, 15, 17, 16)], MIN_OVERLAP, (0,)),  # too small anywhere: its fullest cell (2 px vs 1 px)
        ([(15, 15, 17, 17)], MIN_OVERLAP, (0, 1, 14, 15)),  # a 4-way tie keeps all four
        ([(208, 208, 224, 224), (0, 0, 16, 16)], MIN_OVERLAP, (0, 195)),  # union, sorted
        ([(3, 3, 5, 5), (0, 0, 32, 32)], MIN_OVERLAP, (0, 1, 14, 15)),  # each box judged on its own
        ([], MIN_OVERLAP, ()),
    ],
)
def test_evidence_cells_by_hand(boxes, min_overlap, expected):
    assert evidence_cells(boxes, 224, 14, min_overlap) == expected


def test_evidence_cells_other_grids_and_errors():
    # 14 px cells; the box spans columns 1-3 (4, 14, 6 px) and rows 0-1 (14, 10 px)
    assert evidence_cells([(24, 0, 48, 24)], 336, 24) == (1, 2, 3, 25, 26, 27)  # smallest: 4x10 = 20% of 196
    assert evidence_cells([(24, 0, 48, 24)], 336, 24, 0.3) == (2, 3, 26, 27)  # 56 and 40 px < 58.8
    assert evidence_cells([(0, 0, 224, 224)], 224, 14) == tuple(range(196))
    with pytest.raises(ValueError):
        evidence_cells([(0, 0, 10, 10)], 224, 15)
    with pytest.raises(ValueError):
        evidence_cells([(200, 0, 230, 10)], 224, 14)  # leaves the canvas
    with pytest.raises(ValueError):
        evidence_cells([(10, 10, 10, 20)], 224, 14)  # empty


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"grid": 15},
        {"min_size": 30, "max_size": 20},
        {"max_size": 100},
        {"min_size": 2},
        {"count_max": 10},
        {"count_min": 4, "count_max": 3},
        {"distractors": -1},
        {"font_size": 4},
        {"distractors": 16, "max_size": 56},  # too crowded to lay out
        {"colour": "red"},  # unknown knob
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        ProbeConfig(**kwargs)


def test_other_config_is_respected():
    cfg = ProbeConfig(
        canvas=336, grid=24, min_size=20, max_size=30, distractors=2, font_size=28, count_min=2, count_max=4
    )
    with pytest.raises(Exception):
        cfg.canvas = 224  # frozen: a config is a value
    for family in FAMILIES:
        for seed in range(10):
            s = make_probe(family, seed, cfg)
            assert s.load_image().size == (336, 336) and all(c < 24 * 24 for c in s.evidence)
            shapes = [o for o in s.meta["objects"] if o["shape"] != "text"]
            assert all(20 <= o["box"][2] - o["box"][0] <= 30 for o in shapes)
    assert make_probe("counting", 0, cfg).candidates == ("2", "3", "4")
    # the same seed under another config is another image
    assert not np.array_equal(pixels(make_probe("attribute", 0, cfg))[:224, :224], pixels(make_probe("attribute", 0)))


def test_render_is_fast():
    """What made rendering slow is loading the font and rasterizing glyphs: once per size (and letter),
    not per image. Counted, not timed: a wall-clock bound fails on a busy machine."""
    from hidrop import probes as module

    module._font.cache_clear()
    module._glyph.cache_clear()
    probes = probe_suite("test", per_family=20)
    for s in probes:
        s.load_image()
    fonts, glyphs = module._font.cache_info(), module._glyph.cache_info()
    assert fonts.misses == 1 and fonts.hits > fonts.misses  # one size in the default config
    assert glyphs.misses <= 26 and glyphs.hits > glyphs.misses  # at most one raster per letter
