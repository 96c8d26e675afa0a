"""The plugin through the real lmms-eval command line (`python -m lmms_eval`), not a stand-in: a local
task the test writes (a JSON dataset with images on disk, found through --include_path), a tiny
checkpoint, two schedules. Each run must write lmms-eval's results and per-sample files, and every
answer must equal what hidrop's own harness answers for that question under the same schedule.

Skipped when lmms-eval is not installed (`make install EXTRAS=dev,lmms`; .ci/run installs it)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hidrop.evaluation.harness import generate_answers
from hidrop.sample import Sample
from hidrop.schedule import preset
from hidrop.tiny import tiny_vlm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed"),
]
QUESTIONS = 8
MAX_NEW_TOKENS = 5
TASK_YAML = """task: hidrop_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def _harness(vlm, schedule_name: str, rows: list[dict]) -> list[str]:
    schedule = preset(schedule_name, vlm.num_layers, vlm.num_vision_tokens)
    samples = [
        Sample(
            id=str(r["id"]),
            conversations=({"from": "human", "value": f"<image>\n{r['question']}"},),
            image=Image.open(r["image"]).convert("RGB"),
        )
        for r in rows
    ]
    return generate_answers(vlm, schedule, samples, max_new_tokens=MAX_NEW_TOKENS, batch_size=2)


def _lmms_eval(tmp_path: Path, out: Path, model_args: str, *flags: str, env_extra=None):
    """`python -m lmms_eval` started (the two runs go side by side); `_lmms_eval_result` collects it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    if "LMMS_EVAL_PLUGINS" not in (env_extra or {}):
        env.pop("LMMS_EVAL_PLUGINS", None)  # the entry point alone must find the model
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "hidrop", "--model_args", model_args]
    cmd += ["--tasks", "hidrop_local", "--include_path", str(tmp_path / "tasks"), "--output_path", str(out)]
    cmd += ["--log_samples", *flags]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def _lmms_eval_result(started) -> dict:
    proc, out = started
    stdout, stderr = proc.communicate(timeout=600)
    # lmms-eval exits 0 even when evaluation fails: the results file is the only proof it ran
    results = sorted(out.rglob("*_results.json"))
    assert proc.returncode == 0 and results, (stdout[-2000:], stderr[-4000:])
    [samples] = sorted(out.rglob("*_samples_hidrop_local.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return {"results": json.loads(results[-1].read_text()), "samples": sorted(rows, key=lambda r: r["doc_id"])}


def test_the_real_lmms_eval_cli_answers_like_the_harness(tmp_path):
    vlm = tiny_vlm(seed=2)
    vlm.save(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(QUESTIONS):
        path = tmp_path / "images" / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append({"id": i, "image": str(path), "question": f"what colour is shape {i}?"})
    expected = {name: _harness(vlm, name, rows) for name in ("vanilla", "hidrop_tok64")}
    assert expected["vanilla"] != expected["hidrop_tok64"]  # the schedule changes answers on this model
    for i, row in enumerate(rows):  # half the targets are vanilla's answers: exact_match is not all zeros
        row["answer"] = expected["vanilla"][i] if i % 2 == 0 else "no such answer"
    (tmp_path / "data.json").write_text(json.dumps(rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hidrop_local.yaml").write_text(
        TASK_YAML.format(data=tmp_path / "data.json", max_new_tokens=MAX_NEW_TOKENS)
    )
    (tmp_path / "tasks" / "utils.py").write_text(TASK_UTILS)
    ckpt = tmp_path / "ckpt"

    started = {
        # the entry point (lmms_eval.models), lmms-eval's own --batch_size auto
        "vanilla": _lmms_eval(
            tmp_path,
            tmp_path / "out-vanilla",
            f"pretrained={ckpt},schedule=vanilla,dtype=float32",
            "--batch_size",
            "auto",
        ),
        # the deprecated LMMS_EVAL_PLUGINS route, and a batch size given in --model_args as well
        "hidrop_tok64": _lmms_eval(
            tmp_path,
            tmp_path / "out-hidrop",
            f"pretrained={ckpt},schedule=hidrop_tok64,dtype=float32,batch_size=3",
            "--batch_size",
            "2",
            env_extra={"LMMS_EVAL_PLUGINS": "hidrop.lmms_plugin"},
        ),
    }
    runs = {name: _lmms_eval_result(run) for name, run in started.items()}
    for name, run in runs.items():
        answers = [s["filtered_resps"] for s in run["samples"]]
        answers = [a[0] if isinstance(a, list) else a for a in answers]
        assert answers == expected[name], name
        hits = [float(a == r["answer"]) for a, r in zip(expected[name], rows)]
        assert [s["exact_match"] for s in run["samples"]] == hits, name
        score = run["results"]["results"]["hidrop_local"]["exact_match,none"]
        assert score == pytest.approx(sum(hits) / QUESTIONS), name
    assert runs["vanilla"]["results"]["results"]["hidrop_local"]["exact_match,none"] >= 0.5
