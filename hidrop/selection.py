"""Differentiable Top-K (DTop-K, Liu et al. ICML 2024) as HiDrop uses it.

Forward always keeps the exact top-k (batches stay rectangular); the soft mask only shapes the
backward pass through a straight-through factor on the kept tokens:
    c'_i = mean_j 1(c_i >= c_j)            normalized rank among the live vision tokens
    m_i  = sigmoid(lambda * (c'_i - a))     lambda = N_v, a = 1 - k / N
The rank is piecewise constant, so the scores never receive gradient; with a learnable keep fraction
(`a` moves with it) the fraction does. With a fixed `a` ("as released") the factor is the constant 1.
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
    """Soft keep mask m (B, W); differentiable in keep_fraction (of the ORIGINAL N_v), not in scores."""
    rank = normalized_rank(scores.detach(), live)
    n_live = live.sum(-1, keepdim=True).clamp(min=1).float()
    a = 1.0 - keep_fraction * num_vision_tokens / n_live
    return torch.sigmoid(num_vision_tokens * (rank - a)) * live.float()


def straight_through(hidden: torch.Tensor, soft: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Multiply the kept tokens by 1 + m - stopgrad(m): identity forward, d/dm backward."""
    factor = torch.where(where, 1.0 + soft - soft.detach(), torch.ones_like(soft))
    return hidden * factor[..., None].to(hidden.dtype)
