"""`ParetoHalving`, the Tune scheduler of a multi-fidelity sweep: it runs in the driver and applies the
pure promotion rules of `rungs` to each trial's result as the trial reports it."""

from __future__ import annotations

import math
from typing import Optional

from ray.tune.schedulers import FIFOScheduler

from hidrop_platform.tracking import names as N
from hidrop_platform.tune.rungs import RungPoint, goes_on


class ParetoHalving(FIFOScheduler):
    """Multi-fidelity promotion for rung-evaluated trials (hidrop_platform.tune.rungs): at each rung below
    the last, a trial goes on only if `promotion` keeps it among the trials that reached that rung so far
    ("halving": it ranks in the best 1/factor by what it adds to the front; "interval": it is not behind
    the front beyond its interval, and at the last promotion also ranks in the best 1/factor). Seeds
    always go on when `promote_seeds` is on."""

    # class defaults: a sweep started before these fields existed unpickles its scheduler without them
    promotion: str = "halving"
    ceiling: Optional[float] = None

    def __init__(
        self,
        rungs: int,
        factor: int,
        promote_seeds: bool,
        by_score: bool = False,
        promotion: str = "halving",
        ceiling: Optional[float] = None,  # the unpruned model's vision TFLOPs: the hypervolume's reference
    ):
        super().__init__()
        self.rungs, self.factor, self.promote_seeds, self.promotion = rungs, factor, promote_seeds, promotion
        self.ceiling = None if by_score else ceiling
        self.by_score = by_score  # objective "score": rank by relative score alone
        self.seen: dict[int, dict[str, RungPoint]] = {}  # rung -> trial id -> its point
        self.stopped: list[str] = []

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        rung = int(result.get(N.RUNG, 0))
        score, cost = result.get(N.RELATIVE_SCORE), result.get(N.VISION_TFLOPS)
        if rung < 1 or cost is None:
            return self.CONTINUE
        # an undefined score (a reference at 0 on a small rung) ranks last rather than stopping the sweep
        score = float(score) if score is not None and math.isfinite(float(score)) else -math.inf
        point = RungPoint(
            score=score,
            cost=0.0 if self.by_score else float(cost),
            low=result.get(N.RELATIVE_SCORE_LOW),
            high=result.get(N.RELATIVE_SCORE_HIGH),
            blind=result.get(N.BLIND_RELATIVE),
        )
        at_rung = self.seen.setdefault(rung, {})
        rivals = [p for t, p in at_rung.items() if t != trial.trial_id]
        at_rung[trial.trial_id] = point
        if rung >= self.rungs or (trial.config.get("seed") and self.promote_seeds):
            return self.CONTINUE
        if goes_on(point, rivals, self.factor, self.promotion, rung == self.rungs - 1, self.ceiling):
            return self.CONTINUE
        self.stopped.append(trial.trial_id)
        return self.STOP
