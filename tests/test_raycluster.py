"""The cluster checks that run before anything waits on Ray: constructed nodes and environments."""

import importlib.util
import json
import os
import socket

import pytest

from hidrop_platform.cluster.connect import (
    JOB_CONFIG_ENV,
    SKIP_CHECK_ENV,
    ClusterSetupError,
    check_address,
    check_fits,
    check_job_paths,
    fits_per_node,
    worker_env,
)

TWO_SMALL = [{"CPU": 1.0, "memory": 1e9}, {"CPU": 1.0, "memory": 1e9}]


def test_a_request_must_fit_one_node_not_the_total():
    # the case: CPU=2 fits the cluster's total of 2 but neither 1-CPU node
    with pytest.raises(ClusterSetupError) as err:
        check_fits("tune.resources_per_trial", {"CPU": 2}, 1, TWO_SMALL)
    assert "CPU=2 on one node" in str(err.value) and "largest offers CPU=1 (2 nodes)" in str(err.value)
    assert check_fits("tune.resources_per_trial", {"CPU": 1}, 1, TWO_SMALL) == 2


def test_workers_must_fit_node_by_node():
    nodes = [{"CPU": 3.0}, {"CPU": 1.0}]
    assert fits_per_node({"CPU": 2}, nodes) == [1, 0]
    assert check_fits("train.resources_per_worker", {"CPU": 1}, 4, nodes) == 4
    with pytest.raises(ClusterSetupError, match=r"needs 2 x \{CPU=2\}, each on one node.*hold only 1"):
        check_fits("train.resources_per_worker", {"CPU": 2}, 2, nodes)  # 4 CPUs in all, yet only one fits
    with pytest.raises(ClusterSetupError, match="largest offers CPU=3, GPU=0"):
        check_fits("train.resources_per_worker", {"CPU": 1, "GPU": 1}, 1, nodes)


def test_an_autoscaling_cluster_can_skip_the_check(monkeypatch):
    monkeypatch.setenv(SKIP_CHECK_ENV, "1")
    assert check_fits("train.resources_per_worker", {"CPU": 64}, 2, TWO_SMALL) == 2
    assert check_fits("tune.resources_per_trial", {"CPU": 1}, 1, TWO_SMALL) == 2  # trials still run side by side


def test_a_dashboard_address_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ClusterSetupError) as err:
        check_address(None)
    assert str(err.value).startswith("RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard")
    assert "\n" not in str(err.value)


def test_an_unreachable_gcs_fails_fast(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterSetupError, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port} \(ray_address\)"):
        check_address(f"127.0.0.1:{port}")
    assert check_address("auto") == "auto"  # Ray resolves these itself
    assert check_address(None) is None


def _as_job(monkeypatch, tmp_path, runtime_env):
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env}))
    monkeypatch.chdir(tmp_path)


def test_inside_a_job_the_driver_does_not_repeat_the_jobs_env_vars(monkeypatch, tmp_path):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert worker_env()["HF_HUB_OFFLINE"] == "1"
    _as_job(monkeypatch, tmp_path, {"env_vars": {"HF_HUB_OFFLINE": "1"}})
    assert "HF_HUB_OFFLINE" not in worker_env()  # Ray refuses to merge a repeated key


def test_a_job_refuses_paths_that_vanish_with_its_working_dir(monkeypatch, tmp_path):
    _as_job(monkeypatch, tmp_path, {"working_dir": "gcs://_ray_pkg_abc.zip"})
    with pytest.raises(ClusterSetupError, match=r"train.storage_path='runs' is relative.*deletes after the job"):
        check_job_paths({"train.storage_path": "runs"}, "http://mlflow:5000", True)
    shared = str(tmp_path / "shared" / "runs")  # absolute, and writable (the paths are checked too)
    with pytest.raises(ClusterSetupError, match="tracking.uri is unset"):
        check_job_paths({"train.storage_path": shared}, None, True)
    check_job_paths({"train.storage_path": shared}, "http://mlflow:5000", True)
    check_job_paths({"train.storage_path": shared}, None, False)  # tracking off: no store to lose
    # without a working_dir the job runs where it was started: relative paths stay
    _as_job(monkeypatch, tmp_path, {"env_vars": {}})
    check_job_paths({"train.storage_path": "runs"}, None, True)


def test_a_jobs_spool_lives_outside_its_working_dir(monkeypatch, tmp_path):
    from hidrop_platform.tracking.store import SPOOL_DIR_ENV, default_spool_dir

    monkeypatch.delenv(SPOOL_DIR_ENV, raising=False)
    _as_job(monkeypatch, tmp_path, {"working_dir": "gcs://_ray_pkg_abc.zip"})
    assert tmp_path not in default_spool_dir().parents
    monkeypatch.setenv(SPOOL_DIR_ENV, str(tmp_path / "spool"))
    assert default_spool_dir() == (tmp_path / "spool").resolve()


def test_write_paths_and_tracking_uris_are_checked_before_any_work(tmp_path):
    import sqlite3

    from hidrop_platform.storage import write_problem
    from hidrop_platform.tracking.store import TrackingUnavailable, check_tracking_uri, tracking_uri_problem

    (tmp_path / "afile").write_text("text")
    (tmp_path / "folder").mkdir()
    assert write_problem(tmp_path / "new" / "deeper") is None  # created later, by the command
    assert write_problem(tmp_path / "folder") is None
    assert write_problem(tmp_path / "afile", folder=False) is None
    assert write_problem("s3://bucket/runs") is None  # the storage's to check
    assert "afile is a file, not a folder" in write_problem(tmp_path / "afile")
    assert "afile is a file, not a folder" in write_problem(tmp_path / "afile" / "x.jsonl", folder=False)
    assert "folder is a folder, not a file" in write_problem(tmp_path / "folder", folder=False)
    assert "cannot write to /proc" in write_problem("/proc/x.jsonl", folder=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]  # the probes leave nothing

    sqlite3.connect(tmp_path / "real.db").execute("create table t (x)").connection.close()
    for good in (
        "http://mlflow:5000",
        "HTTPS://mlflow.example.com",
        f"sqlite:///{tmp_path}/new.db",
        f"sqlite:///{tmp_path}/real.db",
        f"file://{tmp_path}/mlruns",
        str(tmp_path / "mlruns"),
        "databricks",
    ):
        assert tracking_uri_problem(good) is None, good
    assert "did you mean 'http'" in tracking_uri_problem("htp://mlflow:5000")
    assert "did you mean 'sqlite'" in tracking_uri_problem(f"sqlit:///{tmp_path}/x.db")
    assert "names no host" in tracking_uri_problem("http:/mlflow:5000")
    assert "is not a SQLite database" in tracking_uri_problem(f"sqlite:///{tmp_path}/afile")
    assert "is a folder" in tracking_uri_problem(f"sqlite:///{tmp_path}/folder")
    assert "afile is a file, not a folder" in tracking_uri_problem(f"sqlite:///{tmp_path}/afile/x.db")
    if importlib.util.find_spec("mysql") is None:  # the driver is no dependency of ours
        assert "pip install mysql-connector-python" in tracking_uri_problem("mysql+mysqlconnector://u@db/x")
    assert "user:secret" not in tracking_uri_problem("htp://user:secret@mlflow:5000")  # never in a message
    with pytest.raises(ClusterSetupError, match=r"train.storage_path=.*afile is a file"):
        check_job_paths({"train.storage_path": str(tmp_path / "afile")}, None, True)
    with pytest.raises(TrackingUnavailable, match="unknown scheme 'htp'"):
        check_tracking_uri("htp://mlflow:5000")
    check_tracking_uri("htp://mlflow:5000", enabled=False)  # tracking off: the URI is never used


def test_a_ray_started_here_trains_without_the_preemption_watcher(monkeypatch):
    """Ray Train's preemption watcher costs each training an actor process; a Ray this process starts has
    no autoscaler to drain its node, so it is off there (and set before ray.init, which trials inherit),
    and left as it is on a cluster given by address."""
    import ray

    from hidrop_platform.cluster.connect import PREEMPTION_WATCHER_ENV, start_ray

    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append((kw["address"], os.environ.get(PREEMPTION_WATCHER_ENV))))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)
    start_ray(None)
    monkeypatch.delenv(PREEMPTION_WATCHER_ENV)
    with socket.socket() as s:  # a GCS address that answers (check_address connects to it)
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        start_ray(address)
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")  # the user's own choice stands
    start_ray(None)
    assert seen == [(None, "0"), (address, None), (None, "1")]


def test_an_address_is_checked_even_where_this_process_already_runs_ray(monkeypatch):
    """A Ray left running in the process (an earlier command called in-process) must not turn a refusal into
    a run on that Ray: found when `hidrop tune ... tune.ray_address=http://...` ran a whole sweep there."""
    import ray

    from hidrop_platform.cluster.connect import start_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init called"))
    with pytest.raises(ClusterSetupError, match="is a dashboard"):
        start_ray("http://127.0.0.1:8265", "tune.ray_address")
    start_ray(None)  # no address: the running Ray is used as it is
