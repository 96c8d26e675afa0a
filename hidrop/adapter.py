"""Every call into transformers internals lives here (pinned: transformers 5.23).

The engine sees a `Backbone`: embeddings, decoder layers, final norm, LM head, rotary embedding, the
image-feature path of llava-hf models, and a cache. Decoder layers, attention and MLP are called stock.
When transformers changes a signature, this is the one file to update.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import transformers
from torch import nn
from transformers import DynamicCache, LlavaForConditionalGeneration, PreTrainedModel
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

TESTED_TRANSFORMERS = "5.23.0"
SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2")


def untested_transformers(installed: Optional[str] = None) -> Optional[str]:
    """A one-line warning when the installed transformers is not the one this adapter was tested
    against (its decoder-layer and cache calls changed between 4.4x, 4.5x and 5.x), else None."""
    installed = installed or transformers.__version__
    if installed == TESTED_TRANSFORMERS:
        return None
    return (
        f"transformers {installed} is installed; hidrop's adapter was tested with {TESTED_TRANSFORMERS}: "
        "run the engine tests (pytest tests/test_engine.py) before trusting its outputs"
    )


@functools.cache
def _warn_untested_once() -> None:
    message = untested_transformers()
    if message:
        warnings.warn(message, stacklevel=3)


class Backbone:
    """A uniform view of a Llama-family causal LM or a llava-hf `LlavaForConditionalGeneration`."""

    def __init__(self, model: PreTrainedModel):
        _warn_untested_once()
        self.model = model
        self.is_llava = isinstance(model, LlavaForConditionalGeneration)
        if self.is_llava:
            self.decoder = model.model.language_model
            self.text_config = model.config.text_config
            self.image_token_id: Optional[int] = model.config.image_token_id
        else:
            if not hasattr(model, "model") or not hasattr(model.model, "layers"):
                raise TypeError(f"{type(model).__name__} is not a Llama-family causal LM or a llava-hf model")
            self.decoder = model.model
            self.text_config = model.config
            self.image_token_id = getattr(model.config, "image_token_id", None)
        self.lm_head: nn.Linear = model.lm_head
        self.layers: nn.ModuleList = self.decoder.layers
        self.norm: nn.Module = self.decoder.norm
        self.rotary_emb: nn.Module = self.decoder.rotary_emb
        self.num_layers = len(self.layers)
        self.num_heads = self.text_config.num_attention_heads
        self.num_kv_heads = self.text_config.num_key_value_heads
        self.head_dim = getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    @property
    def attn_implementation(self) -> str:
        impl = self.text_config._attn_implementation or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"attention implementation {impl!r} is not supported; use one of {SUPPORTED_ATTENTION}")
        return impl

    @property
    def uses_flash(self) -> bool:
        return self.attn_implementation.startswith("flash_attention")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    @property
    def projector(self) -> Optional[nn.Module]:
        """llava-hf's multi-modal projector (None for a plain causal LM)."""
        return self.model.model.multi_modal_projector if self.is_llava else None

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projector outputs for every image, concatenated: (num_images * N_v, hidden)."""
        if not self.is_llava:
            raise ValueError("pixel_values given to a model without a vision tower; pass vision_embeds instead")
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(hidden, position_ids=position_ids)

    def run_layer(
        self,
        idx: int,
        hidden: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Optional[DynamicCache],
    ) -> torch.Tensor:
        out = self.layers[idx](
            hidden,
            attention_mask=attention_mask,
            # RoPE comes in position_embeddings. FlashAttention would read position ids with gaps (pruned
            # tokens keep their positions) as packed sequences, and check them with a host sync per layer
            position_ids=None if self.uses_flash else position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )
        return out[0] if isinstance(out, tuple) else out

    def query_key(
        self,
        idx: int,
        query_hidden: torch.Tensor,
        key_hidden: torch.Tensor,
        query_rope: tuple[torch.Tensor, torch.Tensor],
        key_rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Layer idx's RoPE'd queries (B, H, Q, D) and GQA-expanded keys (B, H, K, D), and its scale.

        Uses the layer's own input_layernorm, q_proj and k_proj; writes nothing anywhere (no cache).
        """
        layer = self.layers[idx]
        attn = layer.self_attn
        d = self.head_dim
        q = attn.q_proj(layer.input_layernorm(query_hidden))
        k = attn.k_proj(layer.input_layernorm(key_hidden))
        q = q.view(*q.shape[:2], -1, d).transpose(1, 2)
        k = k.view(*k.shape[:2], -1, d).transpose(1, 2)
        # queries and keys sit at different positions, so each side gets its own cos/sin (Llama's RoPE)
        q = _rotate(q, *query_rope)
        k = _rotate(k, *key_rope)
        k = repeat_kv(k, self.num_heads // self.num_kv_heads)
        return q, k, attn.scaling

    def attention_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A 4D (B, 1, Q, K) mask in the form this attention implementation reads.

        Always sized to the exact key length of the stage (the wrappers slice without checking).
        """
        if self.attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    return x * cos + rotate_half(x) * sin


class ScheduleCache(DynamicCache):
    """A DynamicCache whose layers hold different numbers of tokens.

    Besides keys and values it remembers, per layer, which prefill columns are real (the rest is
    padding of the stage layout) and where decode positions continue, and it reports the LOGICAL
    (unpruned) sequence length: layer 0 holds text only under late injection, so its length is wrong.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.logical_length = 0
        self.decoded = 0
        self.layer_stage: list[int] = []
        self.stage_key_ok: list[torch.Tensor] = []  # (B, W_s) real prefill columns per stage
        self.stage_next_pos: list[torch.Tensor] = []  # (B,) position of the first decode token per stage
        self.prefilled = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.logical_length

    def physical_length(self, layer_idx: int) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0
