"""The schedule searcher Tune asks for points (it runs in the driver): seeds first, then samples of
`tune.space` from grid / random / Optuna, only valid ones; and `valid_share`, the check that a space is
not (almost) all impossible before any cluster time is spent."""

from __future__ import annotations

import base64
import itertools
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
from ray import tune
from ray.tune.search import Searcher

from hidrop_platform.config.loader import ConfigError
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.tracking import names as N
from hidrop_platform.tune.errors import TuneSetupError
from hidrop_platform.tune.space import budget_problem, rejection_reason, seed_overrides, trial_config

OBJECTIVES = {"pareto": ([N.RELATIVE_SCORE, N.VISION_TFLOPS], ["max", "min"]), "score": (N.RELATIVE_SCORE, "max")}
OPTUNA_STREAK = 20  # rejected Optuna proposals in a row before a random valid point is enqueued for it


def _domain(dim) -> Any:
    """Tune's sampling domain of one `tune.space` dimension."""
    if dim.choice is not None:  # Optuna's categorical values must be scalars: search the index
        return tune.choice(list(range(len(dim.choice))))
    if dim.int_range is not None:
        lo, hi = dim.int_range
        return tune.qrandint(lo, hi, dim.step) if dim.step else tune.randint(lo, hi + 1)
    lo, hi = dim.float_range
    return tune.loguniform(lo, hi) if dim.log else tune.uniform(lo, hi)


def _decode(space: dict, raw: dict) -> dict:
    """A raw sample as config values (a choice's index back to its value, ints as ints)."""
    out = {}
    for key, dim in space.items():
        value = raw[key]
        if dim.choice is not None:
            value = dim.choice[int(value)]
        elif dim.int_range is not None:
            value = int(value)
        else:
            value = float(value)
        out[key] = value
    return out


class ScheduleSearcher(Searcher):
    """Suggests seed schedules first, then samples of `tune.space` from grid / random / Optuna.

    Every suggestion is turned into a trial config and validated here; an impossible schedule (or one
    over the FLOPs budget in `score` mode) never reaches a trial: it is counted by reason and, for
    Optuna, told as a failed trial so the sampler moves on.
    """

    def __init__(self, base: dict, cfg: ExperimentConfig):
        metric, mode = OBJECTIVES[cfg.tune.objective]
        super().__init__(metric=None, mode=None)  # Tune's own metric stays unset: the objectives are ours
        self.base, self.algorithm = base, cfg.tune.algorithm
        self.space = cfg.tune.space
        self.max_rejections = cfg.tune.max_rejections
        self.pending_seeds = [seed_overrides(s) for s in cfg.tune.seeds]
        self.num_seeds = len(self.pending_seeds)
        self.rejections: Counter = Counter()
        self.suggested = 0
        self.inner_ids: dict[str, str] = {}
        self.grid: list[dict] = []
        self.num_searched = cfg.tune.num_samples if self.space else 0
        self.rng_state: Optional[dict] = None
        self.inner = None
        if self.algorithm == "grid" and self.space:
            self.grid = self._valid_grid()
            self.num_searched = len(self.grid)
        elif self.algorithm == "optuna" and self.space:
            import optuna  # only an Optuna sweep needs it
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(4, cfg.tune.num_samples // 4))
            space = OptunaSearch.convert_search_space({k: _domain(d) for k, d in self.space.items()})
            self.inner = OptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler)
        if self.algorithm in ("random", "optuna"):
            self.rng_state = np.random.default_rng(cfg.seed).bit_generator.state

    @property
    def seeds_done(self) -> int:
        return self.num_seeds - len(self.pending_seeds)

    @property
    def total_trials(self) -> int:
        return self.num_seeds + self.num_searched

    def _check(self, overrides: dict) -> Optional[str]:
        try:
            return budget_problem(trial_config(self.base, overrides))
        except ConfigError as e:
            return rejection_reason(e)

    def _valid_grid(self) -> list[dict]:

        keys = list(self.space)
        points = []
        for values in itertools.product(*(self.space[k].values() for k in keys)):
            point = dict(zip(keys, values))
            problem = self._check(point)
            if problem is None:
                points.append(point)
            else:
                self.rejections[problem] += 1
        if not points:
            top = self.rejections.most_common(1)[0][0] if self.rejections else "empty space"
            raise TuneSetupError(f"tune.space: no grid point is a valid schedule (e.g. {top})")
        return points

    def _draw(self, trial_id: str, attempt: int) -> tuple[Optional[dict], Optional[str]]:
        """One raw sample (decoded to config values) and the inner searcher's id for it."""
        if self.algorithm == "grid":
            return self.grid[self.suggested - self.seeds_done], None
        if self.algorithm == "random":
            return _decode(self.space, self._random_raw()), None
        if attempt >= OPTUNA_STREAK:
            # TPE ignores failed trials, so it can keep proposing the same impossible corner: hand it a
            # random point to evaluate instead (it is told the result like any of its own)
            self.inner._ot_study.enqueue_trial(self._random_raw())
        inner_id = f"{trial_id}~{attempt}"
        raw = self.inner.suggest(inner_id)
        if raw is None or raw == self.FINISHED:
            return None, None
        return _decode(self.space, raw), inner_id

    def _random_raw(self) -> dict:
        rng = np.random.default_rng()
        rng.bit_generator.state = self.rng_state
        raw = {k: _domain(d).sample(random_state=rng) for k, d in self.space.items()}
        self.rng_state = rng.bit_generator.state
        return {k: (v[0] if isinstance(v, list) else v) for k, v in raw.items()}

    def suggest(self, trial_id: str) -> Optional[dict]:
        if self.pending_seeds:
            label, overrides = self.pending_seeds.pop(0)
            self.suggested += 1
            return {"label": label, "overrides": overrides, "seed": True}
        if self.suggested - self.seeds_done >= self.num_searched:
            return self.FINISHED
        for attempt in range(self.max_rejections):
            point, inner_id = self._draw(trial_id, attempt)
            if point is None:
                return None
            problem = None if self.algorithm == "grid" else self._check(point)
            if problem is None:
                if inner_id is not None:
                    self.inner_ids[trial_id] = inner_id
                number = self.suggested - self.seeds_done + 1
                self.suggested += 1
                return {"label": f"trial-{number:03d}", "overrides": point, "seed": False}
            self.rejections[problem] += 1
            if inner_id is not None:
                self.inner.on_trial_complete(inner_id, result=None, error=True)
        top = self.rejections.most_common(1)[0][0]
        raise TuneSetupError(
            f"tune.space: {self.max_rejections} invalid samples in a row (most often: {top}); narrow the ranges"
        )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.inner is not None and trial_id in self.inner_ids:
            self.inner.on_trial_result(self.inner_ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if self.inner is not None and trial_id in self.inner_ids:
            self.inner.on_trial_complete(self.inner_ids.pop(trial_id), result=result, error=error)

    # -- checkpointing: Tuner.restore must not repeat seeds or re-draw finished samples --------------

    def get_state(self) -> dict:
        state = {
            "pending_seeds": self.pending_seeds,
            "rejections": dict(self.rejections),
            "suggested": self.suggested,
            "inner_ids": self.inner_ids,
            "rng_state": self.rng_state,
        }
        if self.inner is not None:
            with tempfile.TemporaryDirectory() as tmp:
                self.inner.save(os.path.join(tmp, "inner"))
                state["inner"] = base64.b64encode(Path(tmp, "inner").read_bytes()).decode()
        return state

    def set_state(self, state: dict) -> None:
        self.pending_seeds = [tuple(s) for s in state["pending_seeds"]]
        self.rejections = Counter(state["rejections"])
        self.suggested = state["suggested"]
        self.inner_ids, self.rng_state = state["inner_ids"], state["rng_state"]
        if self.inner is not None and state.get("inner"):
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "inner").write_bytes(base64.b64decode(state["inner"]))
                self.inner.restore(os.path.join(tmp, "inner"))  # Ray's own OptunaSearch format, written by us

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))


def valid_share(base: dict, cfg: ExperimentConfig, draws: int = 300) -> tuple[float, Counter]:
    """The share of uniformly random samples of the space that make valid trials, with the reasons of
    the rest: a space that is (almost) all impossible fails here, before any cluster time is spent."""
    random_cfg = cfg.tune.model_copy(update={"algorithm": "random", "seeds": [], "num_samples": draws})
    probe = ScheduleSearcher(base, cfg.model_copy(update={"tune": random_cfg}))
    if not probe.space:
        return 1.0, Counter()
    reasons: Counter = Counter()
    for _ in range(draws):
        problem = probe._check(_decode(probe.space, probe._random_raw()))
        if problem is not None:
            reasons[problem] += 1
    return 1.0 - sum(reasons.values()) / draws, reasons
