"""Character vocabulary for the trainable character-level text branch.

Why: the bundled English MiniLM encoder maps most Chinese characters to ``[UNK]``, so a Chinese
title (the paper's data) would carry no signal through it. Characters need no tokenizer and cover
every script; a TextCNN over character embeddings with windows 2/3/4 sees character n-grams, which
for Chinese are words and for English are word pieces.

Normalisation: Unicode NFKC (full-width forms -> ASCII), lower case, runs of whitespace collapsed
to one space, stripped. Titles are cut to ``max_len`` characters (50, the paper's title length).
Index 0 is padding, 1 an unknown character; the vocabulary is built from training titles only,
most frequent first (ties by code point, so building is deterministic).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PAD = 0
UNK = 1
_SPACE = re.compile(r"\s+")


def normalize_title(title: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", title or "").lower()).strip()


class CharVocab:
    """Characters -> ids (``PAD`` = 0, ``UNK`` = 1, then ``chars`` in order)."""

    def __init__(self, chars: Iterable[str], max_len: int = 50) -> None:
        self.chars: list[str] = list(chars)
        self.max_len = int(max_len)
        self.index = {ch: i + 2 for i, ch in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 2

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and (other.chars, other.max_len) == (self.chars, self.max_len)

    @classmethod
    def build(
        cls, titles: Iterable[str], *, min_count: int = 1, max_size: int = 8000, max_len: int = 50
    ) -> CharVocab:
        counts = Counter(ch for title in titles for ch in normalize_title(title)[:max_len])
        ranked = sorted((ch for ch, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))
        return cls(ranked[:max_size], max_len=max_len)

    def encode(self, title: str) -> list[int]:
        """Ids of the normalised title, at most ``max_len``; an empty title gives ``[]``."""
        return [self.index.get(ch, UNK) for ch in normalize_title(title)[: self.max_len]]

    def hash(self) -> str:
        return hashlib.sha256(json.dumps([self.max_len, self.chars]).encode("utf-8")).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {"max_len": self.max_len, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict) -> CharVocab:
        return cls(data["chars"], max_len=data.get("max_len", 50))

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def from_file(cls, path: str | Path) -> CharVocab:
        return cls.from_dict(json.loads(Path(path).read_text("utf-8")))
