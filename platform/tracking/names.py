"""Every MLflow name hidrop writes and the dashboards read: tags and their values, params, metrics,
artifact paths. Writers (tune, train, analyze, tracking) and readers (dashboards/report) import them from
here, so the two cannot drift apart; tests/test_mlflow_names.py checks that no other module spells one,
and tests/test_mlflow_schema.py that what the runs write stays what it was.
"""

from __future__ import annotations

from typing import Mapping

# ---- tags -------------------------------------------------------------------------------------------
KIND = "hidrop.kind"  # what the run is: KIND_SWEEP / KIND_TRIAL / KIND_TRAIN / KIND_ANALYZE / KIND_COMPARE
SWEEP = "hidrop.sweep"  # the sweep's name, on the parent and on every trial
SEED = "hidrop.seed"  # "True" on a seed (preset) trial
TRIAL_ID = "hidrop.trial_id"  # Ray Tune's trial id
STATUS = "status"  # one of the statuses below (the run's MLflow status is coarser)
ATTEMPTS = "attempts"  # how many times a trial started (a retry logs into the same run)
ERROR = "error"  # a failed trial's one-line reason
DIVERGED = "diverged"  # a training stopped by a non-finite loss
RESUMED_FROM_STEP = "hidrop.resumed_from_step"  # a continued training: the checkpoint step it went on from
INTERRUPTED_AT_STEP = "hidrop.interrupted_at_step"  # a training stopped by Ctrl+C: its last reported step
DEVICE_TYPE = "device_type"  # cpu / cuda
RAY_NODE = "hidrop.ray_node"  # the Ray node id a trial ran on (its last attempt's)
NUM_WORKERS = "num_workers"
STAGE = "stage"  # pretrain / finetune
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nesting tag
BLIND_LEVEL_TAG = "hidrop.blind_level"  # "True" on a trial not significantly above blind: never a discovery

KIND_SWEEP, KIND_TRIAL, KIND_TRAIN, KIND_ANALYZE = "sweep", "trial", "train", "analyze"
KIND_COMPARE = "compare"  # `hidrop compare --track`: methods of several evaluations, paired by question

# values of the STATUS tag
RUNNING = "running"
FINISHED = "finished"
STOPPED_EARLY = "stopped_early"  # ASHA stopped a trained trial that had evaluated: an outcome
STOPPED = "stopped"  # interrupted before any result
FAILED = "failed"
INTERRUPTED = "interrupted"  # a sweep parent stopped by Ctrl+C / SIGTERM
OUTCOME_STATUSES = (FINISHED, STOPPED_EARLY)  # trials whose metrics are results (a Pareto front uses only these)

# ---- metrics ----------------------------------------------------------------------------------------
RELATIVE_SCORE = "relative_score"  # the paper's Avg (%) against the unpruned model
RELATIVE_SCORE_LOW = "relative_score_lo"  # its paired 95% interval, when the run measured the reference too
RELATIVE_SCORE_HIGH = "relative_score_hi"
BLIND_LEVEL = "blind_level"  # 1: the relative score is not significantly above blind's (paired); also a tag
BLIND_RELATIVE = "blind_relative_score"  # blind's relative score: a sweep parent's, or a rung trial's questions'
BLIND_RELATIVE_LOW = "blind_relative_score_lo"  # on a sweep parent: blind's relative score interval
BLIND_RELATIVE_HIGH = "blind_relative_score_hi"
RUNG = "rung"  # a multi-fidelity trial's evaluation round (1-based)
QUESTIONS_RUN = "questions_run"  # (method, question) pairs a trial's evaluation scored with the model
CONFIRM = "confirm/"  # held-out confirmation: confirm/relative_score, confirm/score/<bench>, ...
OPTIMISM_GAP = "confirm/optimism_gap"  # on a sweep parent: mean search minus confirmed score of the winners
AVG_VISION_TOKENS = "avg_vision_tokens"
MEASURED_AVG_VISION_TOKENS = "measured_avg_vision_tokens"
VISION_TFLOPS = "vision_tflops"  # per sample, the paper's formula
MODEL_TFLOPS = "model_tflops"  # per sample, the whole forward
ACCELERATOR_HOURS = "accelerator_hours"  # wall time x devices, measured
WALL_S = "wall_s"
SAMPLES = "samples"  # questions a trial was evaluated on
TRAIN_STEP = "train_step"  # the step a trained trial's evaluation belongs to
# a trial's outcome metrics, as its summary row carries them (hidrop_platform.tune.summary.TrialRecord)
TRIAL_METRICS = (
    RELATIVE_SCORE,
    RELATIVE_SCORE_LOW,
    RELATIVE_SCORE_HIGH,
    BLIND_LEVEL,
    RUNG,
    QUESTIONS_RUN,
    VISION_TFLOPS,
    MODEL_TFLOPS,
    AVG_VISION_TOKENS,
    MEASURED_AVG_VISION_TOKENS,
    ACCELERATOR_HOURS,
    WALL_S,
    TRAIN_STEP,
    SAMPLES,
)
LOSS = "loss"
LR = "lr"
GRAD_NORM = "grad_norm"
EPOCH = "epoch"
SAMPLES_PER_S = "samples_per_s"
TOKENS_PER_S = "tokens_per_s"
VISION_TFLOPS_PER_SAMPLE = "vision_tflops_per_sample"
MODEL_TFLOPS_PER_SAMPLE = "model_tflops_per_sample"
VISION_TOKENS_KEPT = "vision_tokens_kept"
TRIALS = "trials"  # on a sweep parent
FAILED_TRIALS = "failed_trials"
PARETO_SIZE = "pareto_size"
REJECTED_SAMPLES = "rejected_samples"
BUDGET_LOSS = "budget_loss"  # learnable keep ratios' token-budget term
ALIGN_LOSS = "align_loss"  # a trained trial's stage 1 (projector alone, tune.align_steps), one step each
S_INTRA = "s_intra"  # analyze's curves, one step per layer
S_CROSS = "s_cross"
ILVAS_MEAN = "ilvas_mean"
ALL_TOKENS_SCORE = "all_tokens_score"  # analyze's sweep endpoints
BLIND_SCORE = "blind_score"
EXIT_SWEEP_SCORE = "exit_sweep_score"
INJECT_SWEEP_SCORE = "inject_sweep_score"
SE_SUFFIX = "_se"  # a curve's standard error over the calibration samples: s_intra_se, s_cross_se, ilvas_mean_se
EXIT_SWEEP_DIFF = "exit_sweep_diff"  # a sweep point minus all tokens, paired, with its 95% interval
INJECT_SWEEP_DIFF = "inject_sweep_diff"
LOW_SUFFIX, HIGH_SUFFIX = "_lo", "_hi"

# per-benchmark metrics: PREFIX + benchmark name
SCORE = "score/"  # the run's (or trial's) score
REFERENCE = "reference/"  # a sweep's unpruned reference
BLIND = "blind/"  # a sweep's blind (no image) baseline
ALL_TOKENS = "all_tokens/"  # a trained model evaluated unpruned
SCORE_LOW = "score_lo/"  # the 95% bootstrap interval of score/<bench>
SCORE_HIGH = "score_hi/"
LEARNED_KEEP = "learned_keep/"  # learnable keep counts, per filtering layer (1-based)
KEEP_RATIO = "keep_ratio/"  # learnable keep ratios (of the image's tokens) before rounding, per filtering layer

# ---- params -----------------------------------------------------------------------------------------
# the experiment config, flattened to dotted names (hidrop_platform.config.schema.flatten), plus:
SEARCH = "search."  # a trial's sampled overrides
PROPOSED = "proposed."  # analyze's proposed schedule fields
VERSION = "version."  # package versions of a training
SCHEDULE_PLAN = "schedule_plan."  # a training's vision tokens per layer (1-based)
PLAN = "schedule.plan"  # the resolved schedule's per-layer plan (Schedule.describe())
KEEP_COUNTS = "schedule.keep_counts"
DROP_LAYERS = "schedule.drop_layers"
RESOLVED_NAME = "schedule.resolved_name"
METHOD = "schedule.method"  # vanilla / fastv / pdrop / hidrop (hidrop.evaluation.published.schedule_method)
RESOLVED_AVG_TOKENS = "schedule.resolved_avg_tokens"
RESOLVED_POSITION_MODE = "schedule.resolved_position_mode"
RESOLVED_QUERY_RULE = "schedule.resolved_query_rule"
RESOLVED_SELECTOR = "schedule.resolved_selector"
# config names the dashboards read back
MODEL_KIND = "model.kind"
MODEL_PATH = "model.path"
EVAL_PUBLISHED = "eval.published"
EVAL_PUBLISHED_TRAINING = "eval.published_training"
SCHEDULE_PRESET = "schedule.preset"
SCHEDULE_POSITION_MODE = "schedule.position_mode"
TRAIN_MAX_STEPS = "train.max_steps"
FIDELITY_RUNGS = "tune.fidelity.rungs"  # a multi-fidelity sweep's rungs: only full-rung trials make its front
NAME = "name"
DESCRIPTION = "description"
SCHEDULE_NAME = "schedule.name"
TRACKING_SECTION = "tracking."

# ---- artifact paths ---------------------------------------------------------------------------------
CONFIG_YAML = "config/experiment.yaml"  # the resolved experiment
DEEPSPEED_JSON = "config/deepspeed.json"
PARETO_DIR = "pareto"  # a sweep's pareto.png, pareto.md, sweep.json
REPORT_DIR = "report"  # hidrop report's files, on the sweep's parent
ANALYSIS_DIR = "analysis"  # analyze's curves.png, analysis.json, proposed.yaml
ANALYSIS_CURVES = "analysis/curves.png"
MODEL_DIR = "model"  # a training's export; intermediate ones under model/step-N
RECORDS_DIR = "eval"  # eval/records.jsonl.gz: every question's record of a trial's or training's evaluation
RECORDS_FILE = "records.jsonl.gz"
CONFIRM_DIR = "confirm"  # confirm/records.jsonl.gz on a sweep parent: the held-out questions' records


def per_benchmark(prefix: str, scores: Mapping[str, float]) -> dict[str, float]:
    """{prefix + benchmark: score} for logging."""
    return {f"{prefix}{b}": v for b, v in scores.items()}


def strip_prefix(prefix: str, values: Mapping[str, float | str]) -> dict:
    """The entries under `prefix`, keyed by what follows it (per-benchmark metrics, search params)."""
    return {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}


def model_step_dir(step: int) -> str:
    return f"{MODEL_DIR}/step-{step}"


# ---- `hidrop compare --track` -------------------------------------------------------------------------
COMPARE_REFERENCE = "compare.reference"  # param: the label relative scores are against
COMPARE_BASELINE = "compare.baseline"  # param: the label differences are taken to (blind), or ""
COMPARE_SPECS = "compare.specs"  # param: the FILE:METHOD=LABEL specs, space-separated
COMPARE_ARTIFACT = "compare/compare.json"  # the whole comparison, read by dashboards/report.py


def safe_metric_part(label: str) -> str:
    """A label as MLflow accepts it inside a metric name (letters, digits, _ - . / and spaces)."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", label)
