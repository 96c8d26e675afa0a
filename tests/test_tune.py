"""Schedule search: the curve form against brute force, the searcher's validity guarantee and resume state,
the Pareto front against a brute-force definition, and (slow) real Ray Tune sweeps on a tiny model with
MLflow: one nested run per trial, a failing trial retried, an interrupted sweep resumed."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hidrop.schedule import ScheduleError, hidrop, keep_curve, pyramid, spread_layers
from hidrop_platform.config.loader import ConfigError, load_config_data, validate_config, with_overrides
from hidrop_platform.tune.pareto import pareto_front

ROOT = Path(__file__).resolve().parents[1]


# ---- the curve form --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,layers", [("tok48", [10, 14, 16, 18]), ("tok64", [10, 14, 16, 18]), ("tok80", [10, 13, 16, 19])]
)
def test_pyramid_reproduces_hidrop_from_its_average(variant, layers):
    target = {"tok48": 48.0, "tok64": 64.0, "tok80": 80.03}[variant]
    s = pyramid(32, 576, inject_layer=9, exit_layer=25, drop_layers=layers, avg_tokens=target, tail_keeps=[10, 5, 1])
    assert s.tokens_per_layer() == hidrop(variant).tokens_per_layer()


def test_avg_tokens_solver_matches_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        n_layers, n_vis = rng.randint(8, 32), rng.choice([16, 64, 196, 576])
        inject = rng.randint(1, n_layers // 2)
        exit_layer = rng.randint(inject + 3, n_layers + 1)
        exit_layer = None if exit_layer > n_layers else exit_layer
        end = n_layers + 1 if exit_layer is None else exit_layer
        stages = rng.randint(1, min(4, end - 1 - inject))
        decay = rng.uniform(0.05, 0.9)
        kw = dict(inject_layer=inject, exit_layer=exit_layer, stages=stages, keep_decay=decay)
        # brute force: every admissible first keep, the closest average (ties: the smaller keep)
        options = []
        for first in range(stages, n_vis):
            try:
                options.append(_with_first(n_layers, n_vis, first, **kw))
            except ScheduleError:
                continue
        target = rng.uniform(min(o.avg_tokens() for o in options), max(o.avg_tokens() for o in options))
        best = min(options, key=lambda o: (abs(o.avg_tokens() - target), o.keep_counts[0]))
        got = pyramid(n_layers, n_vis, avg_tokens=target, **kw)
        assert abs(got.avg_tokens() - target) == pytest.approx(abs(best.avg_tokens() - target))


def _with_first(n_layers, n_vis, first, inject_layer, exit_layer, stages, keep_decay):
    from hidrop.schedule import DropEvent, Schedule

    end = n_layers + 1 if exit_layer is None else exit_layer
    keeps = keep_curve(first, stages, keep_decay)
    drops = tuple(DropEvent(after_layer=l, keep=k) for l, k in zip(spread_layers(inject_layer, end, stages), keeps))
    return Schedule(
        num_layers=n_layers, num_vision_tokens=n_vis, inject_layer=inject_layer, exit_layer=exit_layer, drops=drops
    )


def test_spread_layers_and_keep_curve_always_valid():
    for inject, end, stages in itertools.product(range(1, 6), range(3, 12), range(0, 6)):
        if stages > end - 1 - inject:
            with pytest.raises(ScheduleError, match="do not fit"):
                spread_layers(inject, end, stages)
            continue
        layers = spread_layers(inject, end, stages)
        assert layers == sorted(set(layers)) and all(inject <= l <= end - 2 for l in layers)
    for first, stages, decay in itertools.product([4, 9, 100], range(1, 5), [0.01, 0.3, 0.5, 0.99]):
        if first < stages:
            continue
        keeps = keep_curve(first, stages, decay)
        assert keeps[0] == first and all(a > b >= 1 for a, b in zip(keeps, keeps[1:]))


def test_curve_errors_name_the_problem():
    with pytest.raises(ScheduleError, match="avg_tokens=10 is unreachable"):
        pyramid(
            32, 576, inject_layer=5, exit_layer=28, drop_layers=[10, 14, 16, 18], avg_tokens=10, tail_keeps=[10, 5, 1]
        )
    with pytest.raises(ScheduleError, match="exactly one of first_keep_ratio / avg_tokens"):
        pyramid(32, 576, stages=2)
    with pytest.raises(ScheduleError, match="tail_keeps has 1 entries"):
        pyramid(32, 576, stages=3, first_keep_ratio=0.5, tail_keeps=[4])


def _tiny(tmp_path, **tune) -> dict:
    data = {
        "name": "tiny_tune",
        "model": {"kind": "tiny_llava"},
        "schedule": {"inject_layer": 2, "exit_layer": 7, "stages": 2, "first_keep_ratio": 0.5},
        "eval": {"benchmarks": [{"name": "easy_vqa", "limit": 8}], "baselines": [], "batch_size": 8},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "tune": {
            "algorithm": "random",
            "num_samples": 3,
            "seeds": ["vanilla"],
            "storage_path": str(tmp_path / "runs"),
            "space": {
                "schedule.inject_layer": {"int": [1, 6]},
                "schedule.exit_layer": {"int": [3, 8]},
                "schedule.stages": {"int": [1, 3]},
                "schedule.first_keep_ratio": {"float": [0.1, 0.9]},
            },
        },
    }
    data["tune"].update(tune)
    return data


def test_curve_form_in_yaml_and_config_errors(tmp_path):
    cfg = validate_config(_tiny(tmp_path))
    assert [d.after_layer for d in cfg.main_schedule.drops] == [2, 4] and cfg.main_schedule.keep_counts == [8, 4]
    bad = [
        ({"schedule": {"drops": [{"after_layer": 3, "keep": 4}], "stages": 1, "first_keep_ratio": 0.5}}, "not both"),
        ({"tune": {"space": {"schedule.nope": {"int": [1, 2]}}}}, "does not name a config field"),
        ({"tune": {"space": {"schedule.stages": {"int": [3, 1]}}}}, "low > high"),
        (
            {"tune": {"space": {"schedule.stages": {"int": [1, 3], "choice": [1]}}}},
            "exactly one of choice / int / float",
        ),
        (
            {"tune": {"algorithm": "grid", "space": {"schedule.first_keep_ratio": {"float": [0.1, 0.5]}}}},
            "grid search needs",
        ),
        ({"tune": {"objective": "score"}}, "needs max_vision_tflops"),
    ]
    for patch, msg in bad:
        data = _tiny(tmp_path)
        for section, value in patch.items():
            data[section] = {**data[section], **value} if section == "tune" else value
        with pytest.raises(ConfigError, match=msg):
            validate_config(data)


def test_every_experiment_search_space_produces_valid_trials():
    from hidrop_platform.tune.searcher import ScheduleSearcher
    from hidrop_platform.tune.space import trial_config

    searched = 0
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        base = load_config_data(path)
        cfg = validate_config(base, str(path))
        if not cfg.tune.space:
            continue
        searched += 1
        searcher = ScheduleSearcher(base, cfg)
        for i in range(len(cfg.tune.seeds) + 3):
            s = searcher.suggest(f"t{i}")
            trial_config(base, s["overrides"])
            searcher.on_trial_complete(f"t{i}", result={"relative_score": 90.0, "vision_tflops": 0.1 * (i + 1)})
    assert searched >= 2  # the mini-LLaVA search and the paper-scale one


# ---- the searcher ----------------------------------------------------------------------------------


def _suggest_all(searcher, limit=200):
    out = []
    for i in range(limit):
        s = searcher.suggest(f"t{i}")
        if s == searcher.FINISHED:
            break
        assert s is not None
        out.append(s)
        searcher.on_trial_complete(f"t{i}", result={"relative_score": 50.0 + i, "vision_tflops": 1.0 / (i + 1)})
    return out


@pytest.mark.parametrize("algorithm", ["random", "optuna"])
def test_searcher_only_suggests_valid_schedules_and_counts_rejections(tmp_path, algorithm):
    from hidrop_platform.tune.searcher import ScheduleSearcher
    from hidrop_platform.tune.space import trial_config

    base = _tiny(tmp_path, algorithm=algorithm, num_samples=12, seeds=["vanilla", "fastv"])
    searcher = ScheduleSearcher(base, validate_config(base))
    got = _suggest_all(searcher)
    assert [s["label"] for s in got[:2]] == ["seed:vanilla", "seed:fastv"]
    assert len(got) == 14 and len({s["label"] for s in got}) == 14
    for s in got:  # each one validates; none is a leftover invalid sample
        trial_config(base, s["overrides"])
    # the space has many impossible corners (exit before inject, too many stages for the window)
    assert sum(searcher.rejections.values()) > 0
    assert any("exit_layer" in r or "do not fit" in r for r in searcher.rejections)


def test_grid_enumerates_exactly_the_valid_points(tmp_path):
    from hidrop_platform.tune.searcher import ScheduleSearcher

    space = {
        "schedule.inject_layer": {"int": [1, 5]},
        "schedule.exit_layer": {"choice": [4, 6, None]},
        "schedule.stages": {"int": [1, 3]},
        "schedule.first_keep_ratio": {"choice": [0.25, 0.75]},
    }
    base = _tiny(tmp_path, algorithm="grid", space=space, seeds=[])
    searcher = ScheduleSearcher(base, validate_config(base))
    got = _suggest_all(searcher)
    brute = 0
    for inject, exit_layer, stages, ratio in itertools.product(range(1, 6), [4, 6, None], range(1, 4), [0.25, 0.75]):
        data = with_overrides(
            base,
            {
                "schedule.inject_layer": inject,
                "schedule.exit_layer": exit_layer,
                "schedule.stages": stages,
                "schedule.first_keep_ratio": ratio,
            },
        )
        try:
            validate_config(data)
            brute += 1
        except ConfigError:
            pass
    assert len(got) == brute and sum(searcher.rejections.values()) == 5 * 3 * 3 * 2 - brute


def test_score_objective_rejects_schedules_over_the_budget_before_they_run(tmp_path):
    from hidrop.cost import cost_report
    from hidrop_platform.tune.searcher import ScheduleSearcher
    from hidrop_platform.tune.space import trial_config

    base = _tiny(tmp_path, objective="score", max_vision_tflops=1.5e-6, num_samples=6, seeds=[])
    searcher = ScheduleSearcher(base, validate_config(base))
    for s in _suggest_all(searcher):
        cfg = trial_config(base, s["overrides"])
        assert cost_report(cfg.main_schedule, cfg.model.shape)["vision_tflops"] <= 1.5e-6
    assert any("budget" in r for r in searcher.rejections)


@pytest.mark.parametrize("algorithm", ["random", "optuna"])
def test_searcher_state_round_trip_continues_without_repeats(tmp_path, algorithm):
    from hidrop_platform.tune.searcher import ScheduleSearcher

    base = _tiny(tmp_path, algorithm=algorithm, num_samples=6, seeds=["vanilla", "pdrop"])
    full = _suggest_all(ScheduleSearcher(base, validate_config(base)))
    first = ScheduleSearcher(base, validate_config(base))
    head = [first.suggest(f"t{i}") for i in range(3)]
    for i in range(3):
        first.on_trial_complete(f"t{i}", result={"relative_score": 50.0 + i, "vision_tflops": 1.0 / (i + 1)})
    first.save(str(tmp_path / "state.json"))
    second = ScheduleSearcher(base, validate_config(base))
    second.restore(str(tmp_path / "state.json"))
    tail = []
    for i in range(3, 50):
        s = second.suggest(f"t{i}")
        if s == second.FINISHED:
            break
        tail.append(s)
        second.on_trial_complete(f"t{i}", result={"relative_score": 50.0 + i, "vision_tflops": 1.0 / (i + 1)})
    labels = [s["label"] for s in head + tail]
    assert labels == [s["label"] for s in full] and len(set(labels)) == len(labels)
    if algorithm == "random":  # the same stream of samples, as if never interrupted
        assert [s["overrides"] for s in head + tail] == [s["overrides"] for s in full]


# ---- the Pareto front ------------------------------------------------------------------------------


def test_pareto_front_against_brute_force():
    assert pareto_front([(90, 1.0), (80, 0.5), (85, 2.0), (90, 1.0), (70, 0.5)]) == [1, 0, 3]
    rng = random.Random(1)
    for _ in range(50):
        pts = [(rng.choice([50, 60, 70, 80, 90]), rng.choice([0.1, 0.2, 0.3, 0.4])) for _ in range(rng.randint(1, 25))]
        brute = {
            i for i, (s, c) in enumerate(pts) if not any((s2 >= s and c2 <= c) and (s2, c2) != (s, c) for s2, c2 in pts)
        }
        assert set(pareto_front(pts)) == brute


def test_sweep_summary_counts_only_outcomes_on_the_front():
    from hidrop_platform.tune.summary import TrialRecord, summarize_sweep

    def trial(label, status, score, tflops, **kw):
        metrics = {"relative_score": score, "vision_tflops": tflops, "accelerator_hours": 0.5, "score/a": score}
        return TrialRecord.from_metrics(label, status, {k: v for k, v in metrics.items() if v is not None}, **kw)

    records = [
        trial("b", "finished", 90.0, 1.0),
        trial("a", "finished", 80.0, 0.5),
        trial("dead", "failed", 99.0, 0.1),  # its last metrics look best, but it is no outcome
        trial("stopped", "stopped_early", 95.0, 2.0),  # ASHA stopped it after an evaluation: an outcome
        trial("twin", "finished", 90.0, 1.0),  # equal points are all kept
        trial("worse", "finished", 70.0, 2.0),
        trial("seed:vanilla", "finished", 100.0, 3.0, seed=True),
        trial("unscored", "finished", None, 0.2),
    ]
    summary = summarize_sweep(records, {"a": 50.0, "b": 40.0}, {"a": 25.0, "b": 30.0})
    assert summary.pareto == ["a", "b", "twin", "stopped", "seed:vanilla"]  # cheapest first
    assert {t.label for t in summary.trials if t.pareto} == set(summary.pareto)
    assert summary.failed == 1 and summary.accelerator_hours == pytest.approx(4.0)
    assert summary.blind_relative_score == pytest.approx(100 * (25 / 50 + 30 / 40) / 2)
    assert [t.label for t in summary.trials][:2] == ["seed:vanilla", "dead"]  # seeds first, then by cost
    assert {t.label for t in summary.outcomes()} == {"a", "b", "twin", "stopped", "worse", "seed:vanilla"}
    row = summary.trials[0].to_dict()
    assert row["scores"] == {"a": 100.0} and row["seed"] is True and "model_tflops" not in row
    assert summarize_sweep([], {"a": 0.0}, {"a": 1.0}).blind_relative_score is None  # undefined ratio


# ---- real sweeps (Ray Tune + MLflow) ---------------------------------------------------------------


def _runs(db: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tiny_tune")
    return client.search_runs([exp.experiment_id], max_results=1000), client


def _cli(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "hidrop_platform.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        **kw,
    )


def _cli_at_once(*commands, cwd, timeout=600):
    """`_cli` for each of `commands`, run side by side; their CompletedProcess in the same order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hidrop_platform.cli", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        for args in commands
    ]
    done = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return done


@pytest.mark.slow
def test_sweep_completes_with_one_nested_run_per_trial_and_a_failing_trial_retried(tmp_path):
    exp = tmp_path / "tune.yaml"
    exp.write_text(yaml.safe_dump(_tiny(tmp_path, seeds=["vanilla", "hidrop_tok64"], num_samples=3)))
    proc = _cli("tune", str(exp), "--json", cwd=tmp_path, env={"HIDROP_TEST_FAIL_TRIAL": "trial-002"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    assert len(summary["trials"]) == 5 and summary["failed"] == 0
    assert summary["pareto"] and set(summary["pareto"]) <= {t["label"] for t in summary["trials"]}
    runs, client = _runs(tmp_path / "mlflow.db")
    parent = [r for r in runs if r.data.tags.get("hidrop.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("hidrop.kind") != "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in trials) == sorted(t["label"] for t in summary["trials"])
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id and r.info.status == "FINISHED"
        assert {"relative_score", "vision_tflops", "avg_vision_tokens", "accelerator_hours"} <= set(r.data.metrics)
    failed_once = next(r for r in trials if r.info.run_name == "trial-002")
    assert failed_once.data.tags["attempts"] == "2"  # the retry logged into the same run
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id, "pareto")}
    assert {"pareto/pareto.png", "pareto/pareto.md", "pareto/sweep.json"} <= arts
    # the vanilla seed is the reference itself
    vanilla = next(t for t in summary["trials"] if t["label"] == "seed:vanilla")
    assert vanilla["relative_score"] == pytest.approx(100.0)


def start_sweep(exp, cwd, *args, until=None, **popen):
    """`hidrop tune EXP` in its own session (signals reach it alone; killpg takes Ray's processes too),
    returned once `until(trial_runs folder)` holds: by default, three trials have started."""
    runs_dir = cwd / "runs" / "tiny_tune" / "trial_runs"
    until = until or (lambda folder: len(list(folder.glob("*.json"))) >= 3)
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hidrop_platform.cli", "tune", str(exp), *args],
        cwd=cwd,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        **popen,
    )
    deadline = time.time() + 900  # a hang guard sized for a loaded machine
    while time.time() < deadline and not until(runs_dir):
        assert proc.poll() is None, proc.communicate()  # ended before the point the caller acts at
        time.sleep(0.2)
    assert until(runs_dir), "the sweep never reached the point the test acts at"
    return proc


def _session_processes(sid: int, patience_s: float = 120.0) -> list[str]:
    """The processes still in session `sid` once they have had time to exit: Ray's helpers end a moment
    after the driver (seen on a loaded machine), so wait for them; only one that never ends is left over."""
    deadline = time.monotonic() + patience_s  # a hang guard, not a speed requirement
    while True:
        left = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _finished_points(folder: Path) -> int:
    """Trial records in `trial_runs/` that hold a result."""
    return sum("result" in p.read_text() for p in folder.glob("*.json"))


@pytest.mark.slow
def test_interrupted_then_killed_sweep_resumes_without_rerunning_or_duplicating(tmp_path):
    """One sweep through both ways of being stopped (one scenario: three sweep runs instead of four): three
    quick Ctrl+C (one line, no process left behind), a resume SIGKILLed with its whole session (the driver
    and Ray's processes), and a last resume that finishes: every trial exactly once, and a trial finished
    before a stop is never evaluated again."""
    exp = tmp_path / "tune.yaml"
    # 12 trials of about a second each: enough left after the third starts that Ctrl+C cannot arrive after
    # the last one (a sweep that finishes before the signal lands rightly exits 0)
    exp.write_text(yaml.safe_dump(_tiny(tmp_path, seeds=["vanilla"], num_samples=11, max_concurrent=1)))
    proc = start_sweep(exp, tmp_path, "--json")
    for _ in range(3):  # an impatient user: the 2nd and 3rd Ctrl+C land while the first is being handled
        proc.send_signal(signal.SIGINT)
        time.sleep(0.6)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "--resume" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    leftover = _session_processes(proc.pid)
    assert not leftover, f"processes of the sweep's session still running: {leftover}"
    runs, _ = _runs(tmp_path / "mlflow.db")
    done_before = {
        r.info.run_id for r in runs if r.info.status == "FINISHED" and r.data.tags.get("hidrop.kind") != "sweep"
    }
    assert 1 <= len(done_before) < 12

    runs_dir = tmp_path / "runs" / "tiny_tune" / "trial_runs"
    before_kill = _finished_points(runs_dir)
    killed = start_sweep(
        exp,
        tmp_path,
        "--resume",
        "--json",
        until=lambda f: _finished_points(f) >= before_kill + 2,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=300)
    assert before_kill + 2 <= _finished_points(runs_dir) < 12

    again = _cli("tune", str(exp), "--resume", "--json", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout[again.stdout.index("{\n") :])
    runs, client = _runs(tmp_path / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("hidrop.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("hidrop.kind") != "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    names = [r.info.run_name for r in trials]
    assert len(summary["trials"]) == 12 and len(names) == 12 and len(set(names)) == 12  # every trial exactly once
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert len(client.get_metric_history(r.info.run_id, "relative_score")) == 1  # evaluated once


def test_sweep_folder_never_holds_the_tracking_password(tmp_path, monkeypatch):
    """Trials get MLflow basic auth from the driver's actor, not from the pickled trial context: Tune
    writes that context into the sweep folder (tuner.pkl holds the progress callback)."""
    import pickle

    import ray
    from ray import cloudpickle

    from hidrop_platform.config.credentials import move_credentials_to_env as credentials_to_env
    from hidrop_platform.config.credentials import tracking_credentials
    from hidrop_platform.tune.credentials import fetch_credentials, share_credentials
    from hidrop_platform.tune.driver import _ProgressAndRunCloser, _tuner
    from hidrop_platform.tune.searcher import ScheduleSearcher
    from hidrop_platform.tune.trial import TrialContext

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "placeholder")  # restored after the test
        monkeypatch.delenv(key)
    # workers start without the secret in their environment: only the actor can hand it over (a fresh
    # local Ray: one an earlier test started in this process has workers from before these variables)
    ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        uri = credentials_to_env("HTTP://alice:pw-Zq81x@127.0.0.1:9")  # an upper-case scheme too
        assert uri == "http://127.0.0.1:9"
        data = _tiny(tmp_path)
        data["tracking"]["uri"] = uri
        cfg = validate_config(data)
        sweep_dir = tmp_path / "runs" / "tiny_tune"
        name, holder = share_credentials(tracking_credentials())
        ctx = TrialContext(
            base=data, reference={}, sweep_dir=str(sweep_dir), sweep="tiny_tune", tracking_uri=uri,
            experiment="x", parent_run_id=None, tracking=True, spool_dir=str(tmp_path), threads=1,
            devices_per_trial=0, device_type="cpu", credentials_from=name,
        )  # fmt: skip
        searcher = ScheduleSearcher(data, cfg)
        _tuner(cfg, ctx, searcher, _ProgressAndRunCloser(None, searcher.total_trials, ctx), 1, False)
        assert (sweep_dir / "tuner.pkl").is_file()
        written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
        written += [cloudpickle.dumps(ctx), pickle.dumps(_ProgressAndRunCloser(None, 1, ctx))]
        assert not [w for w in written if b"pw-Zq81x" in w]
        in_worker = ray.remote(lambda n: (fetch_credentials(n), os.environ.get("MLFLOW_TRACKING_PASSWORD")))
        got = ray.get(in_worker.remote(name))
        assert got == ({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "pw-Zq81x"}, None)
        assert share_credentials({}) == (None, None) and fetch_credentials(None) == {}
        del holder
    finally:
        ray.shutdown()


def test_tune_cli_errors_are_one_line(tmp_path):
    exp = tmp_path / "tune.yaml"
    data = _tiny(tmp_path, resources_per_trial={"CPU": 1, "GPU": 1})
    exp.write_text(yaml.safe_dump(data))
    # three independent mistakes, refused side by side (each process mostly starts up)
    resume, gpu, bad = _cli_at_once(
        ("tune", str(exp), "--resume"),
        ("tune", str(exp)),
        ("tune", str(exp), "tune.space.schedule.stages.int=[3,1]"),
        cwd=tmp_path,
    )
    assert resume.returncode == 2 and "nothing to resume" in resume.stderr and "Traceback" not in resume.stderr
    assert gpu.returncode == 2, gpu.stderr[-2000:]
    assert "asks for CPU=1, GPU=1 on one node, but no node has that" in gpu.stderr, gpu.stderr[-2000:]
    assert bad.returncode == 2 and "low > high" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_trained_sweep_finetunes_each_trial_under_asha(tmp_path):
    data = _tiny(tmp_path, kind="trained", seeds=["vanilla"], num_samples=3, train_steps=4, eval_every=2, align_steps=2)
    data["train"] = {
        "stage": "finetune",
        "data": [{"name": "easy_vqa", "limit": 32}],
        "micro_batch_size": 4,
        "lr": 3.0e-3,
        "warmup_ratio": 0.0,
        "lr_schedule": "constant",
    }
    exp = tmp_path / "tune.yaml"
    exp.write_text(yaml.safe_dump(data))
    proc = _cli("tune", str(exp), "--json", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    assert len(summary["trials"]) == 4 and summary["failed"] == 0
    assert all(t["train_step"] in (2, 4) for t in summary["trials"])  # ASHA may stop a trial after its first evaluation
    runs, client = _runs(tmp_path / "mlflow.db")
    trials = [r for r in runs if r.data.tags.get("hidrop.kind") != "sweep"]
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.tags["status"] in ("finished", "stopped_early")
        losses = client.get_metric_history(r.info.run_id, "loss")
        assert len(losses) >= 2 and all(math.isfinite(m.value) for m in losses)
        aligned = client.get_metric_history(r.info.run_id, "align_loss")  # stage 1 ran first, its 2 steps
        assert sorted(m.step for m in aligned) == [1, 2] and all(math.isfinite(m.value) for m in aligned)


def test_a_trained_trial_aligns_the_projector_alone_first(tmp_path):
    """`tune.align_steps`: stage 1 trains the projector (and nothing of the LM) with the trial's schedule
    active, logging each step's loss; 0 trains nothing; only trained trials take it."""
    from hidrop.tiny import tiny_vlm
    from hidrop.training import make_dataset
    from hidrop_platform.train.worker import training_samples
    from hidrop_platform.tune.trial import align_projector

    data = _tiny(tmp_path, kind="trained", train_steps=2, eval_every=1, align_steps=3)
    data["train"] = {"stage": "finetune", "data": [{"name": "easy_vqa", "limit": 16}], "micro_batch_size": 4,
                     "lora": {"r": 4}}  # fmt: skip
    cfg = validate_config(data)
    vlm = tiny_vlm(seed=0)
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    dataset = make_dataset(vlm, training_samples(cfg, vlm.grid), template=cfg.train.template)

    class Tracker:
        logged: list = []

        def log_metrics(self, metrics, step):
            self.logged.append((step, *metrics))

    align_projector(cfg, vlm, dataset, Tracker())
    assert Tracker.logged == [(1, "align_loss"), (2, "align_loss"), (3, "align_loss")]
    after = dict(vlm.model.named_parameters())
    assert after.keys() == before.keys()  # no LoRA adapters in stage 1
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("projector" in n for n in changed), sorted(changed)
    Tracker.logged.clear()
    align_projector(validate_config({**data, "tune": {**data["tune"], "align_steps": 0}}), vlm, dataset, Tracker())
    assert Tracker.logged == []
    with pytest.raises(ValueError, match="tune.align_steps applies to trained trials"):
        validate_config({**data, "tune": {**data["tune"], "kind": "training_free"}})


def test_an_all_impossible_space_fails_before_any_trial(tmp_path):
    from hidrop_platform.tune.driver import run_tune
    from hidrop_platform.tune.errors import TuneSetupError
    from hidrop_platform.tune.searcher import valid_share

    base = _tiny(tmp_path)
    share, reasons = valid_share(base, validate_config(base))
    assert 0.0 < share < 1.0 and reasons  # the tiny space mixes valid and impossible corners
    base = _tiny(tmp_path, space={"schedule.exit_layer": {"int": [1, 2]}, "schedule.stages": {"int": [1, 2]}})
    with pytest.raises(TuneSetupError, match="none of 300 random samples is a valid schedule"):
        run_tune(validate_config(base), base)
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_significant_front_against_brute_force():
    from hidrop_platform.tune.pareto import significant_front

    rng = random.Random(2)
    for _ in range(200):
        n = rng.randint(1, 12)
        pts = [(rng.uniform(40, 100), rng.choice([0.1, 0.2, 0.3, 0.4, 0.5])) for _ in range(n)]
        ivs = [None if rng.random() < 0.1 else (s - rng.uniform(0, 15), s + rng.uniform(0, 15)) for s, _ in pts]
        est = set(pareto_front(pts))

        def high(j):
            return pts[j][0] if ivs[j] is None else ivs[j][1]

        def rivalled(i):
            return any(pts[j][1] <= pts[i][1] and high(j) >= ivs[i][0] for j in range(n) if j != i)

        brute = {i for i in est if ivs[i] is not None and not rivalled(i)}
        got = significant_front(pts, ivs)
        assert set(got) == brute and set(got) <= est
    # a clear step up: the dearer point is significant only once its interval clears the cheaper one's
    assert significant_front([(60, 0.1), (90, 0.5)], [(55, 65), (85, 95)]) == [0, 1]
    assert significant_front([(60, 0.1), (90, 0.5)], [(55, 70), (68, 99)]) == [0]


def test_a_blind_level_trial_is_tagged_and_never_a_discovery():
    from hidrop_platform.tune.summary import TrialRecord, front_mark, summarize_sweep

    def trial(label, score, lo, hi, tflops, blind_level, seed=False):
        metrics = {
            "relative_score": score,
            "relative_score_lo": lo,
            "relative_score_hi": hi,
            "blind_level": float(blind_level),
            "vision_tflops": tflops,
            "score/a": score,
        }
        return TrialRecord.from_metrics(label, "finished", metrics, seed=seed)

    records = [
        trial("cheap-noise", 55.0, 30.0, 75.0, 0.05, True),  # cheapest, so on the front: but blind level
        trial("good", 85.0, 80.0, 90.0, 0.3, False),
        trial("better", 97.0, 93.0, 100.0, 0.6, False),
        trial("seed:vanilla", 100.0, 100.0, 100.0, 1.0, False, seed=True),
    ]
    s = summarize_sweep(records, {"a": 50.0}, {"a": 25.0}, [40.0, 60.0])
    assert s.pareto == ["cheap-noise", "good", "better", "seed:vanilla"]
    assert s.blind_level == ["cheap-noise"] and "cheap-noise" not in s.discoveries()
    assert s.discoveries() == ["good", "better"]  # searched, above blind (seeds are no discoveries)
    # each clears every cheaper interval; vanilla's 100 is reached by "better"'s upper bound: not clear
    assert s.significant == ["good", "better"]
    marks = {t.label: front_mark(t) for t in s.trials}
    assert marks == {"cheap-noise": "blind level", "good": "clear", "better": "clear", "seed:vanilla": "yes"}
    assert s.blind_relative_interval == [40.0, 60.0]


# ---- multi-fidelity search and held-out confirmation --------------------------------------------------


def test_rung_subsets_are_nested_keep_units_whole_and_unseen_drops_seen_units():
    from hidrop.evaluation.paper import MMBench
    from hidrop.evaluation.registry import Benchmark
    from hidrop.evaluation.subsets import rung_select, unit_order, unseen_select
    from hidrop.sample import Sample

    plain = Benchmark()
    plain.name = "plain"
    samples = [Sample(id=f"q{i}", conversations=()) for i in range(90)]
    rungs = [rung_select(r, 3, 3, seed=0)(plain, samples) for r in (1, 2, 3)]
    assert [len(x) for x in rungs] == [10, 30, 90]
    assert {s.id for s in rungs[0]} <= {s.id for s in rungs[1]} <= {s.id for s in rungs[2]}
    assert rung_select(1, 3, 3, seed=1)(plain, samples) != rungs[0]  # the order is seeded
    # circular groups stay whole in every rung
    mmb = MMBench(root="/nonexistent")
    grouped = [Sample(id=f"g{i // 4}-{i % 4}", conversations=(), meta={"group": i // 4}) for i in range(40)]
    units = {mmb.unit(s) for s in grouped}
    assert len(units) == 10 and len(unit_order(mmb, grouped, 0)) == 10
    first = rung_select(1, 2, 3, seed=0)(mmb, grouped)
    per_unit = {}
    for s in first:
        per_unit[mmb.unit(s)] = per_unit.get(mmb.unit(s), 0) + 1
    assert len(first) == 16 and set(per_unit.values()) == {4}  # ceil(10 / 3) = 4 whole groups
    kept = unseen_select({"plain": [s.id for s in rungs[1]]})(plain, samples)
    assert len(kept) == 60 and not {s.id for s in kept} & {s.id for s in rungs[1]}
    half_seen = unseen_select({mmb.name: ["g0-1"]})(mmb, grouped)
    assert len(half_seen) == 36 and not any(s.id.startswith("g0-") for s in half_seen)


def test_pareto_halving_and_hypervolume_against_brute_force():
    from hidrop_platform.tune.rungs import RungPoint, goes_on, hypervolume, pareto_layers, promoted

    rng = random.Random(5)
    for _ in range(100):
        pts = [(rng.uniform(0, 100), rng.choice([0.1, 0.2, 0.3, 0.4])) for _ in range(rng.randint(1, 15))]
        layers = pareto_layers(pts)
        for i, (s, c) in enumerate(pts):  # a point's layer is one more than the deepest point dominating it
            above = [layers[j] for j, (s2, c2) in enumerate(pts) if s2 >= s and c2 <= c and (s2, c2) != (s, c)]
            assert layers[i] == (max(above) + 1 if above else 0)
        keep = promoted(pts, 3)
        assert len(keep) == math.ceil(len(pts) / 3)
        dropped = [layers[i] for i in range(len(pts)) if i not in keep]
        assert not dropped or max(layers[i] for i in keep) <= min(dropped)  # no kept point below a dropped one
        # hypervolume: area of the union of [cost, 1] x [0, score] boxes, on a fine grid
        grid = 200
        hits = sum(
            any(c <= (x + 0.5) / grid and s >= (y + 0.5) / grid * 100 for s, c in pts)
            for x in range(grid)
            for y in range(grid)
        )
        assert hypervolume(pts, max_cost=1.0) == pytest.approx(hits / grid / grid * 100, abs=1.5)
    P = RungPoint
    assert goes_on(P(90, 0.1), [P(50, 0.5), P(60, 0.4), P(100, 1.0)], 4)  # dominates both: first of four
    assert not goes_on(P(40, 0.5), [P(50, 0.5), P(60, 0.4), P(100, 1.0)], 4)
    # one cut of a front keeps the points that add the most area up to the unpruned cost 1.0: alone,
    # 70 x 0.8 beats 72 x 0.7 and 50 x 0.9; then (50, 0.1) adds 50 x 0.1 against 2 x 0.7 and 20 x 0.1
    assert promoted([(50, 0.1), (70, 0.2), (72, 0.3), (90, 0.9)], 2, ceiling=1.0) == [0, 1]


def test_front_order_is_greedy_hypervolume_over_every_point_and_blind_adds_nothing():
    """The greedy pass looks only at the front; a brute-force greedy over every point (dominated ones too)
    must take the same areas step by step. Above blind's score a blind-level cheap point adds nothing."""
    from hidrop_platform.tune.rungs import front_order, hypervolume, pareto_layers, promoted

    rng = random.Random(11)
    for _ in range(60):
        pts = [(rng.uniform(0, 100), rng.uniform(0, 1)) for _ in range(rng.randint(2, 12))]
        floor = rng.choice([0.0, 40.0])
        ceiling = rng.choice([1.0, None])  # the unpruned model's cost, or by default a tenth beyond the dearest
        order = front_order(pts, floor, ceiling)
        ceiling = ceiling or 1.1 * max(c for _, c in pts)
        assert sorted(order) == list(range(len(pts)))
        taken, area = [], 0.0
        while True:
            gains = {i: hypervolume([pts[k] for k in [*taken, i]], ceiling, floor) - area for i in range(len(pts))}
            best = max(gains.values())
            if best <= 1e-12:
                break
            assert gains[order[len(taken)]] == pytest.approx(best)  # each greedy step takes a best gain
            taken.append(order[len(taken)])
            area += best
        layers = pareto_layers(pts)
        rest = order[len(taken) :]
        assert [layers[i] for i in rest] == sorted(layers[i] for i in rest)  # then by layer
    # duplicates add nothing the second time, nor do a point at the reference cost or an undefined score
    edge = [(80, 0.5), (80, 0.5), (90, 1.0), (-math.inf, 0.1), (60, 0.2)]
    order = front_order(edge, 0.0, 1.0)
    assert order[0] == 4 and order[1] in (0, 1) and sorted(order) == list(range(5)) and order[-1] == 3
    with pytest.raises(ValueError, match="unknown promotion rule"):
        from hidrop_platform.tune.rungs import RungPoint, promote

        promote([RungPoint(1.0, 1.0)], 2, "best")
    cheap_blind, trade_off, middle, full = (50, 0.05), (80, 0.5), (60, 0.3), (100, 1.0)
    pts = [cheap_blind, trade_off, middle, full]
    assert promoted(pts, 2, ceiling=1.0) == [0, 1]  # above 0 the blind-level point adds 50 x 0.95
    assert promoted(pts, 2, floor=50.0, ceiling=1.0) == [1, 2]  # above blind it adds nothing


def test_interval_promotion_stops_only_trials_behind_the_front_and_caps_the_last_cut():
    from hidrop_platform.tune.rungs import RungPoint, behind_front, promote

    rng = random.Random(3)
    for _ in range(100):
        pts = []
        for _ in range(rng.randint(1, 12)):
            score = rng.uniform(30, 100)
            half = rng.uniform(2, 25)
            pts.append(RungPoint(score, rng.choice([0.1, 0.2, 0.5, 0.8]), score - half, score + half, blind=40.0))
        brute = [
            i
            for i, p in enumerate(pts)
            if not any(q.cost <= p.cost and q.score > p.high for j, q in enumerate(pts) if j != i)
        ]
        assert promote(pts, 3, "interval") == brute
        capped = promote(pts, 3, "interval", last=True)
        assert set(capped) <= set(brute) and len(capped) == min(len(brute), math.ceil(len(pts) / 3))
    unpruned = RungPoint(100.0, 1.0)  # no interval: never behind
    assert not behind_front(unpruned, [RungPoint(120.0, 0.1, 110.0, 130.0)])
    assert behind_front(RungPoint(50.0, 0.5, 40.0, 60.0), [RungPoint(61.0, 0.5, 50.0, 70.0)])
    assert not behind_front(RungPoint(50.0, 0.5, 40.0, 60.0), [RungPoint(90.0, 0.6, 80.0, 99.0)])  # dearer


def test_successive_halving_finds_a_planted_best_schedule_with_fewer_questions():
    """Synthetic candidates with known accuracies: the planted one (best score at a low cost) must reach the
    last rung and the front, for fewer scored questions than evaluating everything in full."""
    import numpy as np

    from hidrop_platform.tune.rungs import RungPoint, successive_halving

    n_full, rungs, factor = 810, 3, 3
    rng = np.random.default_rng(0)
    truth = {f"c{i}": (float(rng.uniform(0.4, 0.8)), float(rng.uniform(0.2, 1.0))) for i in range(27)}
    truth["planted"] = (0.9, 0.25)
    answers = {label: rng.random(n_full) < acc for label, (acc, _) in truth.items()}

    def evaluate(label, rung):
        n = n_full // factor ** (rungs - rung)
        acc, cost = truth[label]
        p = answers[label][:n].mean()
        half = 1.96 * math.sqrt(max(p * (1 - p), 1e-6) / n)  # the normal interval on a proportion
        score = 100 * p / 0.9
        earlier = n_full // factor ** (rungs - rung + 1) if rung > 1 else 0
        return RungPoint(score, cost, 100 * (p - half) / 0.9, 100 * (p + half) / 0.9, questions_run=n - earlier)

    exhaustive = n_full * len(truth)
    for rule in ("halving", "interval"):
        search = successive_halving(list(truth), evaluate, rungs, factor, rule=rule, ceiling=1.0)
        assert "planted" in search.completed()
        final = search.final()
        best = max(final, key=lambda k: final[k].score if k in search.completed() else -1)
        assert best == "planted"
        spent = sum(p.questions_run for p in search.every_point())
        if rule == "halving":
            assert spent <= exhaustive / 3  # 28 x 90 + 10 x 180 + 4 x 540 = 6480 of 22680
        else:  # every trial at rung 1 and 2 at worst, then a third: 28 x 270 + 10 x 540
            assert spent < exhaustive and spent <= 28 * 270 + 10 * 540
            assert any(len(pts) == 1 for pts in search.points.values())  # the hopeless stop at rung 1


@pytest.mark.slow
def test_multi_fidelity_sweep_stops_trials_and_confirms_on_unseen_questions(tmp_path):
    exp = tmp_path / "tune.yaml"
    data = _tiny(
        tmp_path,
        seeds=["vanilla", "hidrop_tok64"],
        num_samples=5,
        fidelity={"rungs": 2, "factor": 3},
        confirm={"top_k": 2},
    )
    data["eval"]["benchmarks"] = [{"name": "easy_vqa", "limit": 18}]
    data["eval"]["resamples"] = 200
    exp.write_text(yaml.safe_dump(data))
    proc = _cli("tune", str(exp), "--json", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    trials = summary["trials"]
    assert len(trials) == 7
    stopped = [t for t in trials if t["status"] == "stopped_early"]
    done = [t for t in trials if t["status"] == "finished"]
    assert stopped and all(t["rung"] == 1 and t["samples"] == 6 for t in stopped)  # ceil(18 / 3) questions
    assert all(t["rung"] == 2 and t["samples"] == 18 for t in done)
    # each question once per trial: a finished searched trial scored 18, a stopped one 6
    searched_done = [t for t in done if not t["seed"]]
    assert all(t["questions_run"] == 18 for t in searched_done) and all(t["questions_run"] == 6 for t in stopped)
    assert all("relative_score_lo" in t for t in trials if t["label"] != "seed:vanilla")
    confirm = summary["confirm"]
    assert confirm["overlap"] == 0 and confirm["benchmarks"]["easy_vqa"] > 0
    labels = {r["label"] for r in confirm["rows"]}
    assert {"seed:vanilla", "seed:hidrop_tok64"} <= labels
    # the confirmation's questions are disjoint from the sweep's, by id (records on the parent run)
    import gzip

    runs, client = _runs(tmp_path / "mlflow.db")
    parent = next(r for r in runs if r.data.tags.get("hidrop.kind") == "sweep")
    ids = {}
    for folder in ("eval", "confirm"):
        path = client.download_artifacts(parent.info.run_id, f"{folder}/records.jsonl.gz", str(tmp_path / folder))
        with gzip.open(path, "rt") as f:
            ids[folder] = {json.loads(line)["id"] for line in f}
    assert ids["eval"] and ids["confirm"] and not ids["eval"] & ids["confirm"]
    confirmed = next(r for r in runs if r.info.run_name == "seed:hidrop_tok64")
    assert "confirm/relative_score" in confirmed.data.metrics and confirmed.data.tags.get("hidrop.blind_level")


def test_fidelity_and_confirm_configs_are_checked(tmp_path):
    from hidrop_platform.tune.confirm import confirm_benchmarks
    from hidrop_platform.tune.errors import TuneSetupError

    with pytest.raises(ConfigError, match="tune.fidelity applies to training_free"):
        validate_config(_tiny(tmp_path, kind="trained", fidelity={"rungs": 2}))
    with pytest.raises(ConfigError, match="rungs"):
        validate_config(_tiny(tmp_path, fidelity={"rungs": 1}))
    with pytest.raises(ConfigError, match="tune.confirm applies to training_free"):
        validate_config(_tiny(tmp_path, kind="trained", confirm={"top_k": 1}))
    whole = _tiny(tmp_path, confirm={"top_k": 1})
    whole["eval"]["benchmarks"] = [{"name": "mme"}]  # the paper's benchmarks default to every question
    with pytest.raises(TuneSetupError, match="no question is left unseen"):
        confirm_benchmarks(validate_config(whole))
    whole["eval"]["benchmarks"] = [{"name": "easy_vqa"}, {"name": "probes", "limit": 3}]
    assert [b.limit for b in confirm_benchmarks(validate_config(whole))] == [1000, 6]  # own default 500, twice
    doubled = confirm_benchmarks(validate_config(_tiny(tmp_path, confirm={"top_k": 1})))
    assert [b.limit for b in doubled] == [16]  # the search's 8, twice


@pytest.mark.slow
def test_bench_search_accounts_for_every_question_and_confirms_unseen(tmp_path):
    data = _tiny(tmp_path, seeds=["vanilla"], fidelity={"rungs": 2, "factor": 3})
    data["eval"]["benchmarks"] = [{"name": "easy_vqa", "limit": 18}]
    data["eval"]["resamples"] = 200
    exp = tmp_path / "tune.yaml"
    exp.write_text(yaml.safe_dump(data))
    proc = _cli("bench", "search", str(exp), "--candidates", "5", "--orders", "3", "--json", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    n = r["candidates"]
    assert n == 6 and r["search_questions"] == {"easy_vqa": 18}
    ex, mf = r["exhaustive"], r["multi_fidelity"]
    assert ex["questions_run"] == 18 * n  # one pass per candidate over every question
    # rung 1: 6 questions each; rung 2: only the 12 new ones, for the best ceil(n / 3)
    assert mf["questions_run"] == 6 * n + 12 * math.ceil(n / 3) and mf["stopped"] == n - math.ceil(n / 3)
    assert r["cost_ratio"]["questions_run"] == pytest.approx(mf["questions_run"] / ex["questions_run"])
    assert r["confirm_overlap"] == 0 and r["confirm_questions"]["easy_vqa"] > 0
    assert ex["best_under_budget"] and ex["best_confirmed"][0] is not None and r["verdict"]
    hv = r["hypervolume_difference"]
    assert hv["difference"] == pytest.approx(ex["hypervolume_confirmed"] - mf["hypervolume_confirmed"])
    assert hv["low"] <= hv["high"] and "confirmed front hypervolume" in r["verdict"]
    above = r["hypervolume_difference_above_blind"]
    assert above["difference"] == pytest.approx(
        ex["hypervolume_confirmed_above_blind"] - mf["hypervolume_confirmed_above_blind"]
    )
    assert ex["hypervolume_confirmed_above_blind"] <= ex["hypervolume_confirmed"] and r["promotion"] == "halving"
    assert above["exhaustive_interval"][0] <= ex["hypervolume_confirmed_above_blind"] + 1e-9
    assert "above blind" in r["verdict"]
    # the replays read the exhaustive records: the first row is the search itself, each has the same cost
    # bound (rung 1 for all, rung 2's new questions for ceil(n / 3)), and its front was confirmed
    o = r["orders"]
    assert o["n"] == 3 and len(o["rows"]) == 3
    assert o["rows"][0]["questions_ratio"] == pytest.approx(r["cost_ratio"]["questions_run"])
    # (one question per unit and no seeds promoted: every order's cuts cost the same)
    assert all(row["questions_ratio"] == pytest.approx(o["rows"][0]["questions_ratio"]) for row in o["rows"])
    assert all(row["hypervolume_confirmed_above_blind"] <= row["hypervolume_confirmed"] for row in o["rows"])
    assert o["rows"][0]["difference_above_blind"][0] == pytest.approx(above["difference"])


def test_a_trial_stopped_at_a_low_rung_stays_off_the_front():
    from hidrop_platform.tune.scheduler import ParetoHalving
    from hidrop_platform.tune.summary import TrialRecord, summarize_sweep

    def trial(label, score, tflops, rung, status):
        metrics = {"relative_score": score, "vision_tflops": tflops, "rung": rung, "score/a": score}
        return TrialRecord.from_metrics(label, status, metrics)

    records = [trial("lucky", 99.0, 0.1, 1, "stopped_early"), trial("full", 90.0, 0.5, 2, "finished")]
    s = summarize_sweep(records, {"a": 50.0}, {"a": 25.0}, None, 40.0, rungs=2)
    assert s.pareto == ["full"] and {t.label for t in s.outcomes()} == {"lucky", "full"}
    assert s.blind_relative_score == 40.0  # the reference pass's figure, not a recomputation
    assert summarize_sweep(records, {"a": 50.0}, {"a": 25.0}).pareto == ["lucky"]  # no rungs: all compete

    class Trial:
        def __init__(self, tid, seed=False):
            self.trial_id, self.config = tid, {"seed": seed}

    sched = ParetoHalving(rungs=2, factor=2, promote_seeds=False)
    assert (
        sched.on_trial_result(None, Trial("a"), {"rung": 1, "relative_score": 80.0, "vision_tflops": 1.0}) == "CONTINUE"
    )
    # an undefined score ranks last instead of crashing the controller
    assert sched.on_trial_result(None, Trial("b"), {"rung": 1, "relative_score": None, "vision_tflops": 1.0}) == "STOP"
    assert (
        sched.on_trial_result(None, Trial("c"), {"rung": 2, "relative_score": 10.0, "vision_tflops": 1.0}) == "CONTINUE"
    )
    ivl = ParetoHalving(rungs=3, factor=2, promote_seeds=False, promotion="interval", ceiling=1.0)

    def at(rung, score, lo, hi, tflops):
        return {"rung": rung, "relative_score": score, "relative_score_lo": lo, "relative_score_hi": hi,
                "vision_tflops": tflops, "blind_relative_score": 40.0}  # fmt: skip

    assert ivl.on_trial_result(None, Trial("a"), at(1, 90.0, 80.0, 99.0, 0.2)) == "CONTINUE"
    assert ivl.on_trial_result(None, Trial("b"), at(1, 60.0, 45.0, 75.0, 0.5)) == "STOP"  # dearer, below 90
    assert ivl.on_trial_result(None, Trial("c"), at(1, 70.0, 50.0, 95.0, 0.5)) == "CONTINUE"  # within its noise
    assert ivl.on_trial_result(None, Trial("d"), at(1, 50.0, 30.0, 70.0, 0.1)) == "CONTINUE"  # cheapest
    # the promotion into the last rung is also capped at ceil(n / 2) by what each adds to the front
    assert ivl.on_trial_result(None, Trial("a"), at(2, 90.0, 85.0, 95.0, 0.2)) == "CONTINUE"
    assert ivl.on_trial_result(None, Trial("c"), at(2, 80.0, 70.0, 91.0, 0.5)) == "STOP"  # ceil(2 / 2) = 1


def test_paired_hypervolume_difference_matches_brute_force():
    from hidrop_platform.bench.search import hypervolume_difference

    rng = np.random.default_rng(4)
    draws = {k: rng.normal(loc, 5.0, size=300) for k, loc in {"a": 90.0, "b": 70.0, "c": 40.0, "d": 60.0}.items()}
    share = {"a": 0.8, "b": 0.5, "c": 0.1, "d": 0.3}
    fronts = {"exhaustive": ["a", "b", "c"], "multi_fidelity": ["a", "d"]}

    def area(front, i):  # the integral over cost x of the best score among members costing at most x
        cuts = sorted({share[k] for k in front} | {1.0})
        total = 0.0
        for lo, hi in zip(cuts, cuts[1:]):
            total += (hi - lo) * max([max(draws[k][i], 0.0) for k in front if share[k] <= lo] + [0.0])
        return total

    brute = np.array([area(fronts["exhaustive"], i) - area(fronts["multi_fidelity"], i) for i in range(300)])
    got = hypervolume_difference(draws, fronts, share)
    assert [got["low"], got["high"]] == pytest.approx(list(np.percentile(brute, [2.5, 97.5])))
    same = hypervolume_difference(draws, {"exhaustive": ["a", "b"], "multi_fidelity": ["b", "a"]}, share)
    assert (same["low"], same["high"], same["p_value"]) == (0.0, 0.0, 1.0)
