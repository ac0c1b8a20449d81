"""The label set: "level1-level2" tags and the level-1 categories derived from them.

A label is the string ``"<level1>-<level2>"`` (MultimodalVideoTag's ``class.txt``, e.g. ``拍人-帅哥``); it
is split at the *first* ``-``, so level-2 names may contain dashes. A label without a dash is its own
level-1 category. The model scores level-2 labels only (multi-label, sigmoid); a level-1 category's
score is the **maximum** over its children's probabilities ("the video is in this group as surely as
its most likely tag in the group"), so a category never scores below any of its tags.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch


def level1_of(label: str) -> str:
    """The level-1 part of a ``"level1-level2"`` label (the whole label when there is no dash)."""
    return label.split("-", 1)[0]


class LabelSet:
    """An ordered list of level-2 labels; index ``i`` is output ``i`` of the model."""

    def __init__(self, labels: Iterable[str]) -> None:
        self.labels: list[str] = [str(label).strip() for label in labels]
        if any(not label for label in self.labels):
            raise ValueError("empty label")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("duplicate labels")
        self.index: dict[str, int] = {label: i for i, label in enumerate(self.labels)}
        self.level1: list[str] = list(dict.fromkeys(level1_of(label) for label in self.labels))
        level1_index = {name: i for i, name in enumerate(self.level1)}
        #: children[j] = indices of the level-2 labels under level-1 category j
        self.children: list[list[int]] = [[] for _ in self.level1]
        for i, label in enumerate(self.labels):
            self.children[level1_index[level1_of(label)]].append(i)
        self._parent = np.array([level1_index[level1_of(label)] for label in self.labels], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and other.labels == self.labels

    def __repr__(self) -> str:
        return f"LabelSet({len(self.labels)} labels, {len(self.level1)} level-1, hash={self.hash()})"

    def hash(self) -> str:
        """sha256 of the newline-joined label list, first 12 hex digits (order matters)."""
        return hashlib.sha256("\n".join(self.labels).encode("utf-8")).hexdigest()[:12]

    @property
    def parent(self) -> np.ndarray:
        """(C,) level-1 index of each label."""
        return self._parent

    @classmethod
    def from_file(cls, path: str | Path) -> LabelSet:
        """One label per line (blank lines skipped). MVT's optional ``label \\t index`` columns are
        accepted: lines are ordered by the index column when every line has one."""
        rows = [line.rstrip("\r\n").split("\t") for line in Path(path).read_text("utf-8").splitlines()]
        rows = [row for row in rows if row and row[0].strip()]
        if rows and all(len(row) >= 2 and row[1].strip().isdigit() for row in rows):
            rows.sort(key=lambda row: int(row[1]))
        return cls(row[0].strip() for row in rows)

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text("".join(label + "\n" for label in self.labels), encoding="utf-8")

    def encode(self, labels: Iterable[str]) -> np.ndarray:
        """Multi-hot (C,) float32 vector; labels not in the set are ignored."""
        out = np.zeros(len(self.labels), dtype=np.float32)
        for label in labels:
            i = self.index.get(label)
            if i is not None:
                out[i] = 1.0
        return out

    def level1_scores(self, probs: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """(B, C) level-2 probabilities -> (B, n_level1) level-1 scores (max over children)."""
        if isinstance(probs, torch.Tensor):
            return torch.stack([probs[:, idx].amax(dim=1) for idx in self.children], dim=1)
        probs = np.asarray(probs)
        return np.stack([probs[:, idx].max(axis=1) for idx in self.children], axis=1)
