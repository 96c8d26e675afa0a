"""The quickstart end to end: `hidrop demo` (smallest size, the `demo` fixture of conftest.py) in a fresh
directory, then `hidrop ui` and the report opened in a real headless Chromium (Debian's, driven by
playwright), with screenshots.

Set HIDROP_SCREENSHOTS=DIR to keep the screenshots."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hidrop_platform.tracking.store import default_tracking_uri
from hidrop_platform.tracking.ui import UI_TRAINING_VIEW

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# stack.md: without the background-networking flags Chromium floods the closed network
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
HIDROP = [sys.executable, "-m", "hidrop_platform.cli"]
PRESET_ROWS = ["LLaVA (all tokens)", "FastV", "PDrop", "HiDrop Tok48", "HiDrop Tok64", "HiDrop Tok80"]


def test_demo_logs_everything_and_builds_the_report(demo):
    from mlflow.tracking import MlflowClient

    result, work = demo["result"], demo["work"]
    labels = [t["label"] for t in result["trials"]]
    assert sorted(labels) == sorted(
        [f"seed:{p}" for p in ("vanilla", "fastv", "pdrop", "hidrop_tok48", "hidrop_tok64", "hidrop_tok80")]
        + ["trial-001"]
    )
    assert [t["method"] for t in result["trainings"]] == ["vanilla", "hidrop"]
    report = result["report"]
    assert report["methods"][:6] == PRESET_ROWS and report["trainings"] == 2
    assert Path(report["html"]).is_file() and (Path(report["out_dir"]) / "pareto.png").is_file()
    # MLflow: one parent sweep run with 7 nested trials, 2 training runs with their scores, in ./mlruns
    client = MlflowClient(default_tracking_uri(work))
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("hidrop.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(labels)
    trains = [r for r in runs if r.data.tags.get("hidrop.kind") == "train"]
    assert len(trains) == 2
    for run in trains:
        assert run.info.status == "FINISHED"
        assert {"relative_score", "score/easy_vqa", "score/probes", "accelerator_hours"} <= set(run.data.metrics)
    published = {Path(a.path).name for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report.html", "pareto.png"} <= published
    # intervals on the trials, the blind band, and the seeds confirmed on questions the search never saw
    assert any(t["relative_score_lo"] is not None for t in result["trials"])
    assert len(result["blind_relative_interval"]) == 2
    confirm = result["confirm"]
    assert confirm["overlap"] == 0 and {f"seed:{p}" for p in ("fastv", "pdrop")} <= {
        r["label"] for r in confirm["rows"]
    }
    assert "Held-out confirmation" in Path(report["html"]).read_text()
    # the HiDrop-trained model on the search's questions, paired with its all-tokens and blind rows
    trained = result["trained"]
    assert [r["label"] for r in trained["rows"]] == ["all tokens (stage 2)", "blind", "HiDrop-trained"]
    compares = [r for r in runs if r.data.tags.get("hidrop.kind") == "compare"]
    assert [r.info.run_id for r in compares] == [trained["run_id"]] and report["comparison"]
    assert "HiDrop-trained" in Path(report["html"]).read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_ui_and_report_in_a_real_browser(demo, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    from mlflow.tracking import MlflowClient

    shots = Path(os.environ.get("HIDROP_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    work, port = demo["work"], _free_port()
    ui = subprocess.Popen(
        [*HIDROP, "ui", "--port", str(port)],
        cwd=work,
        env=demo["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        first = ui.stdout.readline()  # printed once the server answers
        assert f"http://127.0.0.1:{port}/#/experiments{UI_TRAINING_VIEW}" in first, first
        exp_id = MlflowClient(default_tracking_uri(work)).get_experiment_by_name("demo").experiment_id
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # the experiment's runs: the sweep's parent run, expanded to show its trials
            # not "networkidle": MLflow 3's telemetry web worker keeps a request open, so the network never idles
            page.goto(
                f"http://127.0.0.1:{port}/#/experiments/{exp_id}{UI_TRAINING_VIEW}", wait_until="domcontentloaded"
            )
            page.get_by_text("sweep:demo-", exact=False).first.wait_for(timeout=60_000)
            assert "/runs" in page.url  # the runs view, not the GenAI overview
            parent = page.locator("[role='row']", has_text="sweep:demo-").first
            parent.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # the "+" expander
            page.get_by_text("seed:hidrop_tok64").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "mlflow_experiment.png"), full_page=True)
            body = page.inner_text("body")
            for label in ("seed:vanilla", "seed:fastv", "seed:pdrop", "trial-001", "demo-"):
                assert label in body, label
            # the report page, self-contained
            page.goto(Path(demo["result"]["report"]["html"]).resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(shots / "report.png"), full_page=True)
            img = page.locator("img[alt='Pareto plot']")
            assert img.count() == 1 and img.evaluate("i => i.complete && i.naturalWidth > 300")
            rows = page.locator("#methods ~ .wide table").first.locator("tbody tr td:first-child").all_inner_texts()
            assert [r.split(" (front")[0] for r in rows[:6]] == PRESET_ROWS  # "(front: clear)" etc.
            assert rows[-1] == "blind (no image)"
            assert page.locator("#training ~ .wide table").first.locator("tbody tr").count() == 2
            browser.close()
        for name in ("mlflow_experiment.png", "report.png"):
            assert (shots / name).stat().st_size > 10_000
    finally:
        os.killpg(ui.pid, signal.SIGINT)  # Ctrl+C: hidrop ui stops the server and its workers
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
    time.sleep(0.5)
    with socket.socket() as s:  # the port is free again: nothing left running
        s.bind(("127.0.0.1", port))
