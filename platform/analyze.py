"""`hidrop analyze`: run the layer diagnostics, propose a schedule, write it as an experiment YAML,
plot every curve, and log all of it as one MLflow run."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from hidrop.diagnostics import default_budget, layer_curves, passive_shallow_layers, propose, run_sweeps
from hidrop.evaluation.harness import EvalError
from hidrop_platform import mlflow_names as N
from hidrop_platform.config import ExperimentConfig, flatten, validate_config
from hidrop_platform.evaluate import EvalSetupError, benchmarks_for, build_model
from hidrop_platform.tracking import Tracker, prepare_for


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise AnalyzeSetupError(f"analyze.output: cannot write to {folder} ({e.strerror or e})") from None


class AnalyzeSetupError(RuntimeError):
    """Bad data or model for the diagnostics; one line for the user."""


def run_analyze(cfg: ExperimentConfig, base: dict, progress: Optional[Callable[[str], None]] = None, vlm=None) -> dict:

    a = cfg.analyze
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    _check_writable(Path(a.output) / cfg.name)  # before minutes of model work, not after
    try:
        say(f"loading {cfg.model.kind} model")
        vlm = vlm or build_model(cfg)
        calibration = []
        for bench in benchmarks_for(cfg, limit=a.samples):  # the calibration set: the benchmarks' image samples
            bench = bench.for_grid(vlm.grid) if hasattr(bench, "for_grid") and vlm.grid else bench
            calibration += [s for s in bench.samples() if s.has_image]
        calibration = calibration[: a.samples]
        say(f"layer curves on {len(calibration)} samples")
        curves = layer_curves(
            vlm, calibration, ilvas_k=a.ilvas_k, ilvas_n=a.ilvas_n, reference=a.reference, batch_size=a.batch_size
        )
        sweeps = None
        if a.sweeps:
            benches = benchmarks_for(cfg, limit=a.sweep_samples)
            say(f"exit and injection sweeps ({2 * len(range(2, vlm.num_layers + 1, a.sweep_stride))} schedules)")
            sweeps = run_sweeps(
                vlm,
                benches,
                stride=a.sweep_stride,
                mode=cfg.eval.mode,
                batch_size=cfg.eval.batch_size,
                seed=cfg.seed,
                progress=lambda done, total, label: say(f"sweeps: batch {done}/{total}"),
            )
    except (EvalSetupError, EvalError) as e:
        raise AnalyzeSetupError(str(e)) from None
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise AnalyzeSetupError(f"analyze: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    budget = a.avg_tokens or default_budget(vlm.num_vision_tokens)
    proposal = propose(
        curves,
        sweeps,
        avg_tokens=budget,
        stages=a.stages,
        keep_decay=a.keep_decay,
        exit_tolerance=a.exit_tolerance,
        onset_fraction=a.onset_fraction,
    )
    findings = {}
    if sweeps is not None:
        passive = passive_shallow_layers(sweeps, a.exit_tolerance)
        findings = {
            "deepest_passive_injection": passive,
            "shallow_layers_passive": passive > 1,
            "summary": (
                f"injecting the image at L{passive} keeps the score within {a.exit_tolerance:g} points of all tokens: "
                f"layers 1..{passive - 1} do not need it"
                if passive > 1
                else f"injecting the image after L1 already costs more than {a.exit_tolerance:g} points: "
                "the shallow layers are not passive for this model"
            ),
        }
    out = Path(a.output) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "experiment": cfg.name,
        "model": {"kind": vlm.kind, "num_layers": vlm.num_layers, "num_vision_tokens": vlm.num_vision_tokens},
        "curves": curves,
        "sweeps": sweeps,
        "proposal": proposal,
        "findings": findings,
        "wall_time_s": time.perf_counter() - start,
        "output": str(out),
    }
    proposed_yaml = _proposed_experiment(base, proposal, cfg)
    (out / "proposed.yaml").write_text(proposed_yaml)
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    plot_curves(result, out / "curves.png")
    result["files"] = sorted(str(p) for p in out.iterdir())
    _track(cfg, result, out)
    return result


def _proposed_experiment(base: dict, proposal: dict, cfg: ExperimentConfig) -> str:
    """The experiment with its schedule replaced by the proposal (curve form), checked to validate."""
    data = {k: v for k, v in base.items() if k not in ("compare", "tune")}
    data["name"] = f"{cfg.name}_proposed"
    data["description"] = "schedule proposed by hidrop analyze: " + "; ".join(
        f"{k}: {v}" for k, v in proposal["why"].items()
    )
    data["schedule"] = dict(proposal["schedule_fields"])
    validate_config(data, "proposed schedule")  # a proposal the other commands would reject is a bug here
    header = (
        "# Proposed by `hidrop analyze`. Use it as is (hidrop eval / train), or as a search seed:\n"
        "#   tune.seeds: [vanilla, {schedule mapping below}]\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


def plot_curves(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, sw, prop = result["curves"], result["sweeps"], result["proposal"]["schedule"]
    layers = list(range(1, c["num_layers"] + 1))
    panels = 4 if sw else 3
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.4 * panels), dpi=110, sharex=True)
    marks = [("inject", prop["inject_layer"], "#2a7fba"), ("exit", prop["exit_layer"], "#c23b22")]
    axes[0].plot(layers, c["s_intra"], marker=".", c="#444")
    axes[0].set_ylabel("S_intra")
    axes[1].plot(layers, c["s_cross"], marker=".", c="#444")
    axes[1].set_ylabel("S_cross")
    for key, values in c["ilvas"].items():
        axes[2].plot(layers[: len(values)], values, lw=0.8, alpha=0.6, label=key)
    axes[2].plot(layers, [v if v is not None else float("nan") for v in c["ilvas_mean"]], c="k", lw=1.6, label="mean")
    axes[2].set_ylabel("ILVAS")
    axes[2].legend(fontsize=6, ncol=4)
    for d in prop["drops"]:
        axes[2].axvline(d["after_layer"], c="#d9822b", ls=":", lw=1)
    if sw:
        axes[3].plot(sw["layers"], sw["exit"], marker=".", label="vision exits before L")
        axes[3].plot(sw["layers"], sw["inject"], marker=".", label="vision injected at L")
        axes[3].axhline(sw["all_tokens"], c="grey", ls="--", lw=0.8)
        axes[3].axhline(sw["blind"], c="grey", ls=":", lw=0.8)
        axes[3].set_ylabel("score")
        axes[3].legend(fontsize=7)
    for ax in axes:
        for name, layer, colour in marks:
            if layer:
                ax.axvline(layer, c=colour, lw=0.8, alpha=0.7)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("layer (1-indexed); blue: proposed injection, red: exit, orange: filtering layers")
    fig.suptitle(f"{result['experiment']}: layer diagnostics ({c['samples']} calibration samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _track(cfg: ExperimentConfig, result: dict, out: Path) -> None:
    if not cfg.tracking.enabled:
        return

    uri, experiment = prepare_for(cfg, "the analysis")
    tracker = Tracker(uri, experiment, run_name=f"analyze:{cfg.name}", tags={N.KIND: N.KIND_ANALYZE}).start()
    tracker.log_params({k: v for k, v in flatten(cfg).items() if not k.startswith("tune.")})
    tracker.log_params({f"{N.PROPOSED}{k}": v for k, v in result["proposal"]["schedule_fields"].items()})
    c = result["curves"]
    for i in range(c["num_layers"]):
        metrics = {N.S_INTRA: c["s_intra"][i], N.S_CROSS: c["s_cross"][i]}
        if c["ilvas_mean"][i] is not None:
            metrics[N.ILVAS_MEAN] = c["ilvas_mean"][i]
        tracker.log_metrics(metrics, step=i + 1)
    sw = result["sweeps"]
    if sw:
        for layer, e, j in zip(sw["layers"], sw["exit"], sw["inject"]):
            tracker.log_metrics({N.EXIT_SWEEP_SCORE: e, N.INJECT_SWEEP_SCORE: j}, step=layer)
        tracker.log_metrics({N.ALL_TOKENS_SCORE: sw["all_tokens"], N.BLIND_SCORE: sw["blind"]}, step=0)
    for path in out.iterdir():
        tracker.log_artifact(path, N.ANALYSIS_DIR)
    tracker.finish()
    result["tracking_uri"], result["run_id"] = uri, tracker.run_id
