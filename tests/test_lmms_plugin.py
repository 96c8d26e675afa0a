"""The lmms-eval plugin against a stand-in for lmms-eval's API (lmms-eval itself is an optional extra):
loaded the way LMMS_EVAL_PLUGINS loads it, its answers equal the harness's own greedy answers under the
same schedule, each question reaches the model with its image, and stop strings cut the answers."""

import importlib
import importlib.util
import sys
import textwrap
from dataclasses import dataclass

import pytest
from PIL import Image

from hidrop.evaluation.harness import generate_answers
from hidrop.sample import Sample
from hidrop.schedule import preset
from hidrop.tiny import tiny_vlm


@pytest.fixture
def fake_lmms_eval(tmp_path, monkeypatch):
    """The three names the plugin imports, as lmms-eval defines them (a base class, a decorator)."""
    pkg = tmp_path / "lmms_eval"
    (pkg / "api").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "api" / "__init__.py").write_text("")
    (pkg / "api" / "model.py").write_text(
        textwrap.dedent("""
        class lmms:
            def __init__(self):
                self.task_dict = {}
    """)
    )
    (pkg / "api" / "registry.py").write_text(
        textwrap.dedent("""
        MODEL_REGISTRY = {}
        def register_model(*names):
            def wrap(cls):
                for n in names:
                    MODEL_REGISTRY[n] = cls
                return cls
            return wrap
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith(("lmms_eval", "hidrop.lmms_plugin"))]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m.startswith(("lmms_eval", "hidrop.lmms_plugin"))]:
        sys.modules.pop(name, None)


@dataclass
class Request:
    args: tuple


def test_plugin_answers_like_the_harness(fake_lmms_eval, tmp_path):
    vlm = tiny_vlm(seed=2)
    vlm.save(tmp_path / "ckpt")
    # what LMMS_EVAL_PLUGINS=hidrop.lmms_plugin does
    models = importlib.import_module("hidrop.lmms_plugin.models")
    ((name, cls_name),) = models.AVAILABLE_MODELS.items()
    cls = getattr(importlib.import_module(f"hidrop.lmms_plugin.models.{name}"), cls_name)
    assert importlib.import_module("lmms_eval.api.registry").MODEL_REGISTRY["hidrop"] is cls

    model = cls(
        pretrained=str(tmp_path / "ckpt"), schedule="hidrop_tok64", dtype="float32", device="cpu", batch_size="2"
    )
    images = [Image.new("RGB", (32, 32), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    docs = [{"image": im, "q": f"What colour is it? {i}"} for i, im in enumerate(images)]
    model.task_dict = {"colours": {"test": docs}}
    requests = [
        Request(
            (f"<image>\n{d['q']}", {"max_new_tokens": 4, "until": []}, lambda doc: [doc["image"]], i, "colours", "test")
        )
        for i, d in enumerate(docs)
    ]
    answers = model.generate_until(requests)

    schedule = preset("hidrop_tok64", vlm.num_layers, vlm.num_vision_tokens)
    reference = tiny_vlm(seed=2)
    expected = generate_answers(
        reference,
        schedule,
        [
            Sample(id=str(i), conversations=({"from": "human", "value": f"<image>\n{d['q']}"},), image=d["image"])
            for i, d in enumerate(docs)
        ],
        max_new_tokens=4,
        batch_size=2,
    )
    assert answers == expected and all(isinstance(a, str) for a in answers)
    # what reached the model: each question with its own image, the placeholder once
    plugin = sys.modules[cls.__module__]
    seen = []
    original = plugin.generate_answers
    plugin.generate_answers = lambda vlm, sched, samples, **kw: (
        seen.extend(samples),
        original(vlm, sched, samples, **kw),
    )[1]
    try:
        model.generate_until(requests[1:2])
    finally:
        plugin.generate_answers = original
    [sample] = seen
    assert sample.image is images[1] and sample.conversations[0]["value"] == f"<image>\n{docs[1]['q']}"
    assert sample.question() == docs[1]["q"]
    # stop strings cut the answer
    cut = model.generate_until(
        [
            Request(
                (
                    f"<image>\n{docs[0]['q']}",
                    {"max_new_tokens": 4, "until": [answers[0][:1] or "x"]},
                    lambda doc: [doc["image"]],
                    0,
                    "colours",
                    "test",
                )
            )
        ]
    )
    assert cut[0] == (answers[0].split(answers[0][:1], 1)[0] if answers[0] else "")
    with pytest.raises(NotImplementedError, match="generation"):
        model.loglikelihood(requests)
    scored = [Request(("context", "continuation")) for _ in range(2)]
    for r in scored:
        r.task_name = "mmbench_en_dev_lite"
    with pytest.raises(NotImplementedError, match="task mmbench_en_dev_lite is scored by log-likelihood"):
        model.loglikelihood(scored)


def test_batch_size_takes_what_lmms_eval_passes(fake_lmms_eval):
    plugin = importlib.import_module("hidrop.lmms_plugin.models.hidrop")
    assert [plugin.batch_size_from(v) for v in (None, 1, "4", "auto", "auto:3")] == [1, 1, 4, 8, 8]
    for bad in ("many", "0", "-2"):
        with pytest.raises(ValueError, match="batch_size"):
            plugin.batch_size_from(bad)


def test_the_entry_point_names_the_model_class():
    import tomllib
    from pathlib import Path

    import hidrop.lmms_plugin as plugin

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["lmms_eval.models"] == {"hidrop": "hidrop.lmms_plugin:manifest"}
    module, cls = plugin.MODEL_CLASS.rsplit(".", 1)
    assert (
        module == "hidrop.lmms_plugin.models.hidrop"
        and cls in importlib.import_module("hidrop.lmms_plugin.models").AVAILABLE_MODELS.values()
    )
    assert importlib.util.find_spec("hidrop.lmms_plugin.tasks") is not None  # LMMS_EVAL_PLUGINS needs it
