"""The `hidrop` model for lmms-eval: a llava-hf checkpoint or a hidrop export, run by the scheduled
engine under a preset, a schedule file, or the schedule the checkpoint carries. Only imported by
lmms-eval (it imports lmms_eval), never by hidrop itself."""

from __future__ import annotations

from typing import Optional

import torch
from lmms_eval.api.model import lmms

try:  # older lmms-eval registers through a decorator; newer ones read AVAILABLE_MODELS only
    from lmms_eval.api.registry import register_model
except ImportError:  # pragma: no cover - depends on the lmms-eval version

    def register_model(*names):
        return lambda cls: cls


from hidrop.evaluation.harness import generate_answers
from hidrop.sample import HUMAN, IMAGE_PLACEHOLDER, Sample
from hidrop.schedule import Schedule, preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


AUTO_BATCH_SIZE = 8  # what `--batch_size auto` means here: the harness batches by itself, no probing


def batch_size_from(value: int | str | None) -> int:
    """lmms-eval's --batch_size (N, "auto" or "auto:N") as the number of questions per generate call."""
    text = str(1 if value is None else value).strip()
    if text == "auto":
        return AUTO_BATCH_SIZE
    if text.startswith("auto:"):  # lmms-eval's "re-probe N times"; there is nothing to probe
        return AUTO_BATCH_SIZE
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"batch_size={value!r}: expected a whole number, 'auto' or 'auto:N'") from None
    if size < 1:
        raise ValueError(f"batch_size={value!r} must be at least 1")
    return size


@register_model("hidrop")
class HiDropLMM(lmms):
    """model_args: pretrained (checkpoint folder), schedule (a preset name such as hidrop_tok64, a
    schedule JSON/YAML file, or "checkpoint" for the one saved with the model; default hidrop_tok64),
    device, dtype (float32 / bfloat16 / float16), max_new_tokens (default for tasks that give none),
    attn_implementation. The batch size is lmms-eval's own --batch_size (N or auto = 8)."""

    def __init__(
        self,
        pretrained: str,
        schedule: str = "hidrop_tok64",
        device: Optional[str] = None,
        dtype: str = "float16",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 16,
        attn_implementation: str = "sdpa",
        **unused,
    ):
        super().__init__()
        from hidrop.models import load_model

        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
        self.device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vlm = load_model(pretrained, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
        self.vlm.model.to(self.device_name)
        self.schedule = self._schedule(schedule)
        self.batch_size_per_call = batch_size_from(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """As lmms-eval's, except that a key given both in --model_args and by lmms-eval itself
        (batch_size, device) is not a TypeError: --model_args wins, as the more specific."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string or "")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **args})

    def _schedule(self, spec: str) -> Schedule:
        n_layers, n_vis = self.vlm.num_layers, self.vlm.num_vision_tokens
        if spec == "checkpoint":
            if self.vlm.schedule is None:
                raise ValueError("schedule=checkpoint: this checkpoint carries no schedule")
            return self.vlm.schedule
        if spec.endswith((".json", ".yaml", ".yml")):
            import yaml

            with open(spec, encoding="utf-8") as f:
                data = yaml.safe_load(f)
            return Schedule.model_validate(data.get("schedule", data) if isinstance(data, dict) else data)
        return preset(spec, n_layers, n_vis)

    def generate_until(self, requests) -> list[str]:
        samples, budgets, stops = [], [], []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            visuals = [v for v in (visuals or []) if v is not None]
            if len(visuals) > 1:
                raise ValueError(f"{task}: {len(visuals)} images in one question; LLaVA-1.5 takes one")
            text = context.replace(IMAGE_PLACEHOLDER, "").strip()
            image = visuals[0] if visuals else None
            value = f"{IMAGE_PLACEHOLDER}\n{text}" if image is not None else text
            samples.append(Sample(id=str(i), conversations=({"from": HUMAN, "value": value},), image=image))
            budgets.append(int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)))
            until = gen_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
        answers: list[str] = [""] * len(samples)
        for budget in sorted(set(budgets)):  # one generation length per group of requests
            idx = [i for i, b in enumerate(budgets) if b == budget]
            out = generate_answers(
                self.vlm,
                self.schedule,
                [samples[i] for i in idx],
                max_new_tokens=budget,
                batch_size=self.batch_size_per_call,
            )
            for i, text in zip(idx, out):
                for stop in stops[i]:
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                answers[i] = text
        return answers

    def loglikelihood(self, requests):
        tasks = sorted({str(r.task_name) for r in requests if getattr(r, "task_name", None)})
        named = f"task {', '.join(tasks)}" if tasks else "this task"
        raise NotImplementedError(
            f"{named} is scored by log-likelihood; the hidrop model answers by generation (generate_until): "
            "pick a generation variant of it"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("multi-round generation is not supported by the hidrop model")
