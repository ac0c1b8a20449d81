"""The label set: "level1-level2" tags and the level-1 categories derived from them.

A label is the string ``"<level1>-<level2>"`` (MultimodalVideoTag's ``class.txt``, e.g. ``拍人-帅哥``); it
is split at the *first* ``-``, so level-2 names may contain dashes. A label without a dash is its own
level-1 category. The model scores level-2 labels only (multi-label, sigmoid); a level-1 category's
score is the **maximum** over its children's probabilities ("the video is in this group as surely as
its most likely tag in the group"), so a category never scores below any of its tags.

Label files (``class.txt``, and ``labels.txt`` of stores and checkpoints) are read exactly as
MultimodalVideoTag's ``load_class_file`` maps names to output indices (see :meth:`LabelSet.from_file`):
a line's index is its 0-based line number, or its second tab-separated column when the line has
exactly two; blank lines take up their line's index too; two names with one index are *aliases* of
one output. Outputs that no name maps to (e.g. the index of a blank line between labels) are
*unused*: they keep their position, have the placeholder name ``<unused:i>`` and belong to no
level-1 category.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

#: more outputs than this in a label file is refused (a stray "name\t999999999" would otherwise
#: build a head of that width)
MAX_LABELS = 100_000


def level1_of(label: str) -> str:
    """The level-1 part of a ``"level1-level2"`` label (the whole label when there is no dash)."""
    return label.split("-", 1)[0]


def unused_name(index: int) -> str:
    """Placeholder name of an output no label maps to."""
    return f"<unused:{index}>"


class LabelSet:
    """An ordered list of level-2 labels; index ``i`` is output ``i`` of the model.

    ``labels[i]`` names output ``i``; ``None`` marks an unused output (named :func:`unused_name`,
    never a target, in no level-1 category). ``aliases`` maps extra names to output indices: encoding
    an alias sets its output. ``index`` maps every name (labels and aliases) to its output."""

    def __init__(self, labels: Iterable[str | None], *, aliases: Mapping[str, int] | None = None) -> None:
        names = list(labels)
        self.unused: frozenset[int] = frozenset(i for i, label in enumerate(names) if label is None)
        self.labels: list[str] = [unused_name(i) if label is None else str(label).strip()
                                  for i, label in enumerate(names)]
        if any(not label for label in self.labels):
            raise ValueError("empty label")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("duplicate labels")
        if any(label.startswith("<unused:") for i, label in enumerate(self.labels) if i not in self.unused):
            raise ValueError("a label is named like an unused output (<unused:N>)")
        self.aliases: dict[str, int] = {str(name).strip(): int(i) for name, i in (aliases or {}).items()}
        self.index: dict[str, int] = {label: i for i, label in enumerate(self.labels) if i not in self.unused}
        for name, i in self.aliases.items():
            if not name or name in self.index or not 0 <= i < len(self.labels) or i in self.unused:
                raise ValueError(f"alias {name!r} -> {i}: empty, already a label, or not a used output")
            self.index[name] = i
        used = [i for i in range(len(self.labels)) if i not in self.unused]
        self.level1: list[str] = list(dict.fromkeys(level1_of(self.labels[i]) for i in used))
        level1_index = {name: j for j, name in enumerate(self.level1)}
        #: children[j] = indices of the level-2 labels under level-1 category j
        self.children: list[list[int]] = [[] for _ in self.level1]
        for i in used:
            self.children[level1_index[level1_of(self.labels[i])]].append(i)
        self._parent = np.array([-1 if i in self.unused else level1_index[level1_of(label)]
                                 for i, label in enumerate(self.labels)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and other.labels == self.labels and other.aliases == self.aliases

    def __repr__(self) -> str:
        return f"LabelSet({len(self.labels)} labels, {len(self.level1)} level-1, hash={self.hash()})"

    def hash(self) -> str:
        """sha256 of the newline-joined label list (order matters), followed by ``alias\\tindex`` lines
        in sorted order when there are aliases; first 12 hex digits."""
        text = "\n".join(self.labels)
        if self.aliases:
            text += "\n" + "\n".join(f"{name}\t{i}" for name, i in sorted(self.aliases.items()))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    @property
    def parent(self) -> np.ndarray:
        """(C,) level-1 index of each label; -1 for an unused output."""
        return self._parent

    @classmethod
    def from_file(cls, path: str | Path) -> LabelSet:
        """Read a label file as MultimodalVideoTag's ``load_class_file`` builds its map, line by line
        (universal newlines; ``line.strip().split("\\t")``):

        * the name is the first field (stripped); the index is the second field when the line has
          exactly two fields, else the line's 0-based number, blank lines included;
        * a name seen again takes the later line's index (MVT fills a dict);
        * a blank line names nothing (MVT maps the name "" to its number; no label can be "");
        * outputs are ``0 .. max index``; an index no name maps to is unused;
        * the name shown for an index with several names is the one MVT's inference prints
          (``{index: name}`` inverted from that dict: the name first added last), the others are
          aliases.

        Differences from MVT, on purpose: names are stripped (MVT keeps spaces before a tab); a second
        field that is not a non-negative integer raises ValueError here (MVT fails on it later, per
        video, or reads -1 as the last output); more than :data:`MAX_LABELS` outputs are refused. MVT
        takes the number of outputs from its config (``num_classes``), here it is ``max index + 1``."""
        mapping: dict[str, int] = {}
        with Path(path).open("r", encoding="utf-8") as f:
            lines = f.readlines()
        for number, line in enumerate(lines):
            fields = line.strip().split("\t")
            name = fields[0].strip()
            index = number
            if len(fields) == 2:
                try:
                    index = int(fields[1])
                except ValueError:
                    index = -1
                if index < 0:
                    raise ValueError(f"{path}:{number + 1}: index {fields[1]!r} is not a non-negative integer")
            if name:
                mapping[name] = index
        count = max(mapping.values()) + 1 if mapping else 0
        if count > MAX_LABELS:
            raise ValueError(f"{path}: index {count - 1} is beyond {MAX_LABELS - 1} (the largest allowed)")
        shown: dict[int, str] = {index: name for name, index in mapping.items()}
        aliases = {name: index for name, index in mapping.items() if shown[index] != name}
        return cls([shown.get(i) for i in range(count)], aliases=aliases)

    def to_text(self) -> str:
        """The file :meth:`from_file` reads back as an equal set: one label per line when there are no
        aliases and no unused outputs (the plain ``class.txt`` form), else ``name\\tindex`` lines,
        aliases first (so the shown name, the last one read, stays the label)."""
        if not self.aliases and not self.unused:
            return "".join(label + "\n" for label in self.labels)
        lines = [f"{name}\t{i}\n" for name, i in self.aliases.items()]
        lines += [f"{label}\t{i}\n" for i, label in enumerate(self.labels) if i not in self.unused]
        return "".join(lines)

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_text(), encoding="utf-8")

    def encode(self, labels: Iterable[str]) -> np.ndarray:
        """Multi-hot (C,) float32 vector; aliases set their output; labels not in the set are ignored."""
        out = np.zeros(len(self.labels), dtype=np.float32)
        for label in labels:
            i = self.index.get(label)
            if i is not None:
                out[i] = 1.0
        return out

    def level1_scores(self, probs: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """(B, C) level-2 probabilities -> (B, n_level1) level-1 scores: category j scores
        ``max(probs[:, children[j]])`` (unused outputs belong to no category)."""
        if isinstance(probs, torch.Tensor):
            return torch.stack([probs[:, idx].amax(dim=1) for idx in self.children], dim=1)
        probs = np.asarray(probs)
        return np.stack([probs[:, idx].max(axis=1) for idx in self.children], axis=1)
