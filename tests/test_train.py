"""Training: the DeepSpeed config, LR schedule, what each stage trains, and (slow) real Ray Train +
DeepSpeed runs: 2 workers ZeRO-2 with the loss going down, a killed run resuming into the same MLflow
run, and a diverging run stopping with a clear error."""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hidrop.tiny import tiny_vlm
from hidrop.training import Hook, TrainingLoop, lr_at, set_trainable
from hidrop_platform.config.loader import load_config
from hidrop_platform.train.worker import deepspeed_config

SMOKE = "experiments/tiny_train_smoke.yaml"


def test_deepspeed_config_from_yaml_and_merge():
    cfg = load_config(
        SMOKE,
        [
            "train.zero_stage=3",
            "train.offload_param=true",
            "train.precision=bf16",
            "train.grad_accum=4",
            "train.deepspeed={zero_optimization: {reduce_bucket_size: 1000}}",
        ],
    )
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}, "reduce_bucket_size": 1000}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 4
    # ZeRO-1/2 on CPU skip the gradient copy into a contiguous buffer; GPUs and train.deepspeed keep control
    assert deepspeed_config(load_config(SMOKE))["zero_optimization"] == {"stage": 2, "contiguous_gradients": False}
    assert deepspeed_config(load_config(SMOKE, ["train.use_gpu=true"]))["zero_optimization"] == {"stage": 2}
    override = load_config(SMOKE, ["train.deepspeed={zero_optimization: {contiguous_gradients: true}}"])
    assert deepspeed_config(override)["zero_optimization"]["contiguous_gradients"] is True


def test_workers_do_not_build_deepspeeds_inference_kernel():
    """DeepSpeed would compile its shared-memory all-reduce (inference only) when a CPU worker sets up
    communication; `skip_inference_kernels` tells it the kernel is unavailable, so nothing is built."""
    from deepspeed.comm.torch import build_shm_op

    from hidrop_platform.train.worker import skip_inference_kernels

    skip_inference_kernels()
    assert build_shm_op() is None


@pytest.mark.parametrize(
    "bad,msg",
    [
        ("train.offload_param=true", "zero_stage=3"),
        ("train.lora={r: 4}", "finetune"),
        ("train.zero_stage=4", "less than or equal"),
    ],
)
def test_train_config_errors(bad, msg):
    from hidrop_platform.config.loader import ConfigError

    extra = ["train.stage=pretrain"] if "lora" in bad else []
    with pytest.raises(ConfigError, match=msg):
        load_config(SMOKE, extra + [bad])


def test_lr_schedule_hand_computed():
    # 10 steps, 20% warm-up: steps 0-1 ramp to base, then cosine from base to 0
    assert lr_at(0, 10, 1.0, "cosine", 0.2) == pytest.approx(0.5)
    assert lr_at(1, 10, 1.0, "cosine", 0.2) == pytest.approx(1.0)
    assert lr_at(2, 10, 1.0, "cosine", 0.2) == pytest.approx(1.0)
    assert lr_at(6, 10, 1.0, "cosine", 0.2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(6, 10, 1.0, "linear", 0.2) == pytest.approx(0.5)
    assert lr_at(9, 10, 2.0, "constant", 0.0) == 2.0


def test_set_trainable_per_stage():
    vlm = tiny_vlm()
    names = set_trainable(vlm, "pretrain")
    assert names and all("multi_modal_projector" in n for n in names)
    vlm = tiny_vlm()
    names = set_trainable(vlm, "finetune")
    assert any("multi_modal_projector" in n for n in names) and any("layers.0.self_attn" in n for n in names)
    assert any("lm_head" in n for n in names) and not any("vision_tower" in n for n in names)
    vlm = tiny_vlm()
    names = set_trainable(vlm, "finetune", lora={"r": 2})
    lm_names = [n for n in names if "multi_modal_projector" not in n]
    assert lm_names and all("lora_" in n for n in lm_names)


# ---- real runs (Ray Train workers running DeepSpeed on CPU) ----------------------------------
def _run(tmp_path, monkeypatch, *overrides):
    from hidrop_platform.cli import app

    monkeypatch.chdir(tmp_path)
    args = [
        "train",
        str(pytest.ROOT / SMOKE),
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "--json",
        *overrides,
    ]
    return CliRunner().invoke(app, args)


def _runs(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps)


@pytest.fixture(autouse=True)
def _root(request):
    from pathlib import Path

    pytest.ROOT = Path(__file__).resolve().parents[1]


def _written_since(path: Path, since: float) -> bool:
    try:
        return path.is_file() and path.stat().st_mtime >= since
    except OSError:  # another Ray on the machine removed it meanwhile
        return False


@pytest.mark.slow
def test_two_worker_zero2_run_spools_behind_an_unreachable_server_and_replays(tmp_path, monkeypatch):
    """Two ZeRO-2 workers train on while the tracking server is unreachable (one run, so the slow suite
    trains once for both): every record goes to the spool, the password is never written or printed, and
    `sync_spool` replays the run whole into a store, where its metrics, params and tags are as a
    reachable server would have them."""
    import mlflow

    from hidrop.models import load_model
    from hidrop_platform.tracking.spool import sync_spool

    started = time.time()
    result = _run(tmp_path, monkeypatch, "tracking.uri=http://user:s3cret@127.0.0.1:9")  # the port is closed
    assert result.exit_code == 0, result.output
    assert "unreachable" in result.output and "s3cret" not in result.output
    # every Ray session written to meanwhile: session_latest may be another Ray on the machine, and an
    # earlier in-process command may have started the Ray this run reused (its folder is older)
    sessions = [
        s for s in Path("/tmp/ray").glob("session_2*") if any(_written_since(f, started - 1) for f in s.rglob("*"))
    ]
    assert sessions, "the training's Ray session left no folder in /tmp/ray"
    for path in [*tmp_path.rglob("*"), *(f for s in sessions for f in s.rglob("*"))]:
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert b"s3cret" not in path.read_bytes(), path
    spools = list((tmp_path / "mlruns" / "spool").glob("*.jsonl"))
    assert len(spools) == 1, "rank 0's records were not buffered"
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    run = mlflow.MlflowClient(uri).get_run(sync_spool(spools[0], tracking_uri=uri))
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))  # every step, once
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert losses[-1] < losses[0]
    for key in (
        "lr",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "accelerator_hours",
        "vision_tokens_kept",
        "model_tflops_per_sample",
    ):
        assert key in run.data.metrics, key
    assert run.data.params["train.zero_stage"] == "2" and run.data.tags["device_type"] == "cpu"
    out = json.loads(result.stdout[result.stdout.index("{") :])
    assert out["metrics"]["loss"] == pytest.approx(losses[-1], rel=1e-6)  # the same mean over workers as MLflow
    exported = load_model(out["export"])
    assert exported.schedule.name.startswith("hidrop")


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    result = _run(tmp_path, monkeypatch, "train.lr=1e30", "train.num_workers=1")
    assert result.exit_code == 2, result.output
    assert "loss is nan" in result.output.lower() or "loss is inf" in result.output.lower()
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_bench_overhead_takes_turns_with_the_plain_loop(tmp_path, monkeypatch):
    import statistics

    from hidrop_platform.bench.overhead import run_overhead_bench

    monkeypatch.chdir(tmp_path)
    cfg = load_config(pytest.ROOT / SMOKE)
    result = run_overhead_bench(cfg, steps=3, warmup=1, storage=str(tmp_path / "runs"))
    assert result["steps_timed"] == 3 and result["plain_step_s"] > 0 and result["ray_deepspeed_step_s"] > 0
    # the same initial weights and the same first batch on both sides: the two paths time the same work
    first = result["first_loss"]
    assert first["ray_deepspeed"] == pytest.approx(first["plain"], rel=1e-5)
    assert result["zero_optimization"]["stage"] == cfg.train.zero_stage
    assert result["ratio_quartiles"][0] <= result["overhead_ratio"] <= result["ratio_quartiles"][1]
    seconds = json.loads((tmp_path / "runs" / cfg.name / "step_times.json").read_text())["seconds"]
    assert len(seconds) == 4 and result["ray_deepspeed_step_s"] == pytest.approx(statistics.median(seconds[1:]))


def test_bench_overhead_cli_rejects_bad_step_counts():
    from hidrop_platform.cli import app

    result = CliRunner().invoke(app, ["bench", "overhead", str(pytest.ROOT / SMOKE), "--steps", "0"])
    assert result.exit_code == 2 and "--steps must be at least 1" in result.output
    assert "Traceback" not in result.output


def test_turns_alternate_strictly_and_a_stop_ends_the_wait(tmp_path):
    import os
    import threading

    from hidrop_platform.bench.overhead import OverheadBenchError, Turns

    pipes = Turns.create(tmp_path, ("ray", "plain"))
    order: list[str] = []

    def side(me: str, other: str, steps: int, sets_up: bool) -> None:
        turns = Turns(tmp_path, me, other, timeout_s=30)
        if sets_up:  # the plain side hands the first turn over once it is ready
            turns.hand_over()
        for _ in range(steps):
            turns.wait()
            order.append(me)
            turns.hand_over()
        if not sets_up:  # the worker waits out the plain side's last step
            turns.wait()
        turns.close()

    threads = [
        threading.Thread(target=side, args=("plain", "ray", 5, True)),
        threading.Thread(target=side, args=("ray", "plain", 5, False)),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert order == ["ray", "plain"] * 5

    # the other side failing (stop, from itself or from the driver) or never answering ends the wait
    ray, plain = Turns(tmp_path, "ray", "plain"), Turns(tmp_path, "plain", "ray", timeout_s=0.05)
    plain.stop()
    with pytest.raises(OverheadBenchError, match="the plain side of the overhead benchmark stopped"):
        ray.wait()
    os.write(pipes["ray"], Turns.STOP)  # as the driver does when the plain process dies outright
    with pytest.raises(OverheadBenchError, match="stopped"):
        ray.wait()
    with pytest.raises(OverheadBenchError, match="did not answer in 0 s"):
        plain.wait()
    for fd in pipes.values():
        os.close(fd)


def test_lora_export_merges_adapters_into_a_loadable_checkpoint(tmp_path):
    from hidrop.models import load_model
    from hidrop.schedule import preset
    from hidrop.training import merged_lora_export

    vlm = tiny_vlm(seed=2)
    set_trainable(vlm, "finetune", lora={"r": 2})
    with torch.no_grad():
        for name, p in vlm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: non-zero update
    ids = torch.tensor([[4, 6, 23, 25, 5]])
    with torch.no_grad():
        before = vlm.model(input_ids=ids).logits
    merged_lora_export(vlm, lambda: vlm.save(tmp_path / "m", schedule=preset("pdrop", 8, 16)))
    with torch.no_grad():
        after = vlm.model(input_ids=ids).logits  # adapters restored after the export
        loaded = load_model(tmp_path / "m").model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert torch.allclose(before, loaded, atol=1e-4)
    assert any("lora_" in n for n, _ in vlm.model.named_parameters())


def test_precision_must_match_weights():
    from hidrop_platform.config.loader import ConfigError

    with pytest.raises(ConfigError, match="precision=fp32 needs model.dtype=float32"):
        load_config(SMOKE, ["model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="must not set"):
        load_config(SMOKE, ["train.deepspeed={gradient_accumulation_steps: 8}"])


def test_resumable_sampler_starts_mid_epoch_on_the_same_order():
    from torch.utils.data import DistributedSampler

    from hidrop.training import ResumableSampler as _ResumableSampler

    data = list(range(50))
    full = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    full.set_epoch(4)
    expected = list(iter(full))
    resumed = _ResumableSampler(DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True))
    resumed.set_epoch(4)
    resumed.skip = 8
    assert list(iter(resumed)) == expected[8:] and len(resumed) == len(expected) - 8


class _Record(Hook):
    def __init__(self):
        self.steps, self.losses, self.ends = [], [], 0

    def on_step_end(self, loop, step):
        self.steps.append(step.step)
        self.losses.append(step.loss)

    def on_end(self, loop):
        self.ends += 1


def _plain_loop(recipe, steps, hooks, state=None):
    """The tiny model's plain training loop from the same initial weights and data."""
    from hidrop.tiny import tiny_vlm
    from hidrop.training import PlainRuntime, make_dataset, make_loader, prepare_module
    from hidrop_platform.train.worker import training_samples

    torch.manual_seed(0)
    cfg = load_config(pytest.ROOT / SMOKE)
    vlm = tiny_vlm(seed=0)
    data = make_dataset(vlm, training_samples(cfg, vlm.grid)[:12])
    module = prepare_module(vlm, cfg.main_schedule, recipe)
    loader, sampler = make_loader(vlm, data, recipe.micro_batch_size, seed=0)
    runtime = PlainRuntime(module, recipe)
    return TrainingLoop(runtime, loader, sampler, total=steps, recipe=recipe, hooks=hooks, state=state), runtime


def test_training_loop_resumes_mid_epoch_on_the_same_losses():
    """A loop restarted mid-epoch from its state (and the optimizer's) continues exactly as one that ran
    through: same batches (the sampler skips what was consumed), same LR schedule, same losses."""
    recipe = load_config(pytest.ROOT / SMOKE).train.model_copy(update={"micro_batch_size": 2, "grad_accum": 2})
    through = _Record()
    _plain_loop(recipe, 5, [through])[0].run()
    assert through.steps == [1, 2, 3, 4, 5] and through.ends == 1  # 12 samples / (2 x 2): 3 steps an epoch

    first = _Record()
    loop, runtime = _plain_loop(recipe, 5, [first])

    class StopAt(Hook):
        def on_step_end(self, loop, step):
            if step.step == 2:
                raise KeyboardInterrupt

    loop.hooks.append(StopAt())
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    assert loop.state.step == 2 and loop.state.batches_in_epoch == 4 and first.ends == 0
    rest = _Record()
    resumed = TrainingLoop(runtime, loop.loader, loop.sampler, total=5, recipe=recipe, hooks=[rest], state=loop.state)
    resumed.run()
    assert rest.steps == [3, 4, 5]
    assert first.losses + rest.losses == pytest.approx(through.losses, rel=1e-6)


def test_training_loop_pauses_hook_waits_and_stops_on_divergence(monkeypatch):
    import types

    from hidrop import training
    from hidrop.training import TrainingDiverged

    recipe = load_config(pytest.ROOT / SMOKE).train.model_copy(update={"micro_batch_size": 4, "grad_accum": 1})
    # a fake clock the hook advances: exact step times, whatever the host's speed or load
    clock = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Slow(Hook):
        def on_step_end(self, loop, step):
            clock[0] += 2.0  # work of the step's own (counted in the next step)
            with loop.paused():
                clock[0] += 100.0  # a wait for its turn (not the step's time)

    times = _Record()
    seconds = []

    class Seconds(Hook):
        def on_step_end(self, loop, step):
            seconds.append(step.seconds)

    loop, _ = _plain_loop(recipe, 3, [Slow(), times, Seconds()])
    loop.run()
    assert seconds == [0.0, 2.0, 2.0]  # the paused waits are not the steps' time; the rest is
    assert loop.state.accel_seconds == pytest.approx(sum(seconds))

    loop, _ = _plain_loop(recipe.model_copy(update={"lr": 1e30}), 6, [])
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step \d"):
        loop.run()


def test_fail_at_step_fires_on_the_first_attempt_only(monkeypatch):
    from hidrop.training import LoopState
    from hidrop_platform.train.faults import FAIL_AT_STEP_ENV, FailAtStep, fault_hooks

    monkeypatch.delenv(FAIL_AT_STEP_ENV, raising=False)
    assert fault_hooks() == []
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "2")
    [hook] = fault_hooks()
    recipe = load_config(pytest.ROOT / SMOKE).train.model_copy(update={"micro_batch_size": 4, "grad_accum": 1})
    loop, _ = _plain_loop(recipe, 3, [hook])
    with pytest.raises(RuntimeError, match="injected failure at step 2"):
        loop.run()
    again, _ = _plain_loop(recipe, 3, [FailAtStep(2)], state=LoopState(step=1, batches_in_epoch=1))
    assert again.run().step == 3  # resumed: runs to the end


@pytest.mark.slow
def test_worker_news_reach_the_driver_progress_and_stop(tmp_path, monkeypatch):
    """Rank 0's progress and its reason to stop travel through one Ray queue, not files in storage."""
    from hidrop_platform.config.training import DataSpec
    from hidrop_platform.train.driver import TrainSetupError, run_training

    monkeypatch.chdir(tmp_path)
    cfg = load_config(pytest.ROOT / SMOKE).model_copy(deep=True)
    cfg.train = cfg.train.model_copy(update={"num_workers": 1, "max_steps": 3, "storage_path": str(tmp_path / "runs")})
    cfg.tracking = cfg.tracking.model_copy(update={"enabled": False})
    seen: list[dict] = []
    run_training(cfg, progress=seen.append)
    assert [i["step"] for i in seen] == [1, 2, 3] and all(i["total"] == 3 for i in seen)
    folder = tmp_path / "runs" / cfg.name
    assert not (folder / "progress.json").exists() and not (folder / "stopped.txt").exists()  # no side files

    one = cfg.model_copy(update={"name": "no_batch"})  # one sample shared by two workers: none gets one
    one.train = cfg.train.model_copy(update={"num_workers": 2, "data": [DataSpec(name="easy_vqa", limit=1)]})
    # a copy skips validation; the workers validate what they are sent and say why in one line
    with pytest.raises(TrainSetupError, match=r"^train: train.data's limits give at most 1 training samples"):
        run_training(one)
