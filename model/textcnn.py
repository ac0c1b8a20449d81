"""TextCNN over a title's token (or character) vectors: the text vector of the fusion model.

As in MultimodalVideoTag: one 1-D convolution per window size (2, 3, 4), ``filters`` output
channels each (256), tanh, max-pool over time, the pooled vectors concatenated
(3 x 256 = 768 values).

Masking: padded positions are zeroed before the convolution and a convolution output position is
pooled only if its window starts on a real token and lies inside the title; a title shorter than a
window gets exactly one position, the window starting at the first token (its overhang reads zeros,
the same zeros whatever the batch's padding). A sequence with no tokens gives a zero vector.
"""

from __future__ import annotations

import torch
from torch import nn


class TextCNN(nn.Module):
    def __init__(self, in_dim: int, filters: int = 256, windows: tuple[int, ...] = (2, 3, 4)) -> None:
        super().__init__()
        self.windows = tuple(int(w) for w in windows)
        self.convs = nn.ModuleList(nn.Conv1d(in_dim, filters, w) for w in self.windows)
        self.out_dim = filters * len(self.windows)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), mask (B, L) bool -> (B, filters * len(windows))."""
        x = x * mask.unsqueeze(-1).to(x.dtype)
        lengths = mask.sum(dim=1)
        pad = max(self.windows) - x.shape[1]
        xt = x.transpose(1, 2)  # (B, D, L)
        if pad > 0:
            xt = nn.functional.pad(xt, (0, pad))
        pooled = []
        for window, conv in zip(self.windows, self.convs, strict=True):
            y = torch.tanh(conv(xt))  # (B, F, L' = L - w + 1)
            n_valid = torch.where(lengths > 0, (lengths - window + 1).clamp(min=1), torch.zeros_like(lengths))
            valid = torch.arange(y.shape[2], device=y.device)[None, :] < n_valid[:, None]  # (B, L')
            y = y.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(dim=2)
            pooled.append(torch.where((lengths > 0).unsqueeze(1), y, torch.zeros_like(y)))
        return torch.cat(pooled, dim=1)
