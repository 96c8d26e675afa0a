"""`hidrop tune`: a search over vision-token schedules with Ray Tune, one MLflow run per trial.

In the driver process: `driver` (run_tune: checks, the held sweep folder, the parent run, the Tuner),
`searcher` (the points Tune is given), `scheduler` (multi-fidelity promotion), `reference` (the
all-tokens pass, once per sweep), `confirm` (the front again on unseen questions), `results` (the
summary, its files and the parent run's metrics), `credentials` (MLflow auth for trials). In each
trial's actor: `trial` (run_trial). Shared: `space` (a point's trial config), `trial_runs` (one record
per point), `errors`. Pure, no Ray: `rungs` (promotion rules), `summary`, `pareto` (the report imports
these two) and `rank_agreement` (`hidrop proxy`).

Importing this package stays light (no Ray)."""

import importlib

# Sweeps saved before the move pickled these under `hidrop_platform.tune` (tuner.pkl); resolved lazily
_PICKLED = {
    "ScheduleSearcher": ("hidrop_platform.tune.searcher", "ScheduleSearcher"),
    "TrialContext": ("hidrop_platform.tune.trial", "TrialContext"),
    "ParetoHalving": ("hidrop_platform.tune.scheduler", "ParetoHalving"),
    "run_trial": ("hidrop_platform.tune.trial", "run_trial"),
    "_ProgressCallback": ("hidrop_platform.tune.driver", "_ProgressAndRunCloser"),  # renamed since
}


def __getattr__(name: str):
    if name in _PICKLED:
        module, attribute = _PICKLED[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
