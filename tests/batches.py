"""Sample and batch builders shared by the engine tests."""

from __future__ import annotations

import torch

from hidrop.tiny import TINY_IMAGE_TOKEN

N_VIS = 16


def make_samples(seed=0, lengths=((5, 9), (2, 4), (7, 3), None, (0, 6)), vocab=100):
    """Each sample: (ids, vision mask). A spec (a, b) = a text tokens, the image, b text tokens; None = text only."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for spec in lengths:
        if spec is None:
            ids = torch.randint(3, vocab, (11,), generator=g)
            vis = torch.zeros(11, dtype=torch.bool)
        else:
            a, b = spec
            ids = torch.cat(
                [
                    torch.randint(3, vocab, (a,), generator=g),
                    torch.full((N_VIS,), TINY_IMAGE_TOKEN),
                    torch.randint(3, vocab, (b,), generator=g),
                ]
            )
            vis = ids == TINY_IMAGE_TOKEN
        samples.append((ids, vis))
    return samples


def pad_batch(samples, left=True, pad_id=0):
    L = max(len(ids) for ids, _ in samples)
    ids_b = torch.full((len(samples), L), pad_id)
    vis_b = torch.zeros(len(samples), L, dtype=torch.bool)
    am = torch.zeros(len(samples), L, dtype=torch.long)
    for i, (ids, vis) in enumerate(samples):
        sl = slice(L - len(ids), L) if left else slice(0, len(ids))
        ids_b[i, sl], vis_b[i, sl], am[i, sl] = ids, vis, 1
    return ids_b, vis_b, am


def vision_features(samples, hidden=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(vis.sum()), hidden, generator=g) for _, vis in samples]
