r"""BiLSTM + text-guided attention fusion model (the paper, section 2; MultimodalVideoTag's structure).

Structure, per video::

    image (T_i, D_i) -> BiLSTM (512/direction) -> dropout -> H_img (T_i, 1024) --\
    audio (T_a, 128) -> BiLSTM (128/direction) -> dropout -> H_aud (T_a, 256)  ---> guided attention
    title -> TextCNN(encoder token states) ++ TextCNN(char embeddings) -> dropout -> x (text vector)
    a_img = sum_t alpha_t H_img[t],  a_aud likewise,  logits = W [a_img ; a_aud ; x] + b,  p = sigmoid

The paper's equations and how this code reads them
--------------------------------------------------
The paper (2.2) writes, for H = [h_1..h_n] (BiLSTM states) and a query q_t = l(h_t):

    (7)  e_ij = q_i^T W_a h_j + H^T v
    (8)  v_ij = e_ij + beta_i * e_ij        (beta_i: a weight per "feature category" of title words)
    (9)  e_t  = W_s q_t + H^T V
    (10) alpha_t = softmax(e_t)
    (11) score_t = sum_j alpha_tj h_j

The dimensions do not agree as printed, so we read them as follows and say so:

* (7) + (9), the score of step j: a **bilinear query term** ``(W_s q)^T h_j`` plus a **content term**
  on h_j. The query is the *title's* text vector ``x`` (the paper's Fig. 3 feeds "Text" into the
  similarity score; that is what makes the attention text-guided), not ``l(h_i)`` per position: the
  paper classifies from one pooled vector per modality, and per-position queries would give n outputs
  it never pools. ``W_s l(.)`` collapses into one affine map U: ``bilinear_j = (U x + c)^T h_j``.
  The content term follows MultimodalVideoTag (``attention_weight_by_feature_seq2seq_attention``):
  ``w^T tanh(W [h_j ; x] + b)`` (Bahdanau-style additive energy over the state and the text vector).
  So ``e_j = w^T tanh(W_h h_j + W_x x + b) + (U x + c)^T h_j``. ``bilinear=False`` (``tagstream train
  --no-bilinear``, part of ``--preset mvt``) drops the bilinear term, leaving MVT's additive form exactly
  for a titled video (MVT's bias on the energy is constant over j and cancels in the softmax);
  BENCHMARKS.md compares both.
* (8), the per-category weights beta_i (lambda_i in the text): the paper scales the vectors of title
  words of tagged "feature categories" by ``(1 + beta_i)``, but never publishes the word tagger. We
  read the categories as the TextCNN's output channels: a learned per-channel gain ``(1 + beta_i)`` on
  ``x`` is a diagonal matrix that ``W_x`` and ``U`` (the only maps reading ``x`` in the attention)
  already contain, so it has no separate tensor here. The weights that *are* per category in this
  model are the head's rows ``w_c`` (one per level-2 label), which is what the per-tag segments use.
* (10): softmax over the **valid** steps only (padding gets weight 0; an empty sequence, e.g. a video
  without audio, gets all-zero weights and a zero vector).
* (11): ``score`` is the pooled vector ``a = sum_j alpha_j h_j`` of the modality; it goes to the head.

Without text (the text modality switched off, or a video without a title, or title dropout in
training) the same layer becomes self-attention: ``x`` is replaced by a learned query vector ``x0``
(text modality on) or the text terms vanish (text modality off: ``e_j = w^T tanh(W_h h_j + b) + c^T h_j``,
which contains MVT's ``fc(h, 1)`` self-attention). In the head a missing title contributes zeros.

Per-tag time segments: in eval mode (dropout off) the logit of label c decomposes exactly as
``logit_c = b_c + sum_t alpha_t (w_c^img . h_t) + w_c^aud . a_aud + w_c^txt . x``; the per-step terms
``alpha_t (w_c^img . h_t)`` (:meth:`FusionModel.image_contributions`) say which frames carry the
evidence for c (model/predict.py turns them into [start, end] seconds).

Differences from MVT, on purpose: PyTorch's LSTM has no peephole connections (MVT's dynamic_lstm
has them); a character-level TextCNN may stand beside or instead of the frozen-encoder TextCNN
(``text_branch``), because the bundled MiniLM encoder maps most Chinese characters to ``[UNK]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.collate import FusionBatch
from model.textcnn import TextCNN

MODALITIES = ("image", "audio", "text")
TEXT_BRANCHES = ("both", "encoder", "chars")


@dataclass
class FusionConfig:
    """Model dimensions and switches. ``text_dim`` 0 means no text-encoder features exist (e.g. a
    MultimodalVideoTag folder read without an encoder): the encoder branch is then left out.
    ``text_branch="both"`` (default) uses the frozen-encoder TextCNN and the character TextCNN side by
    side, so Chinese titles carry signal even through an English encoder. ``attention_dim`` 0 means
    "the modality's BiLSTM width" (MVT: the energy layer is as wide as the sequence features)."""

    image_dim: int
    audio_dim: int
    text_dim: int
    num_labels: int
    image_hidden: int = 512
    audio_hidden: int = 128
    text_filters: int = 256
    text_windows: tuple[int, ...] = (2, 3, 4)
    attention_dim: int = 0
    modalities: tuple[str, ...] = MODALITIES
    text_branch: str = "both"
    char_vocab_size: int = 0
    char_dim: int = 128
    bilinear: bool = True
    dropout: float = 0.5

    def __post_init__(self) -> None:
        self.modalities = tuple(m for m in MODALITIES if m in set(self.modalities))
        self.text_windows = tuple(int(w) for w in self.text_windows)
        if not self.modalities:
            raise ValueError("at least one modality is needed")
        if self.text_branch not in TEXT_BRANCHES:
            raise ValueError(f"text_branch must be one of {TEXT_BRANCHES}")
        if "text" in self.modalities and not (self.use_encoder or self.use_chars):
            raise ValueError(
                f"text modality on but no text branch is usable (text_branch={self.text_branch!r}, "
                f"text_dim={self.text_dim}, char_vocab_size={self.char_vocab_size})"
            )

    @property
    def use_encoder(self) -> bool:
        return "text" in self.modalities and self.text_branch in ("both", "encoder") and self.text_dim > 0

    @property
    def use_chars(self) -> bool:
        return "text" in self.modalities and self.text_branch in ("both", "chars") and self.char_vocab_size > 2

    def to_dict(self) -> dict:
        data = asdict(self)
        data["text_windows"] = list(self.text_windows)
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> FusionConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["text_windows"] = tuple(known.get("text_windows", (2, 3, 4)))
        known["modalities"] = tuple(known.get("modalities", MODALITIES))
        return cls(**known)


@dataclass
class FusionOutput:
    logits: torch.Tensor  # (B, C)
    image_attention: torch.Tensor | None  # (B, T_i), zero on padding; None when image is off
    audio_attention: torch.Tensor | None  # (B, T_a)
    image_states: torch.Tensor | None = None  # (B, T_i, 2 * image_hidden), after dropout
    audio_states: torch.Tensor | None = None
    text_vector: torch.Tensor | None = None  # (B, text width), zeros for videos without a title


class BiLSTMEncoder(nn.Module):
    """Packed bidirectional LSTM; zero-length sequences give all-zero states (and are never run)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        out = x.new_zeros(batch, steps, self.out_dim)
        nonempty = lengths > 0
        if not bool(nonempty.any()):
            return out
        idx = nonempty.nonzero(as_tuple=True)[0]
        packed = pack_padded_sequence(x[idx], lengths[idx].cpu(), batch_first=True, enforce_sorted=False)
        states, _ = self.lstm(packed)
        padded, _ = pad_packed_sequence(states, batch_first=True, total_length=steps)
        return out.index_copy(0, idx, padded)


class GuidedAttention(nn.Module):
    """``e_j = w^T tanh(W_h h_j + W_x x + b) + (U x + c)^T h_j``, softmax over valid steps (see module
    docstring). ``text_dim`` 0 builds the text-free form."""

    def __init__(self, state_dim: int, text_dim: int, attention_dim: int, bilinear: bool = True) -> None:
        super().__init__()
        self.state_proj = nn.Linear(state_dim, attention_dim)
        self.text_proj = nn.Linear(text_dim, attention_dim, bias=False) if text_dim else None
        self.energy = nn.Linear(attention_dim, 1, bias=False)
        self.query = nn.Linear(text_dim, state_dim) if (bilinear and text_dim) else None
        self.query_bias = nn.Parameter(torch.zeros(state_dim)) if (bilinear and not text_dim) else None

    def forward(self, h: torch.Tensor, mask: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        """h (B, T, S), mask (B, T) bool, text (B, X) or None -> attention weights (B, T)."""
        energy = self.state_proj(h)
        if self.text_proj is not None and text is not None:
            energy = energy + self.text_proj(text).unsqueeze(1)
        scores = self.energy(torch.tanh(energy)).squeeze(-1)
        if self.query is not None and text is not None:
            scores = scores + torch.einsum("bts,bs->bt", h, self.query(text))
        elif self.query_bias is not None:
            scores = scores + h @ self.query_bias
        any_valid = mask.any(dim=1, keepdim=True)
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = torch.where(any_valid, scores, torch.zeros_like(scores))
        return torch.softmax(scores, dim=1) * mask.to(scores.dtype)


class FusionModel(nn.Module):
    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.dropout = nn.Dropout(cfg.dropout)
        text_width = 0
        self.encoder_cnn = TextCNN(cfg.text_dim, cfg.text_filters, cfg.text_windows) if cfg.use_encoder else None
        if self.encoder_cnn is not None:
            text_width += self.encoder_cnn.out_dim
        self.char_embedding = None
        self.char_cnn = None
        if cfg.use_chars:
            self.char_embedding = nn.Embedding(cfg.char_vocab_size, cfg.char_dim, padding_idx=0)
            self.char_cnn = TextCNN(cfg.char_dim, cfg.text_filters, cfg.text_windows)
            text_width += self.char_cnn.out_dim
        self.text_width = text_width
        self.null_text = nn.Parameter(torch.zeros(text_width)) if text_width else None

        self.encoders = nn.ModuleDict()
        self.attentions = nn.ModuleDict()
        widths: dict[str, int] = {}
        for name, in_dim, hidden in (("image", cfg.image_dim, cfg.image_hidden), ("audio", cfg.audio_dim, cfg.audio_hidden)):
            if name in cfg.modalities:
                self.encoders[name] = BiLSTMEncoder(in_dim, hidden)
                width = 2 * hidden
                self.attentions[name] = GuidedAttention(width, text_width, cfg.attention_dim or width, cfg.bilinear)
                widths[name] = width
        if text_width:
            widths["text"] = text_width
        #: slices of the head's input: which columns of ``head.weight`` read which modality
        self.head_slices: dict[str, slice] = {}
        start = 0
        for name, width in widths.items():
            self.head_slices[name] = slice(start, start + width)
            start += width
        self.head = nn.Linear(start, cfg.num_labels)

    def _text_vector(self, batch: FusionBatch) -> torch.Tensor | None:
        parts = []
        if self.encoder_cnn is not None:
            parts.append(self.encoder_cnn(batch.text, batch.text_mask))
        if self.char_cnn is not None and self.char_embedding is not None:
            parts.append(self.char_cnn(self.char_embedding(batch.char_ids), batch.char_mask))
        if not parts:
            return None
        return self.dropout(torch.cat(parts, dim=1))

    def forward(self, batch: FusionBatch) -> FusionOutput:
        text = self._text_vector(batch)
        guide = None
        if text is not None and self.null_text is not None:
            has = batch.has_title.unsqueeze(1)
            guide = torch.where(has, text, self.null_text.expand_as(text))
            text = text * has.to(text.dtype)
        pooled: dict[str, torch.Tensor] = {}
        attention: dict[str, torch.Tensor] = {}
        states: dict[str, torch.Tensor] = {}
        for name, seq, lengths in (("image", batch.image, batch.image_len), ("audio", batch.audio, batch.audio_len)):
            if name not in self.encoders:
                continue
            h = self.dropout(self.encoders[name](seq, lengths))
            mask = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
            alpha = self.attentions[name](h, mask, guide)
            pooled[name] = torch.einsum("bt,bts->bs", alpha, h)
            attention[name] = alpha
            states[name] = h
        if text is not None:
            pooled["text"] = text
        logits = self.head(torch.cat([pooled[name] for name in self.head_slices], dim=1))
        return FusionOutput(
            logits=logits,
            image_attention=attention.get("image"),
            audio_attention=attention.get("audio"),
            image_states=states.get("image"),
            audio_states=states.get("audio"),
            text_vector=text,
        )

    def image_contributions(self, out: FusionOutput) -> torch.Tensor:
        """(B, T_i, C): ``alpha_t * (w_c^img . h_t)``, the image part of each logit split over frames.
        Summed over t it equals the image share of ``out.logits`` exactly."""
        if out.image_states is None or out.image_attention is None:
            raise ValueError("the model has no image modality")
        weight = self.head.weight[:, self.head_slices["image"]]  # (C, S)
        return out.image_attention.unsqueeze(-1) * (out.image_states @ weight.T)
