"""Differentiable Top-K (DTop-K, Liu et al. ICML 2024) as HiDrop uses it.

Forward always keeps the exact top-k (batches stay rectangular); the soft mask only shapes the
backward pass through a straight-through factor on the kept tokens:
    c'_i = mean_j 1(c_i >= c_j)            normalized rank among the N live vision tokens (the candidates)
    m_i  = sigmoid(lambda * (c'_i - a))     lambda = N, a = 1 - k / N
so lambda * (c'_i - a) = N * (c'_i - 1) + k. The temperature is the number of candidates being ranked at
that drop (the paper's N_v, "the number of the visual candidate tokens"), as the DTop-K reference scales
it: with the image's original count instead, a drop among 3 live tokens saturates the sigmoid and its
ratio gets no gradient. The rank is piecewise constant, so the scores never receive gradient; with a
learnable keep count k the count does. With a fixed k ("as released") the factor is the constant 1.
"""

from __future__ import annotations

import torch


def normalized_rank(scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """c'_i = fraction of live tokens j with c_i >= c_j (per row); 0 where not live. (B, W)."""
    ge = (scores[:, :, None] >= scores[:, None, :]) & live[:, None, :]
    return ge.sum(-1).float() / live.sum(-1, keepdim=True).clamp(min=1).float() * live.float()


def dtopk_soft_mask(
    scores: torch.Tensor, live: torch.Tensor, keep_fraction: torch.Tensor, num_vision_tokens: int
) -> torch.Tensor:
    """Soft keep mask m (B, W); differentiable in keep_fraction (of the ORIGINAL count), not in scores."""
    rank = normalized_rank(scores.detach(), live)
    candidates = live.sum(-1, keepdim=True).clamp(min=1).float()
    keep = keep_fraction * num_vision_tokens
    return torch.sigmoid(candidates * (rank - 1.0) + keep) * live.float()


def straight_through(hidden: torch.Tensor, soft: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Multiply the kept tokens by 1 + m - stopgrad(m): identity forward, d/dm backward."""
    factor = torch.where(where, 1.0 + soft - soft.detach(), torch.ones_like(soft))
    return hidden * factor[..., None].to(hidden.dtype)
