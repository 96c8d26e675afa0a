"""`hidrop analyze`: run the layer diagnostics, propose a schedule, write it as an experiment YAML,
plot every curve, and log all of it as one MLflow run."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from hidrop.diagnostics import (
    default_budget,
    describe_point,
    ilvas_curves,
    layer_curves,
    passive_shallow_layers,
    propose,
    propose_window,
    run_sweeps,
    sweep_statistics,
)
from hidrop.errors import UserError
from hidrop.evaluation.harness import EvalError, evaluate
from hidrop.schedule import vanilla
from hidrop_platform.config.loader import flatten, validate_config
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.evaluate.runs import EvalSetupError, benchmarks_for, build_model
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.store import prepare_for
from hidrop_platform.tracking.tracker import Tracker


class AnalyzeSetupError(UserError, RuntimeError):
    """Bad data or model for the diagnostics; one line for the user."""


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise AnalyzeSetupError(f"analyze.output: cannot write to {folder} ({e.strerror or e})") from None


def run_analyze(cfg: ExperimentConfig, base: dict, progress: Optional[Callable[[str], None]] = None, vlm=None) -> dict:
    """The layer curves (and, with analyze.sweeps, the exit and injection sweeps) of the experiment's
    model, the schedule they propose, written under analyze.output/<name> (proposed.yaml, analysis.json,
    curves.png) and tracked as one run. Returns the result as written to analysis.json, plus the files."""
    a = cfg.analyze
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    out = Path(a.output) / cfg.name
    _check_writable(out)  # before minutes of model work, not after
    try:
        say(f"loading {cfg.model.kind} model")
        vlm = vlm or build_model(cfg)
        calibration = _calibration_samples(cfg, vlm)
        say(f"layer curves on {len(calibration)} samples")
        curves = layer_curves(
            vlm, calibration, ilvas_k=a.ilvas_k, ilvas_n=a.ilvas_n, reference=a.reference, batch_size=a.batch_size
        )
        sweeps, signal_search = _sweeps(cfg, vlm, say) if a.sweeps else (None, None)
        # the paper measures ILVAS on the model with the chosen late injection and early exit
        window = propose_window(curves, sweeps, exit_tolerance=a.exit_tolerance, onset_fraction=a.onset_fraction)
        if window != (1, None):
            say(f"ILVAS with injection at L{window[0]} and exit {f'before L{window[1]}' if window[1] else 'none'}")
            curves.update(
                ilvas_curves(vlm, calibration, *window, ilvas_k=a.ilvas_k, ilvas_n=a.ilvas_n, batch_size=a.batch_size)
            )
    except (EvalSetupError, EvalError) as e:
        raise AnalyzeSetupError(str(e)) from None
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise AnalyzeSetupError(f"analyze: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    proposal = propose(
        curves,
        sweeps,
        avg_tokens=a.avg_tokens or default_budget(vlm.num_vision_tokens),
        stages=a.stages,
        keep_decay=a.keep_decay,
        exit_tolerance=a.exit_tolerance,
        onset_fraction=a.onset_fraction,
    )
    findings, warnings = _findings(sweeps, a.exit_tolerance) if sweeps is not None else ({}, [])
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "experiment": cfg.name,
        "model": {"kind": vlm.kind, "num_layers": vlm.num_layers, "num_vision_tokens": vlm.num_vision_tokens},
        "curves": curves,
        "sweeps": sweeps,
        "proposal": proposal,
        "findings": findings,
        "warnings": warnings,
        "sweep_signal_search": signal_search,
        "wall_time_s": time.perf_counter() - start,
        "output": str(out),
    }
    (out / "proposed.yaml").write_text(_proposed_experiment(base, proposal, cfg))
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    plot_curves(result, out / "curves.png")
    result["files"] = sorted(str(p) for p in out.iterdir())
    _track(cfg, result, out)
    return result


def _calibration_samples(cfg: ExperimentConfig, vlm) -> list:
    """The calibration set: the benchmarks' samples with an image, at most analyze.samples of them."""
    calibration = []
    for bench in benchmarks_for(cfg, limit=cfg.analyze.samples):
        bench = bench.for_grid(vlm.grid) if hasattr(bench, "for_grid") and vlm.grid else bench
        calibration += [s for s in bench.samples() if s.has_image]
    return calibration[: cfg.analyze.samples]


def _sweeps(cfg: ExperimentConfig, vlm, say: Callable[[str], None]) -> tuple[dict, Optional[list[dict]]]:
    """The exit and injection sweeps, and the search for their question count when analyze.sweep_samples
    is not given (None when it is)."""
    a = cfg.analyze
    n, signal_search = a.sweep_samples, None
    if n is None:  # as many questions as it takes for the image to matter measurably
        n, signal_search = choose_sweep_samples(lambda k: _signal(cfg, vlm, k), most=a.sweep_samples_max)
        resolved = signal_search[-1]["interval"][0] > 0
        say(f"sweeps on {n} questions per benchmark" + (" (all tokens beats blind there)" if resolved else ""))
    benches = benchmarks_for(cfg, limit=n)
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
    return sweeps, signal_search


def _findings(sweeps: dict, exit_tolerance: float) -> tuple[dict, list[str]]:
    """What the sweeps say about the shallow layers, and a warning when they cannot tell layers apart."""
    passive = passive_shallow_layers(sweeps, exit_tolerance)
    k = sweeps["layers"].index(passive) if passive in sweeps["layers"] else None
    quoted = (
        describe_point(
            f"L{passive}",
            sweeps["inject_diff"][k],
            sweeps["inject_diff_interval"][k],
            exit_tolerance,
            sweeps["questions"],
        )
        if k is not None
        else ""
    )
    findings = {
        "deepest_passive_injection": passive,
        "shallow_layers_passive": passive > 1,
        "summary": (
            f"injecting the image at L{passive} is not shown to lose more than {exit_tolerance:g} points "
            f"({quoted}): layers 1..{passive - 1} may do without it"
            if passive > 1
            else f"injecting the image after L1 already loses more than {exit_tolerance:g} points: "
            "the shallow layers are not passive for this model"
        ),
    }
    warnings = []
    sig = sweeps["signal"]
    if not sig["resolved"]:
        lo, hi = sig["interval"]
        warnings.append(
            f"all tokens vs blind on the {sweeps['questions']} sweep questions: {sig['diff']:+.1f} "
            f"[{lo:+.1f}, {hi:+.1f}] points, not significantly above blind: the sweeps cannot tell layers "
            "apart here (raise analyze.sweep_samples, or the model barely uses the image)"
        )
    return findings, warnings


def choose_sweep_samples(measure: Callable[[int], dict], start: int = 48, most: int = 768) -> tuple[int, list[dict]]:
    """The smallest n of start, 2 x start, ... (at most `most`) at which `measure(n)` (all tokens minus
    blind on n questions per benchmark: {"diff", "interval", "questions"}) lies wholly above 0; the last
    one tried when none does, or when the benchmarks run out of questions. Returns (n, every check)."""
    tried: list[dict] = []
    n = min(start, most)
    while True:
        check = {**measure(n), "samples": n}
        exhausted = bool(tried) and check["questions"] <= tried[-1]["questions"]
        tried.append(check)
        if check["interval"][0] > 0 or n >= most or exhausted:
            return n, tried
        n = min(2 * n, most)


def _signal(cfg: ExperimentConfig, vlm, n: int) -> dict:
    """All tokens minus blind, paired, on `n` questions per benchmark of eval.benchmarks."""
    report = evaluate(
        vlm,
        [vanilla(vlm.num_layers, vlm.num_vision_tokens)],  # folded into all tokens: two methods are run
        benchmarks_for(cfg, limit=n),
        baselines=["blind"],
        mode=cfg.eval.mode,
        batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        keep_records=True,
        n_resamples=0,
    )
    records = {m.method: {b: e.records for b, e in m.benchmarks.items()} for m in report.methods}
    stats = sweep_statistics(records, "all_tokens", seed=cfg.seed)
    lo, hi = stats["blind"]["diff_interval"]
    return {
        "diff": -stats["blind"]["diff"],
        "interval": [-hi, -lo],
        "questions": sum(len(r) for r in records["all_tokens"].values()),
    }


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
    """The layer curves (and the sweeps) as one figure of stacked panels, marked with the proposal."""
    import matplotlib  # only when a figure is drawn: slow to import, and `hidrop` starts without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, sw, prop = result["curves"], result["sweeps"], result["proposal"]["schedule"]
    layers = list(range(1, c["num_layers"] + 1))
    panels = 4 if sw else 3
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.4 * panels), dpi=110, sharex=True)
    marks = [("inject", prop["inject_layer"], "#2a7fba"), ("exit", prop["exit_layer"], "#c23b22")]

    def band(ax, key):  # mean +- 1.96 standard errors over the calibration samples
        mean = [v if v is not None else float("nan") for v in c[key]]
        se = [v if v is not None else float("nan") for v in c.get(key + "_se") or [0.0] * len(mean)]
        ax.fill_between(
            layers,
            [m - 1.96 * e for m, e in zip(mean, se)],
            [m + 1.96 * e for m, e in zip(mean, se)],
            color="#888",
            alpha=0.25,
            lw=0,
            label="95% band",
        )
        return mean

    axes[0].plot(layers, band(axes[0], "s_intra"), marker=".", c="#444")
    axes[0].set_ylabel("S_intra")
    axes[1].plot(layers, band(axes[1], "s_cross"), marker=".", c="#444")
    axes[1].set_ylabel("S_cross")
    for key, values in c["ilvas"].items():
        values = [float("nan") if v is None else v for v in values]
        axes[2].plot(layers[: len(values)], values, lw=0.8, alpha=0.6, label=key)
    axes[2].plot(layers, band(axes[2], "ilvas_mean"), c="k", lw=1.6, label="mean")
    axes[2].set_ylabel("ILVAS")
    axes[2].legend(fontsize=6, ncol=4)
    for d in prop["drops"]:
        axes[2].axvline(d["after_layer"], c="#d9822b", ls=":", lw=1)
    if sw:
        for kind, label in (("exit", "vision exits before L"), ("inject", "vision injected at L")):
            lows = [i[0] for i in sw.get(f"{kind}_interval") or [[x, x] for x in sw[kind]]]
            highs = [i[1] for i in sw.get(f"{kind}_interval") or [[x, x] for x in sw[kind]]]
            (line,) = axes[3].plot(sw["layers"], sw[kind], marker=".", label=label)
            axes[3].fill_between(sw["layers"], lows, highs, color=line.get_color(), alpha=0.15, lw=0)
        axes[3].axhline(sw["all_tokens"], c="grey", ls="--", lw=0.8)
        axes[3].axhline(sw["blind"], c="grey", ls=":", lw=0.8)
        axes[3].set_ylabel(f"score ({sw.get('questions', sw['samples'])} q, 95%)")
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
        metrics = {}
        for name in (N.S_INTRA, N.S_CROSS, N.ILVAS_MEAN):
            for key in (name, name + N.SE_SUFFIX):
                if c[key][i] is not None:
                    metrics[key] = c[key][i]
        tracker.log_metrics(metrics, step=i + 1)
    sw = result["sweeps"]
    if sw:
        for k, layer in enumerate(sw["layers"]):
            metrics = {N.EXIT_SWEEP_SCORE: sw["exit"][k], N.INJECT_SWEEP_SCORE: sw["inject"][k]}
            for kind, name in (("exit", N.EXIT_SWEEP_DIFF), ("inject", N.INJECT_SWEEP_DIFF)):
                lo, hi = sw[f"{kind}_diff_interval"][k]
                metrics.update({name: sw[f"{kind}_diff"][k], name + N.LOW_SUFFIX: lo, name + N.HIGH_SUFFIX: hi})
            tracker.log_metrics(metrics, step=layer)
        tracker.log_metrics({N.ALL_TOKENS_SCORE: sw["all_tokens"], N.BLIND_SCORE: sw["blind"]}, step=0)
    for path in out.iterdir():
        tracker.log_artifact(path, N.ANALYSIS_DIR)
    tracker.finish()
    result["tracking_uri"], result["run_id"] = uri, tracker.run_id
