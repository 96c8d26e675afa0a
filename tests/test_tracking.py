"""MLflow tracking: a real sqlite store under tmp_path, and an http URI on a closed port for "server down"."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

from hidrop_platform.config.loader import flatten
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.tracking.spool import sync_spool
from hidrop_platform.tracking.store import DEFAULT_TRACKING_DIR, TrackingUnavailable, default_tracking_uri, prepare
from hidrop_platform.tracking.tracker import Tracker, TrackingWarning

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fast_mlflow_http(monkeypatch):
    # mlflow's own retries would make every "server down" case take seconds
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module: creating the schema is the slow part (seconds)."""
    uri = default_tracking_uri(tmp_path_factory.mktemp("store"))
    prepare(uri, "warmup")
    return uri


@pytest.fixture
def down_uri() -> str:
    """An http URI on a local port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return [(m.step, m.value, m.timestamp) for m in client(uri).get_metric_history(run_id, key)]


def runs_in(uri: str, experiment: str) -> list:
    exp = client(uri).get_experiment_by_name(experiment)
    return client(uri).search_runs([exp.experiment_id]) if exp else []


def artifact_text(uri: str, run_id: str, path: str) -> str:
    import mlflow.artifacts

    return mlflow.artifacts.load_text(f"{client(uri).get_run(run_id).info.artifact_uri}/{path}")


def tracking_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]


def test_credentials_leave_the_uri_whatever_the_scheme_case(monkeypatch):
    """Schemes are case-insensitive (RFC 3986): HTTP://user:pw@ must lose its secret like http:// does,
    before the URI becomes a param, the config artifact or a line of output."""
    from hidrop_platform.config.credentials import move_credentials_to_env as credentials_to_env
    from hidrop_platform.config.loader import load_config
    from hidrop_platform.tracking.store import _is_http, redact_uri

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "placeholder")  # restored after the test
        monkeypatch.delenv(key)
    assert credentials_to_env("HTTP://alice:pw-Zq81x@127.0.0.1:9/x") == "http://127.0.0.1:9/x"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw-Zq81x"
    # a raw '@' in the password: the userinfo ends at the authority's last '@', as urllib splits it
    assert credentials_to_env("Https://bob:p@ss@host:5000") == "https://host:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    assert credentials_to_env("HTTP://host:5000/a@b") == "http://host:5000/a@b"  # an '@' in the path is no userinfo
    assert credentials_to_env("SQLITE:///x/mlflow.db") == "sqlite:///x/mlflow.db"
    assert _is_http("HTTPS://host")
    for uri in ("HTTP://alice:pw-Zq81x@host", "Https://alice:pw-Zq81x@x@host/p", "postgresql://a:pw-Zq81x@db/m"):
        assert "pw-Zq81x" not in redact_uri(uri)
    cfg = load_config(
        ROOT / "experiments" / "tiny_train_smoke.yaml", ["tracking.uri=HTTP://alice:pw-Zq81x@127.0.0.1:9"]
    )
    assert cfg.tracking.uri == "http://127.0.0.1:9"
    written = json.dumps(flatten(cfg)) + yaml.safe_dump(cfg.model_dump(mode="json"))
    assert "pw-Zq81x" not in written and "alice" not in written


def test_report_never_prints_the_password_of_an_upper_case_uri(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hidrop_platform.cli import app

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "placeholder")  # restored after the test
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "demo", "--tracking-uri", "HTTP://alice:pw-Zq81x@127.0.0.1:1"])
    assert result.exit_code == 2 and "unreachable" in result.output, result.output
    assert "pw-Zq81x" not in result.output and "alice" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_default_tracking_uri(tmp_path):
    uri = default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve().as_posix()}/{DEFAULT_TRACKING_DIR}/mlflow.db"
    assert uri.startswith("sqlite:////")  # absolute path


def test_log_everything_and_read_back(store, tmp_path):
    config = ExperimentConfig(name="tracking-test", seed=3)
    model_file = tmp_path / "weights.txt"
    model_file.write_text("w=1")
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "a.txt").write_text("A")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tracker(store, "exp-basic", run_name="basic", tags={"team": "hidrop"}, spool_dir=tmp_path / "spool") as t:
            t.log_config(config)
            t.log_params({"lr": 0.1})
            t.log_metrics({"loss": 2.0, "acc": 0.25}, step=0)
            t.log_metrics({"loss": 1.5}, step=1)
            t.log_artifact(model_file, "model")
            t.log_artifact(folder)
            t.log_text("hello", "notes/readme.txt")
            t.log_dict({"a": [1, 2]}, "results/summary.json")
            t.set_tags({"stage": "done"})
    assert tracking_warnings(caught) == []

    run = client(store).get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "basic"
    assert run.data.params["lr"] == "0.1"
    assert run.data.params["seed"] == "3"
    assert {k: run.data.params[k] for k in flatten(config)} == {k: str(v) for k, v in flatten(config).items()}
    assert run.data.tags["team"] == "hidrop" and run.data.tags["stage"] == "done"
    assert [(s, v) for s, v, _ in history(store, t.run_id, "loss")] == [(0, 2.0), (1, 1.5)]
    assert [(s, v) for s, v, _ in history(store, t.run_id, "acc")] == [(0, 0.25)]

    files = {f.path for f in client(store).list_artifacts(t.run_id)}
    assert files == {"config", "model", "plots", "notes", "results"}
    assert yaml.safe_load(artifact_text(store, t.run_id, "config/experiment.yaml")) == config.model_dump(mode="json")
    assert artifact_text(store, t.run_id, "model/weights.txt") == "w=1"
    assert artifact_text(store, t.run_id, "plots/a.txt") == "A"
    assert artifact_text(store, t.run_id, "notes/readme.txt") == "hello"
    assert json.loads(artifact_text(store, t.run_id, "results/summary.json")) == {"a": [1, 2]}
    # artifacts live next to the database, not in whatever the working directory was
    store_dir = Path(store.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((store_dir / "artifacts").as_uri())
    assert not (tmp_path / "spool").exists()


def test_resume_continues_the_same_run(store, tmp_path):
    first = Tracker(store, "exp-resume", run_name="r", spool_dir=tmp_path).start()
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_metrics({"loss": 2.0}, step=1)
    first.finish()
    assert client(store).get_run(first.run_id).info.status == "FINISHED"

    second = Tracker(store, "exp-resume", run_id=first.run_id, tags={"resumed": "yes"}, spool_dir=tmp_path).start()
    assert second.run_id == first.run_id
    assert client(store).get_run(first.run_id).info.status == "RUNNING"
    second.log_metrics({"loss": 1.0}, step=2)
    second.log_metrics({"loss": 0.5}, step=3)
    second.finish()

    assert [s for s, _, _ in history(store, first.run_id, "loss")] == [0, 1, 2, 3]
    assert len(runs_in(store, "exp-resume")) == 1
    run = client(store).get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "yes"


def test_exception_marks_the_run_failed(store, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(store, "exp-failed", spool_dir=tmp_path) as t:
            t.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("boom")
    assert client(store).get_run(t.run_id).info.status == "FAILED"


def test_server_down_spools_then_sync_spool_replays(store, down_uri, tmp_path):
    began = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        prepare(down_uri, "exp-offline")
    assert time.monotonic() - began < 10
    assert down_uri in str(err.value) and "\n" not in str(err.value)

    artifact = tmp_path / "log.txt"
    artifact.write_text("original")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Tracker(down_uri, "exp-offline", run_name="off", spool_dir=tmp_path / "spool", retry_interval=0)
        t.start()
        t.log_params({"lr": 0.01, "model": "tiny"})
        for step in range(5):
            t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        t.log_artifact(artifact)
        t.log_text("offline note", "notes/n.txt")
        t.set_tags({"phase": "offline"})
        t.finish()
    artifact.write_text("changed later")  # the spool holds its own copy

    messages = tracking_warnings(caught)
    down = [m for m in messages if "unreachable" in m]
    assert len(down) == 1 and down_uri in down[0] and str(t.spool_path) in down[0]
    assert {w.filename for w in caught if issubclass(w.category, TrackingWarning)} == {__file__}  # the caller
    left = [m for m in messages if "not fully synced" in m]
    assert len(left) == 1 and "hidrop sync --spool-dir" in left[0]
    assert t.run_id is None and t.spool_path.is_file()

    records = [json.loads(line) for line in t.spool_path.read_text().splitlines()]
    assert records[0]["op"] == "run" and records[0]["run_id"] is None
    assert [r["op"] for r in records[1:]] == ["start", "params"] + ["metrics"] * 5 + [
        "artifact",
        "text",
        "tags",
        "finish",
    ]
    stamps = [r["timestamp"] for r in records if r["op"] == "metrics"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingWarning)
        run_id = sync_spool(t.spool_path, store)
    run = client(store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "off"
    assert run.info.start_time == records[1]["time"] and run.info.end_time == records[-1]["end_time"]
    assert run.data.params == {"lr": "0.01", "model": "tiny"}
    assert run.data.tags["phase"] == "offline"
    assert history(store, run_id, "loss") == [(s, 1.0 / (s + 1), ts) for s, ts in enumerate(stamps)]
    assert artifact_text(store, run_id, "log.txt") == "original"
    assert artifact_text(store, run_id, "notes/n.txt") == "offline note"
    assert len(runs_in(store, "exp-offline")) == 1
    assert not t.spool_path.exists() and not t.spool_path.with_suffix(".files").exists()


@pytest.mark.parametrize(
    "tamper",
    [
        {"path": "../../outside.txt"},
        {"path": "OUTSIDE"},  # absolute: filled in below
        {"spooled": False, "path": "OUTSIDE"},
        {"link": True},  # the spooled copy swapped for a link to a file elsewhere
        {"files_link": True},  # the whole <spool>.files folder swapped for a link to a folder elsewhere
        {"artifact_path": "../../up"},
    ],
    ids=["dotdot", "absolute", "unspooled", "link", "files-link", "artifact-path"],
)
def test_sync_refuses_spool_lines_that_point_outside_the_spool(store, down_uri, tmp_path, tamper):
    """A spool folder may be shared: a line must not make `hidrop sync` upload any other file."""
    from typer.testing import CliRunner

    from hidrop_platform.cli import app

    secret = tmp_path / "outside.txt"
    secret.write_text("not for the store")
    artifact = tmp_path / "log.txt"
    artifact.write_text("original")
    spool_dir = tmp_path / "a" / "spool"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingWarning)
        t = Tracker(down_uri, "exp-tampered", run_name="t", spool_dir=spool_dir, retry_interval=0).start()
        t.log_artifact(artifact)
        t.finish()
    lines = [json.loads(line) for line in t.spool_path.read_text().splitlines()]
    record = next(r for r in lines if r["op"] == "artifact")
    if tamper.pop("link", False):
        copy = spool_dir / record["path"]
        copy.unlink()
        copy.symlink_to(secret)
    if tamper.pop("files_link", False):
        files = t.spool_path.with_suffix(".files")
        elsewhere = tmp_path / "elsewhere"
        (elsewhere / Path(record["path"]).relative_to(files.name)).parent.mkdir(parents=True)
        (elsewhere / Path(record["path"]).relative_to(files.name)).write_text("not for the store")
        shutil.rmtree(files)
        files.symlink_to(elsewhere, target_is_directory=True)
    record.update({k: str(secret) if v == "OUTSIDE" else v for k, v in tamper.items()})
    t.spool_path.write_text("".join(json.dumps(r) + "\n" for r in lines))

    with pytest.raises(ValueError, match="line 3: .*(outside|not a file copied|leaves the run|link out)"):
        sync_spool(t.spool_path, store)
    result = CliRunner().invoke(app, ["sync", "--spool-dir", str(spool_dir), "--tracking-uri", store])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "line 3" in result.output.splitlines()[-1] and result.output.splitlines()[-1].startswith("error: ")
    assert runs_in(store, "exp-tampered") == [] and t.spool_path.is_file()  # nothing replayed, spool kept


def test_sync_spool_raises_while_still_down(down_uri, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingWarning)
        t = Tracker(down_uri, "exp-still-down", spool_dir=tmp_path, retry_interval=0).start()
        t.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(TrackingUnavailable, match="spool kept"):
        sync_spool(t.spool_path)
    assert t.spool_path.is_file()
    with pytest.raises(TrackingUnavailable, match="spool kept"):
        sync_spool(str(t.spool_path))  # a path given as text
    assert t.spool_path.is_file()


def test_offline_start_syncs_when_server_comes_back(store, down_uri, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Tracker(down_uri, "exp-flaky", run_name="flaky", spool_dir=tmp_path, retry_interval=0).start()
        t.log_params({"lr": 0.5})
        t.log_metrics({"loss": 3.0}, step=0)
        t.log_metrics({"loss": 2.0}, step=1)
        assert t.run_id is None and t.offline
        t.tracking_uri = store  # the server is back
        t.log_metrics({"loss": 1.0}, step=2)
    assert t.run_id is not None and not t.offline and not t.spool_path.exists()
    messages = tracking_warnings(caught)
    assert len([m for m in messages if "unreachable" in m]) == 1
    assert len([m for m in messages if "synced 4 buffered records" in m]) == 1

    t.finish()
    assert [(s, v) for s, v, _ in history(store, t.run_id, "loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    run = client(store).get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.5"}
    assert len(runs_in(store, "exp-flaky")) == 1


def test_server_lost_mid_run_resumes_into_the_same_run(store, down_uri, tmp_path):
    t = Tracker(store, "exp-lost", spool_dir=tmp_path, retry_interval=0).start()
    run_id = t.run_id
    t.log_metrics({"loss": 3.0}, step=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.tracking_uri = down_uri  # mlflow's own HTTP client now fails: its error must be recognised
        t.log_metrics({"loss": 2.0}, step=1)
        t.log_metrics({"loss": 1.0}, step=2)
        assert t.offline
        header = json.loads(t.spool_path.read_text().splitlines()[0])
        assert header["run_id"] == run_id  # a later sync_spool goes into this run
        t.tracking_uri = store
        assert t.flush()
    assert len([m for m in tracking_warnings(caught) if "unreachable" in m]) == 1
    t.finish()
    assert t.run_id == run_id
    assert [s for s, _, _ in history(store, run_id, "loss")] == [0, 1, 2]
    assert len(runs_in(store, "exp-lost")) == 1


def test_rejected_record_stays_in_the_spool(store, down_uri, tmp_path):
    """A record the store refuses (here: a param changed while offline) must not be dropped or block logging."""
    from mlflow.exceptions import MlflowException

    t = Tracker(store, "exp-rejected", spool_dir=tmp_path, retry_interval=0).start()
    t.log_params({"lr": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.tracking_uri = down_uri
        t.log_params({"lr": 2})
        t.log_metrics({"loss": 1.0}, step=0)
        t.tracking_uri = store
        t.log_metrics({"loss": 0.5}, step=1)  # the replay hits the changed param
        t.log_metrics({"loss": 0.25}, step=2)
        t.finish()
    messages = tracking_warnings(caught)
    assert len([m for m in messages if "rejected a buffered 'params' record" in m]) == 1
    assert len([m for m in messages if "not fully synced" in m]) == 1
    ops = [json.loads(line)["op"] for line in t.spool_path.read_text().splitlines()]
    assert ops == ["run", "params", "metrics", "metrics", "metrics", "finish"]
    assert client(store).get_run(t.run_id).data.params == {"lr": "1"}
    with pytest.raises(MlflowException):
        sync_spool(t.spool_path)


def test_retry_interval_throttles_implicit_replays(store, down_uri, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingWarning)
        t = Tracker(down_uri, "exp-throttle", spool_dir=tmp_path, retry_interval=3600).start()
        t.log_metrics({"loss": 1.0}, step=0)
        t.tracking_uri = store
        t.log_metrics({"loss": 0.5}, step=1)
        assert t.offline  # no retry yet: too soon
        assert t.flush() and t.run_id is not None
    t.finish()
    assert [s for s, _, _ in history(store, t.run_id, "loss")] == [0, 1]


def test_non_finite_metrics_are_skipped_with_one_warning_per_key(store, tmp_path):
    t = Tracker(store, "exp-nan", spool_dir=tmp_path).start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.log_metrics({"loss": math.nan, "acc": 0.5, "grad": math.inf}, step=0)
        t.log_metrics({"loss": math.nan, "acc": 0.75, "grad": -math.inf}, step=1)
    t.finish()
    messages = tracking_warnings(caught)
    assert len(messages) == 2 and any("'loss'" in m for m in messages) and any("'grad'" in m for m in messages)
    assert history(store, t.run_id, "loss") == [] and history(store, t.run_id, "grad") == []
    assert [(s, v) for s, v, _ in history(store, t.run_id, "acc")] == [(0, 0.5), (1, 0.75)]


def test_params_are_truncated_and_batched(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # the store would reject a long value itself
    t = Tracker(store, "exp-params", spool_dir=tmp_path).start()
    sizes: list[int] = []
    # what reaches the store: MLflow's log_batch splits a large batch into requests of <= 100 params
    store_type = type(t._client()._tracking_client.store)
    real_log_batch = store_type.log_batch

    def spy(self, run_id, metrics=(), params=(), tags=()):
        if params:
            sizes.append(len(params))
        return real_log_batch(self, run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(store_type, "log_batch", spy)
    params = {f"p{i:03d}": i for i in range(250)}
    params["long"] = "x" * 7000
    t.log_params(params)
    t.finish()
    assert sizes and max(sizes) <= 100 and sum(sizes) == 251
    logged = client(store).get_run(t.run_id).data.params
    assert len(logged) == 251 and logged["p007"] == "7" and logged["long"] == "x" * 6000


def test_disabled_tracker_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = Tracker(default_tracking_uri(tmp_path), "exp-off", enabled=False)
    with t:
        t.log_config(ExperimentConfig(name="x"))
        t.log_params({"a": 1})
        t.log_metrics({"loss": 1.0}, step=0)
        t.log_artifact(tmp_path / "missing.txt")
        t.log_text("x", "x.txt")
        t.log_dict({"a": 1}, "a.json")
        t.set_tags({"a": "b"})
        assert t.flush()
    assert t.run_id is None
    assert list(tmp_path.iterdir()) == []  # no database, no spool


def test_unreachable_classification():
    import requests
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from hidrop_platform.tracking.store import is_unreachable as _is_unreachable

    def wrapped_connection_error() -> MlflowException:
        try:
            try:
                raise requests.ConnectionError("[Errno 111] Connection refused")
            except Exception as e:  # what mlflow.utils.rest_utils.http_request does
                raise MlflowException(f"API request to http://x failed with exception {e}")
        except MlflowException as outer:
            return outer

    assert _is_unreachable(wrapped_connection_error())
    assert _is_unreachable(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}))
    assert _is_unreachable(RestException({"error_code": "INTERNAL_ERROR", "message": "oops"}))
    assert _is_unreachable(MlflowException("API request to endpoint /x failed with error code 502 != 200"))
    assert not _is_unreachable(MlflowException("param changed", error_code=INVALID_PARAMETER_VALUE))
    assert not _is_unreachable(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    assert not _is_unreachable(ValueError("bad"))


def test_system_metrics_and_versions_are_cheap_and_import_nothing_heavy():
    code = (
        "import sys, hidrop_platform.tracking.params as t\n"
        "heavy = ('mlflow', 'requests', 'torch', 'ray', 'deepspeed', 'transformers')\n"
        "assert not [m for m in heavy if m in sys.modules], 'import'\n"
        "v = t.package_versions(); m = t.system_metrics()\n"
        "assert not [m for m in heavy if m in sys.modules], 'calls'\n"
        "import json; print(json.dumps({'v': v, 'm': m}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    from importlib import metadata

    assert out["v"]["mlflow"] == metadata.version("mlflow") and out["v"]["torch"] == metadata.version("torch")
    assert out["v"]["python"] == ".".join(map(str, sys.version_info[:3])) and "hidrop" in out["v"]
    assert {"system/cpu_percent", "system/process_rss_gb", "system/memory_used_gb"} <= set(out["m"])
