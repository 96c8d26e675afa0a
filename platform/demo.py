"""`hidrop demo`: the whole platform on embedded defaults, in minutes, on a laptop-class CPU.

1. a schedule search on the offline mini-LLaVA trained through stage 2 with all tokens (shipped in
   checkpoints/mini_llava_tok64_vanilla): the paper's presets (vanilla, FastV, PDrop, HiDrop Tok48/64/80)
   are its seed trials, then Optuna searches; trials run in two rungs (a third, then all of the questions)
   with Pareto successive halving, every score carries its paired 95% interval, and the seeds and the
   best front trials are confirmed on held-out questions;
2. the HiDrop-trained model (checkpoints/mini_llava_tok64_hidrop) scored under its own schedule on the
   search's questions and paired with the search's all-tokens and blind rows (`hidrop compare --track`):
   what training with the schedule active buys over applying it training-free;
3. two short LLaVA stage-2 (LoRA) trainings from the stage-1 projector, all tokens and HiDrop, each
   scoring its model at the end, so the report can compare what training cost;
4. the report (dashboards/report.py) over the MLflow experiment `demo`.

Everything is local: Ray on this machine, MLflow in ./mlruns, Tune and Train state in ./runs/demo.
The configs are built here (not read from experiments/) so the demo works from any directory.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import transformers

from hidrop_dashboards.report import build_report
from hidrop_platform.cluster.connect import start_ray
from hidrop_platform.config.loader import validate_config
from hidrop_platform.evaluate.compare import compare, log_comparison
from hidrop_platform.evaluate.runs import run_eval, write_records
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.store import default_tracking_uri
from hidrop_platform.train.driver import run_training
from hidrop_platform.tune.driver import run_tune

EXPERIMENT = "demo"
PROJECTOR = "checkpoints/mini_llava_projector"  # the shipped copies (hidrop.assets), found by build_model
STAGE2 = "checkpoints/mini_llava_tok64_vanilla"  # stage 2 with all tokens: the model the search prunes
TRAINED_HIDROP = "checkpoints/mini_llava_tok64_hidrop"  # stage 2 with HiDrop Tok64 active


@dataclass(frozen=True)
class DemoSize:
    searched: int  # Optuna trials after the 6 preset seeds
    easy_vqa: int  # easy-vqa test questions per trial (its last rung)
    probes: int  # probe questions per family (6 families)
    train_steps: int  # optimizer steps per training run (0: no training stage)
    confirm_top_k: int = 2  # searched front trials confirmed on held-out questions (with the seeds)


# easy-vqa carries the relative score: at 54 questions all tokens (~67%) is far above blind (~35%). The
# probes are diagnostic (per-family scores, evidence recall): scored, but not in the relative score
SIZES = {
    "small": DemoSize(searched=2, easy_vqa=18, probes=2, train_steps=3, confirm_top_k=1),
    "default": DemoSize(searched=6, easy_vqa=54, probes=4, train_steps=6),
    "large": DemoSize(searched=24, easy_vqa=162, probes=10, train_steps=40, confirm_top_k=5),
}
# `hidrop demo` option ceilings: easy-vqa's test split holds ~9,700 questions, and the held-out confirmation
# needs questions the search did not see
DEMO_MAX = {"searched": 200, "easy_vqa": 4000, "train_steps": 10_000}
TRIAL_FIELDS = (
    "label",
    "seed",
    "status",
    "relative_score",
    "relative_score_lo",
    "relative_score_hi",
    "blind_level",
    "samples",
    "avg_vision_tokens",
    "vision_tflops",
    "pareto",
    "significant",
)
PRESETS = ["vanilla", "fastv", "pdrop", "hidrop_tok48", "hidrop_tok64", "hidrop_tok80"]
# the search summary's fields the demo's result carries as they are, in this order
SUMMARY_FIELDS = (
    "sweep",
    "pareto",
    "significant",
    "discoveries",
    "reference_scores",
    "blind_relative_score",
    "blind_relative_interval",
    "questions_run",
    "notes",
)


def _benchmarks(size: DemoSize) -> list[dict]:
    return [{"name": "easy_vqa", "limit": size.easy_vqa}, {"name": "probes", "limit": size.probes}]


def sweep_config(size: DemoSize, stamp: str) -> dict:
    return {
        "name": "demo_search",
        "description": "hidrop demo: paper presets and a small Optuna search on the offline mini-LLaVA",
        "model": {"kind": "mini_llava", "feature": "block10", "path": STAGE2},
        "schedule": {"preset": "hidrop_tok64"},
        "eval": {"benchmarks": _benchmarks(size), "baselines": [], "mode": "auto", "batch_size": 8},
        "tracking": {"experiment": EXPERIMENT},
        "tune": {
            "name": f"demo-{stamp}",
            "kind": "training_free",
            "algorithm": "optuna",
            "objective": "pareto",
            "num_samples": size.searched,
            "seeds": PRESETS,
            "resources_per_trial": {"CPU": 1},
            "storage_path": "runs/demo/tune",
            # the presets run every rung: they are the paper's baselines the searched trials are read against
            "fidelity": {"rungs": 2, "factor": 3, "promote_seeds": True},
            "confirm": {"top_k": size.confirm_top_k},
            "space": {
                "schedule.inject_layer": {"int": [1, 12]},
                "schedule.exit_layer": {"int": [14, 30]},
                "schedule.stages": {"int": [1, 4]},
                "schedule.avg_tokens": {"float": [8, 120]},
                "schedule.keep_decay": {"float": [0.05, 0.6]},
            },
        },
    }


def trained_config(size: DemoSize) -> dict:
    """The HiDrop-trained model under the schedule it was trained with, on the search's benchmarks."""
    return {
        "name": "demo_trained_hidrop",
        "model": {"kind": "mini_llava", "feature": "block10", "path": TRAINED_HIDROP},
        "schedule": {"preset": "checkpoint"},
        "eval": {"benchmarks": _benchmarks(size), "baselines": [], "mode": "auto", "batch_size": 8},
        "tracking": {"experiment": EXPERIMENT},
    }


def compare_trained(size: DemoSize, sweep_dir: Path, uri: str) -> dict:
    """Score the HiDrop-trained model on the search's questions and pair it, by question, with the
    search's stored all-tokens and blind records; logged as a compare run the report shows."""
    cfg = validate_config(trained_config(size), "hidrop demo")
    report = run_eval(cfg, keep_records=True)
    trained = sweep_dir / "trained_hidrop.jsonl.gz"
    write_records(report, trained)
    stored = sweep_dir / N.RECORDS_FILE
    result = compare(
        [
            f"{stored}:all_tokens=all tokens (stage 2)",
            f"{stored}:blind=blind",
            f"{trained}:{cfg.main_schedule.name}=HiDrop-trained",
        ],
        reference="all tokens (stage 2)",
        baseline="blind",
    )
    result["run_id"] = log_comparison(result, uri, EXPERIMENT)
    return result


def train_config(size: DemoSize, stamp: str, method: str) -> dict:
    """LLaVA stage 2 (LoRA + projector) for a few steps; HiDrop trains with multi-round queries and
    learnable keep ratios, as in the paper's second stage."""
    schedule = (
        {"preset": "vanilla"}
        if method == "vanilla"
        else {"preset": "hidrop_tok64", "query_rule": "multi_round", "selector": "dtopk_learnable"}
    )
    return {
        "name": f"demo-{stamp}-train-{method}",
        "description": f"hidrop demo: {size.train_steps} LoRA finetune steps, {method}",
        "model": {"kind": "mini_llava", "feature": "block10", "path": PROJECTOR},
        "schedule": schedule,
        "eval": {"benchmarks": _benchmarks(size), "baselines": [], "mode": "auto", "batch_size": 8},
        "tracking": {"experiment": EXPERIMENT},
        "train": {
            "stage": "finetune",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "data": [{"name": "easy_vqa", "limit": 4 * size.train_steps}],
            "template": "chatml",
            "micro_batch_size": 4,
            "max_steps": size.train_steps,
            "lr": 1e-4,
            "zero_stage": 2,
            "num_workers": 1,
            "resources_per_worker": {"CPU": 2},
            "checkpoint_every": size.train_steps,
            "storage_path": "runs/demo/train",
            "eval_after": True,
            "log_model": False,  # the export stays under runs/demo: no 500 MB copy per run in ./mlruns
        },
    }


def quiet_libraries() -> None:
    """The demo's own progress bar is the output: no weight-loading bars or INFO lines from libraries."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


class DemoProgress:
    """What the CLI shows; the default prints nothing."""

    def stage(self, name: str, index: int, total: int, short: str = "") -> None: ...

    def sweep(self, label: str, done: int, total: int) -> None: ...

    def train(self, info: dict) -> None: ...


def run_demo(size: DemoSize, report_dir: str | Path = "reports/demo", progress: Optional[DemoProgress] = None) -> dict:
    """The four stages of the module docstring, timed; returns what each produced (the `--json` output)."""
    progress = progress or DemoProgress()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stages = 3 + (size.train_steps > 0) * 2
    start = time.perf_counter()
    timings: dict[str, float] = {}
    quiet_libraries()
    start_ray()

    progress.stage(
        f"schedule search: {len(PRESETS)} presets, then {size.searched} Optuna trials in 2 rungs "
        f"(up to {size.easy_vqa} easy-vqa + {6 * size.probes} probe questions each), then held-out confirmation",
        1,
        stages,
        "search",
    )
    base = sweep_config(size, stamp)
    t0 = time.perf_counter()
    summary = run_tune(validate_config(base, "hidrop demo"), base, progress=progress.sweep)
    timings["search_s"] = time.perf_counter() - t0

    progress.stage(
        "the HiDrop-trained model on the same questions, paired with all tokens and blind", 2, stages, "trained"
    )
    t0 = time.perf_counter()
    uri = default_tracking_uri()
    trained = compare_trained(size, Path(summary.sweep_dir), uri)
    timings["trained_s"] = time.perf_counter() - t0

    trainings = _train_both(size, stamp, progress, stages, timings) if size.train_steps > 0 else []

    progress.stage(f"report: {report_dir}", stages, stages, "report")
    t0 = time.perf_counter()
    report = build_report(uri, EXPERIMENT, report_dir, sweep=summary.sweep)
    timings["report_s"] = time.perf_counter() - t0
    return {
        "size": asdict(size),
        "experiment": EXPERIMENT,
        "tracking_uri": uri,
        **{key: getattr(summary, key) for key in SUMMARY_FIELDS},
        "confirm": summary.confirm,
        "trials": [{k: getattr(r, k) for k in TRIAL_FIELDS} for r in summary.trials],
        "trained": {
            "rows": [
                {k: r[k] for k in ("label", "scores", "intervals", "relative_score", "relative_interval")}
                for r in trained["rows"]
            ],
            "pairs": trained["pairs"],
            "run_id": trained["run_id"],
        },
        "trainings": trainings,
        "report": report,
        "timings_s": timings,
        "wall_time_s": time.perf_counter() - start,
    }


def _train_both(size: DemoSize, stamp: str, progress: DemoProgress, stages: int, timings: dict) -> list[dict]:
    """Stages 3 and 4: the all-tokens and the HiDrop training, each timed into `timings`."""
    trainings = []
    for i, method in enumerate(("vanilla", "hidrop")):
        progress.stage(
            f"training with {method}: {size.train_steps} LoRA steps on 1 Ray worker (DeepSpeed ZeRO-2), then scored",
            3 + i,
            stages,
            f"train {method}",
        )
        t0 = time.perf_counter()
        cfg = validate_config(train_config(size, stamp, method), "hidrop demo")
        result = run_training(cfg, progress=progress.train)
        timings[f"train_{method}_s"] = time.perf_counter() - t0
        trainings.append(
            {
                "method": method,
                "wall_time_s": timings[f"train_{method}_s"],
                "loss": result["metrics"].get("loss"),
                "export": result["export"],
            }
        )
    return trainings
