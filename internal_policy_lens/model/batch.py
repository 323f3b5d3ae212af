"""Token lists -> padded tensors, and position ids that follow the padding."""

from __future__ import annotations

import torch


def pad(
    seqs: list[list[int]], pad_id: int, device=None, *, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into ``input_ids`` and ``attention_mask`` ``[batch, pos]``.

    ``side="left"`` for generation (every prompt ends at the last column); ``side="right"`` for
    analysis and training, where causal attention keeps a real token from seeing the padding
    after it.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    length = max(len(s) for s in seqs)
    # Filled on the host, row by row, then copied to ``device`` once.
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), length), dtype=torch.long, device="cpu")
    for row, seq in enumerate(seqs):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long, device="cpu")
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a padded sequence matches itself alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
