"""`hidrop tune`: the driver, the schedule searcher, the trial, rungs, the sweep summary and the Pareto front.

Importing this package stays light (no Ray): the report imports its pure modules (`pareto`, `summary`)."""

import importlib

# Sweeps saved before the move pickled these under `hidrop_platform.tune` (tuner.pkl); resolved lazily
_PICKLED = {
    "ScheduleSearcher": "hidrop_platform.tune.driver",
    "TrialContext": "hidrop_platform.tune.driver",
    "ParetoHalving": "hidrop_platform.tune.driver",
    "run_trial": "hidrop_platform.tune.driver",
    "_ProgressCallback": "hidrop_platform.tune.driver",
}


def __getattr__(name: str):
    if name in _PICKLED:
        return getattr(importlib.import_module(_PICKLED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
