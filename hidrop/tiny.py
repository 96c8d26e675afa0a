"""Tiny random models built from configs (no downloads), for tests and CPU benchmarks."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

TINY_VOCAB = 128
TINY_IMAGE_TOKEN = TINY_VOCAB - 1  # the last id marks image positions


def tiny_llama_config(
    num_layers: int = 8,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = TINY_VOCAB,
    attn_implementation: str = "sdpa",
) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llama(seed: int = 0, **kwargs) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kwargs)).eval()


def tiny_llava(
    seed: int = 0,
    num_layers: int = 8,
    image_size: int = 32,
    patch_size: int = 8,
    attn_implementation: str = "sdpa",
    **text_kwargs,
) -> LlavaForConditionalGeneration:
    """A random LLaVA: CLIP ViT (16 patches at 32 px / 8) + mlp2x_gelu projector + a tiny Llama."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = tiny_llama_config(num_layers=num_layers, attn_implementation=attn_implementation, **text_kwargs)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=TINY_IMAGE_TOKEN,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    model.config._attn_implementation = attn_implementation
    model.config.text_config._attn_implementation = attn_implementation
    model.config.vision_config._attn_implementation = attn_implementation
    return model.eval()


# ---- a tokenizer and a complete tiny vision-language model for harness tests ---------------------
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0-5 (pad/bos/eos as above)
_WORDS = (
    "user assistant system ? . , : ' answer the question using a single word or phrase what which is are "
    "color colour of shape there how many left right above below written letter background in image this "
    "yes no red green blue yellow black white gray grey orange purple pink brown teal "
    "circle square triangle rectangle star cross 0 1 2 3 4 5 6 7 8 9"
).split() + [chr(c) for c in range(ord("b"), ord("z") + 1) if chr(c) not in ("a",)]


def tiny_tokenizer():
    """A word-level tokenizer whose vocabulary fits the tiny models (ids < 127; 127 is the image token).

    Covers the chat-template tokens and the offline benchmarks' answer words, so closed-vocabulary
    scoring and generation work end to end on random tiny models.
    """
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(_WORDS))
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + words)}
    for i in range(len(vocab), TINY_IMAGE_TOKEN):
        vocab[f"<extra_{i}>"] = i
    vocab["<image>"] = TINY_IMAGE_TOKEN
    assert len(vocab) == TINY_VOCAB, len(vocab)
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    return tok


def tiny_vlm(seed: int = 0, num_layers: int = 8, template: str = "chatml"):
    """`tiny_llava` (CLIP 32 px -> 4x4 = 16 tokens) as a `VisionLanguageModel` with `tiny_tokenizer`."""
    from hidrop.models import ImageProcessor, VisionLanguageModel

    model = tiny_llava(seed=seed, num_layers=num_layers)
    return VisionLanguageModel(
        model=model,
        tokenizer=tiny_tokenizer(),
        template=template,
        image_token_id=TINY_IMAGE_TOKEN,
        num_vision_tokens=16,
        image_processor=ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pad_to_square=True),
        kind="llava_hf",
    )
