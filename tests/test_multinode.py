"""A real 2-node Ray cluster on this machine (two `ray start` processes on free loopback ports, the head
with a job server) and a real `mlflow server`: what a cluster user runs, read back through MLflow's REST
API. Slow: the cluster, the server and DeepSpeed workers take minutes to start on two cores."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from hidrop_platform.train.faults import HOLD_AT_STEP_ENV, TRIAL_BARRIER_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOLD_STEP = 6  # a training run on the cluster waits after this step (its third checkpoint)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", **extra)
    return env


def _get(url: str, timeout: float = 120) -> dict:  # hang guards: a loaded server answers late
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _wait(check, what: str, timeout: float):
    """Poll until `check` holds; `timeout` is a hang guard sized for a loaded machine, not a speed bound."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = check()
        except (OSError, KeyError, ValueError, subprocess.TimeoutExpired):  # a server still starting
            found = None
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, artifacts proxied through it (what a cluster uses)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, "mlflow server", 600)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a throwaway server: no graceful shutdown worth waiting for
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, dashboard + job server) and a second node (1 CPU), each a `ray start --block` in its own
    process group with its own temp dir: stopping them kills only this cluster (`ray stop` would also kill
    the local Ray other tests' processes hold), and two nodes sharing a temp dir would delete each other's
    unpacked job working dirs."""
    import tempfile

    gcs, dashboard = _free_port(), _free_port()
    root = Path(tempfile.mkdtemp(prefix="hr", dir="/tmp"))  # Ray's socket paths must stay short (AF_UNIX)
    # the nodes' processes inherit these: search trials wait until two run at once (one on each node), and
    # a training run waits after step HOLD_STEP until the test has killed its worker (no race with the steps)
    env = _env(**{TRIAL_BARRIER_ENV: f"{root / 'barrier'}:2", HOLD_AT_STEP_ENV: f"{HOLD_STEP}:{root / 'release'}"})
    head = ["--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--include-dashboard=true"]
    head += ["--dashboard-host=127.0.0.1", "--disable-usage-stats"]
    second = ["--address", f"127.0.0.1:{gcs}"]
    api = f"http://127.0.0.1:{dashboard}"
    started = []

    def launch(name: str, args: list[str], want: int) -> None:
        """`ray start` until the node is up: Ray gives a node 30 s (hard-coded) to register, which a loaded
        machine can miss ("timed out during startup"); then it exits, and another try goes on."""
        for attempt in range(5):
            log = open(root / f"{name}.log", "a")
            # every port of its own: a local Ray that this pytest process or another holds uses the defaults
            ports = [f"--{k}-port={_free_port()}" for k in ("dashboard-agent-listen", "dashboard-agent-grpc")]
            ports += [f"--{k}-port={_free_port()}" for k in ("runtime-env-agent", "metrics-export")]
            if name == "head":
                ports.append(f"--ray-client-server-port={_free_port()}")
            cmd = [str(BIN / "ray"), "start", "--block", "--num-cpus=1", *args, *ports]
            cmd.append(f"--temp-dir={root / f'{name}-{attempt}'}")
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            started.append(proc)
            _wait(lambda: proc.poll() is not None or len(_alive_nodes(api)) >= want, f"the {name} node", 600)
            if proc.poll() is None:
                return
            with contextlib.suppress(ProcessLookupError):  # what the failed start left running
                os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the {name} node never started: {(root / f'{name}.log').read_text()[-3000:]}")

    try:
        launch("head", head, 1)
        launch("node2", second, 2)
        nodes = _wait(lambda: (n := _alive_nodes(api)) and len(n) == 2 and n, "two alive nodes", 600)
        head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        _wait(lambda: _job_server_ready(api, env), "the job server's agent", 600)
        nodes_ids = {n["node_id"] for n in nodes}
        yield {"gcs": f"127.0.0.1:{gcs}", "api": api, "head": head_id, "nodes": nodes_ids, "release": root / "release"}
    finally:
        for proc in reversed(started):  # a throwaway cluster: no graceful shutdown to wait for
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        subprocess.run(["pkill", "-9", "-f", str(root)], capture_output=True)  # anything that left the group
        shutil.rmtree(root, ignore_errors=True)


def _job_server_ready(api: str, env: dict) -> bool:
    """The dashboard answers before its job agent does ("No available agent to submit job"): a trivial
    job accepted means the real ones will be."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", api, "--no-wait", "--", "true"]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0


def _state(api: str, kind: str, **filters) -> list[dict]:
    query = [("detail", "1"), ("limit", "1000")]
    for key, value in filters.items():
        query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    return _get(f"{api}/api/v0/{kind}?{urllib.parse.urlencode(query)}")["data"]["result"]["result"]


def _alive_nodes(api: str) -> list[dict]:
    return _state(api, "nodes", state="ALIVE")


def _runs(url: str, experiment: str) -> list[dict]:
    exp = _get(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")["experiment"]
    return _post(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]}).get("runs", [])


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _history(url: str, run_id: str, key: str) -> list[int]:
    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": key, "max_results": 10000})
    return [int(m.get("step", 0)) for m in _get(f"{url}/api/2.0/mlflow/metrics/get-history?{query}")["metrics"]]


def _complete_steps(folder: Path) -> set[int]:
    from hidrop_platform.train.resume import COMPLETE_FILE

    return {json.loads(p.read_text())["step"] for p in folder.glob(f"checkpoint_*/{COMPLETE_FILE}")}


def test_a_job_trains_one_worker_per_node_and_survives_a_killed_worker(cluster, mlflow_server, tmp_path):
    """Submitted through platform/cluster/submit.sh: 2 workers land one per node; SIGKILL of the second
    node's worker restarts the group from the last checkpoint into the same MLflow run."""
    storage = tmp_path / "runs"
    steps = 8  # the run holds after step HOLD_STEP (the cluster's env) until the kill has landed
    submit = subprocess.Popen(
        [
            "bash",
            str(ROOT / "platform" / "cluster" / "submit.sh"),
            "experiments/tiny_train_smoke.yaml",
            f"train.storage_path={storage}",
            f"tracking.uri={mlflow_server}",
            "train.num_workers=2",
            "train.max_failures=1",
            "train.checkpoint_every=2",
            f"train.max_steps={steps}",
            "train.log_model=false",
        ],
        cwd=ROOT,
        env=_env(RAY_ADDRESS=cluster["api"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        folder = storage / "tiny_train_smoke"
        # step HOLD_STEP's checkpoint complete (every rank's part on storage, registered with Ray): the
        # workers now hold there, and the restart goes on from a checkpoint, not from step 0
        _wait(lambda: HOLD_STEP in _complete_steps(folder), f"the step {HOLD_STEP} checkpoint", 900)
        workers = _state(cluster["api"], "actors", class_name="RayTrainWorker", state="ALIVE")
        assert {w["node_id"] for w in workers} == cluster["nodes"], workers  # one worker on each node
        victim = next(w for w in workers if w["node_id"] != cluster["head"])
        os.kill(int(victim["pid"]), signal.SIGKILL)
        cluster["release"].touch()  # the restarted group runs through step HOLD_STEP
        output, _ = submit.communicate(timeout=1800)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0 and "succeeded" in output, output[-3000:]

    runs = _runs(mlflow_server, "tiny_train_smoke")
    assert len(runs) == 1, [(r["info"], _tags(r)) for r in runs]  # the restarted group logged into the same run
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    tags = _tags(run)
    assert tags["hidrop.kind"] == "train" and tags["num_workers"] == "2"
    assert int(tags["hidrop.resumed_from_step"]) >= 2, output[-3000:]  # from a checkpoint, not from step 0
    logged = _history(mlflow_server, run["info"]["run_id"], "loss")
    assert len(logged) == len(set(logged)) and max(logged) == steps  # every step once, to the end


def test_a_sweep_places_trials_on_both_nodes(cluster, mlflow_server, tmp_path):
    """Placement by construction, not by timing: each node holds one trial (CPU=1 of 1) and the cluster's
    trial barrier holds the first trial until a second runs, which only the other node can hold. Without
    it a busy machine's slow node2 actor start let the head run every tiny trial."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_tune import _tiny

    data = _tiny(tmp_path, num_samples=4, resources_per_trial={"CPU": 1}, ray_address=cluster["gcs"])
    data["tracking"] = {"uri": mlflow_server, "experiment": "multinode-sweep"}
    exp = tmp_path / "tune.yaml"
    exp.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [str(BIN / "hidrop"), "tune", str(exp), "--json"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # --json parses with an HTTP store (no "View run" lines on stdout)
    assert summary["trials"]
    trials = [r for r in _runs(mlflow_server, "multinode-sweep") if _tags(r).get("hidrop.kind") == "trial"]
    assert len(trials) == len(summary["trials"])
    assert {_tags(r)["hidrop.ray_node"] for r in trials} == cluster["nodes"]


def test_requests_no_node_can_hold_fail_fast(cluster, tmp_path):
    """CPU=2 fits the cluster's total (2) but neither node: one line, nothing written, no waiting."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_tune import _tiny

    data = _tiny(tmp_path, resources_per_trial={"CPU": 2}, ray_address=cluster["gcs"])
    exp = tmp_path / "tune.yaml"
    exp.write_text(yaml.safe_dump(data))
    smoke = str(ROOT / "experiments" / "tiny_train_smoke.yaml")
    commands = (
        ["tune", str(exp)],
        ["train", smoke, f"train.ray_address={cluster['gcs']}", "train.resources_per_worker={CPU: 2}"],
    )
    procs = [  # side by side: each is refused on its own
        subprocess.Popen(
            [str(BIN / "hidrop"), *args],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    for proc in procs:
        # "no waiting" is the exit itself: a request Ray could never place would wait forever (the timeout
        # is only a hang guard, not a speed bound)
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 2, stderr[-2000:]
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "asks for CPU=2 on one node" in lines[0] and "largest offers CPU=1" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune.yaml"]  # no run folder, no store
