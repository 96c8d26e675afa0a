"""The four trained Tok64 mini-LLaVA models under checkpoints/ (README "HiDrop vs PDrop vs FastV, trained,
on the mini-LLaVA"): each is what its experiment YAML trains, small enough for the repository, found by
name from another folder, loads with its schedule, carries real adapters, and (slow) answers the held-out
questions exactly as the shipped records say it did."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hidrop.assets import shipped_path
from hidrop.schedule import Schedule
from hidrop_platform.config.loader import load_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("vanilla", "hidrop", "pdrop", "fastv")
RESULTS = ROOT / "docs" / "results" / "mini_llava_tok64"
BUDGET = 23.27  # HiDrop Tok64 scaled to 30 layers / 196 tokens (method.md section 8)


def _saved(method: str) -> tuple[dict, Schedule]:
    meta = json.loads((ROOT / "checkpoints" / f"mini_llava_tok64_{method}" / "config.json").read_text())["hidrop"]
    return meta, Schedule.model_validate(meta["schedule"])


@pytest.mark.parametrize("method", METHODS)
def test_each_shipped_model_is_what_its_experiment_trains(method):
    cfg = load_config(ROOT / "experiments" / f"mini_llava_tok64_{method}.yaml")
    meta, saved = _saved(method)
    folder = ROOT / "checkpoints" / f"mini_llava_tok64_{method}"
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert set(sizes) == {"config.json", "projector.safetensors", "lora.safetensors"}
    assert sum(sizes.values()) < 8_000_000, sizes  # small enough for the repository
    assert meta["projector_trained"] and meta["weights"] == "adapter"
    lora = cfg.train.lora
    assert meta["lora"]["scaling"] == lora["alpha"] / lora["r"] == 2.0 and len(meta["lora"]["modules"]) == 30 * 4
    with safe_open(str(folder / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
        assert {min(f.get_tensor(k).shape) for k in keys} == {lora["r"]}
        # A and B for q/k/v/o in each of the 30 layers; trained: no B left at its zero start
        assert len(keys) == 30 * 4 * 2
        assert all(f.get_tensor(k).abs().max() > 0 for k in keys if "lora_B" in k)
    configured = cfg.schedule.resolve(30, 196)
    assert saved.name == configured.name and saved.inject_layer == configured.inject_layer
    if method == "vanilla":
        assert saved.avg_tokens() == 196
    else:  # the same average vision-token budget, within a token of HiDrop Tok64's
        assert abs(saved.avg_tokens() - BUDGET) < 1.0, saved.avg_tokens()
    if method != "hidrop":  # fixed schedules come back exactly; HiDrop's keeps are learned
        assert saved.drops == configured.drops


def test_shipped_models_are_found_by_name_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for method in METHODS:
        found = shipped_path(f"checkpoints/mini_llava_tok64_{method}")
        assert found is not None and (found / "lora.safetensors").is_file()
    cfg = load_config("mini_llava_tok64_eval", ["model.path=checkpoints/mini_llava_tok64_pdrop"])
    assert cfg.main_schedule == _saved("pdrop")[1]  # preset: checkpoint, read from the folder found


@pytest.mark.slow
def test_each_shipped_model_loads_with_its_schedule_and_hidrop_keeps_its_learned_counts():
    """load_model by name: the schedule round-trips; the HiDrop model's learned keep counts (not the
    preset's starting ones) are what the engine keeps, layer by layer, on a real image."""
    import numpy as np
    from PIL import Image

    from hidrop.models import load_model
    from hidrop.schedule import preset

    for method in METHODS:
        vlm = load_model(shipped_path(f"checkpoints/mini_llava_tok64_{method}"))
        assert vlm.schedule == _saved(method)[1] and vlm.projector_trained
    vlm = load_model(shipped_path("checkpoints/mini_llava_tok64_hidrop"))
    learned = vlm.schedule
    start = preset("hidrop_tok64", 30, 196)
    assert [d.after_layer for d in learned.drops] == [d.after_layer for d in start.drops]
    assert [d.keep for d in learned.drops] != [d.keep for d in start.drops]  # training moved them
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    vis = vlm.vision_embeds(vlm.image_processor(image)[None])
    ids = torch.tensor([[1] * 4 + [vlm.image_token_id] * 196 + [2] * 8])
    with torch.no_grad():
        res = vlm.scheduled(learned)(ids, vision_embeds=vis.flatten(0, 1), logits_to_keep=1)
    assert res.layer_vision_counts[:, 0].tolist() == learned.tokens_per_layer()


@pytest.mark.slow
def test_a_shipped_model_answers_as_its_records_say(method="hidrop"):
    """The first batch of each benchmark scored again with the evaluation's own settings: the same answers
    as the shipped records of the README's evaluation (so its figures are reproducible)."""
    cfg = load_config("mini_llava_tok64_eval", [f"model.path=checkpoints/mini_llava_tok64_{method}"])
    _answers_as_recorded(cfg, RESULTS / f"{method}.jsonl.gz")


def _answers_as_recorded(cfg, records: Path) -> None:
    from hidrop.evaluation.harness import evaluate
    from hidrop_platform.evaluate.runs import benchmarks_for, build_model, eval_settings

    vlm = build_model(cfg)
    schedule = cfg.main_schedule
    with gzip.open(records, "rt") as f:
        shipped = {(r["method"], r["benchmark"], r["id"]): r for r in map(json.loads, f)}
    first = cfg.eval.batch_size  # the first batch of the full run: the same padding, the same arithmetic
    report = evaluate(
        vlm,
        [schedule],
        benchmarks_for(cfg),
        baselines=[],
        keep_records=True,
        select=lambda bench, samples: samples[:first],
        **{**eval_settings(cfg), "n_resamples": 0},
    )
    method = "all_tokens" if schedule.is_vanilla() else schedule.name  # how the harness names it
    rows = list(report.record_rows([method]))
    assert len(rows) == 2 * first
    for r in rows:
        ref = shipped[(method, r["benchmark"], r["id"])]
        assert (r["prediction"], r["score"]) == (ref["prediction"], ref["score"]), r["id"]
