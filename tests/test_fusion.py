"""Fusion model: shapes, masking (padding changes nothing), attention, exact logit decomposition,
text fallback, modality switches, overfitting a tiny set, labels/chars, and per-tag segments; and
tests that fail when a mechanism is removed: the title guiding the attention, the padding mask,
segments from the attention, level-1 scores from their level-2 tags."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from model.chars import CharVocab
from model.checkpoint import LoadedCheckpoint
from model.collate import collate
from model.features import VideoFeatures
from model.fusion import FusionConfig, FusionModel, GuidedAttention
from model.labels import LabelSet
from model.predict import Tagger, segments_from_contributions
from model.textcnn import TextCNN

LABELS = LabelSet(["动物-猫", "动物-狗", "游戏-射击", "游戏-赛车", "美食-烘焙"])
DI, DA, DT = 10, 6, 7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def video(rng, i, t_img, t_aud, n_tok, title, labels=()):
    return VideoFeatures(
        f"v{i}", rng.normal(size=(t_img, DI)), np.arange(t_img) + 0.5, rng.normal(size=(t_aud, DA)),
        rng.normal(size=(n_tok, DT)), title, list(labels), float(t_img),
    )


def small_config(chars: CharVocab | None = None, **kw) -> FusionConfig:
    base = dict(image_dim=DI, audio_dim=DA, text_dim=DT, num_labels=len(LABELS), image_hidden=8, audio_hidden=4,
                text_filters=5, char_vocab_size=len(chars) if chars else 0, char_dim=6)
    base.update(kw)
    return FusionConfig(**base)


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    videos = [
        video(rng, 0, 5, 3, 4, "可爱的猫咪"),
        video(rng, 1, 2, 0, 0, ""),  # no audio, no title
        video(rng, 2, 9, 7, 2, "go"),  # title shorter than the widest window
        video(rng, 3, 1, 1, 6, "赛车 game"),
    ]
    chars = CharVocab.build(v.title for v in videos)
    model = FusionModel(small_config(chars)).eval()
    return videos, chars, model


def run(model, videos, chars):
    with torch.no_grad():
        return model(collate(videos, labels=LABELS, chars=chars, dims={"image": DI, "audio": DA, "text": DT}))


def test_shapes_and_attention_sums_to_one_over_valid_steps(setup):
    videos, chars, model = setup
    out = run(model, videos, chars)
    assert out.logits.shape == (4, len(LABELS))
    assert out.image_attention.shape == (4, 9) and out.audio_attention.shape == (4, 7)
    for i, v in enumerate(videos):
        n = len(v.image)
        assert torch.allclose(out.image_attention[i, :n].sum(), torch.tensor(1.0), atol=1e-6)
        assert torch.all(out.image_attention[i, n:] == 0)
        assert torch.all(out.image_attention[i, :n] > 0)
        m = len(v.audio)
        assert torch.all(out.audio_attention[i, m:] == 0)
        expected = 1.0 if m else 0.0  # a video without audio: all-zero weights, zero vector
        assert out.audio_attention[i].sum().item() == pytest.approx(expected, abs=1e-6)


def test_padding_changes_nothing(setup):
    videos, chars, model = setup
    together = run(model, videos, chars).logits
    for i, v in enumerate(videos):
        alone = run(model, [v], chars).logits[0]
        assert torch.allclose(alone, together[i], atol=1e-5), i
    # changing the padded values themselves changes nothing either
    batch = collate(videos, labels=LABELS, chars=chars)
    noisy = replace(batch, image=batch.image.clone(), audio=batch.audio.clone(), text=batch.text.clone(),
                    char_ids=batch.char_ids.clone())
    for i, v in enumerate(videos):
        noisy.image[i, len(v.image):] = 1e3
        noisy.audio[i, len(v.audio):] = -1e3
        noisy.text[i, len(v.text):] = 7.0
        noisy.char_ids[i, int(batch.char_mask[i].sum()):] = 3
    with torch.no_grad():
        assert torch.allclose(model(noisy).logits, together, atol=1e-5)


def test_logit_decomposes_exactly_over_image_steps(setup):
    videos, chars, model = setup
    out = run(model, videos, chars)
    contrib = model.image_contributions(out)  # (B, T, C)
    w = model.head.weight
    rest = model.head.bias.clone()
    expected = contrib.sum(dim=1) + rest
    for name in ("audio", "text"):
        vec = (out.audio_attention.unsqueeze(-1) * out.audio_states).sum(1) if name == "audio" else out.text_vector
        expected = expected + vec @ w[:, model.head_slices[name]].T
    assert torch.allclose(expected, out.logits, atol=1e-5)


def test_missing_title_falls_back_and_ignores_text(setup):
    videos, chars, model = setup
    v = videos[0]
    a = run(model, [replace(v, title="", text=np.zeros((0, DT)))], chars).logits
    b = run(model, [replace(v, title="", text=np.zeros((0, DT)))], chars).logits
    c = run(model, [v], chars).logits
    assert torch.allclose(a, b) and not torch.allclose(a, c)
    batch = collate([v], labels=None, chars=chars)
    batch.has_title[:] = False  # title dropout: the title's content must not matter
    with torch.no_grad():
        d = model(batch).logits
        batch2 = replace(batch, text=torch.randn_like(batch.text), char_ids=torch.ones_like(batch.char_ids) * 2)
        e = model(batch2).logits
    assert torch.allclose(d, e, atol=1e-6) and torch.allclose(d, a, atol=1e-5)


@pytest.mark.parametrize(
    "modalities,branch",
    [(("image",), "both"), (("audio",), "both"), (("text",), "chars"), (("image", "audio"), "both"),
     (("image", "audio", "text"), "encoder"), (("image", "text"), "both")],
)
def test_modality_switches(setup, modalities, branch):
    videos, chars, _ = setup
    model = FusionModel(small_config(chars, modalities=modalities, text_branch=branch)).eval()
    out = run(model, videos, chars)
    assert out.logits.shape == (4, len(LABELS))
    assert (out.image_attention is not None) == ("image" in modalities)
    assert (out.audio_attention is not None) == ("audio" in modalities)
    assert set(model.head_slices) == set(modalities)
    assert out.logits.isfinite().all()


def test_chinese_titles_carry_signal_by_default():
    chars = CharVocab.build(["猫咪", "小狗"])
    assert chars.encode("猫咪") != chars.encode("小狗") and 1 not in chars.encode("猫咪")
    config = small_config(chars, text_dim=384)
    assert config.text_branch == "both" and config.use_chars and config.use_encoder
    with pytest.raises(ValueError):
        FusionConfig(image_dim=4, audio_dim=4, text_dim=0, num_labels=2, modalities=("text",), text_branch="encoder")


def test_textcnn_pools_valid_positions_only():
    cnn = TextCNN(3, filters=4, windows=(2, 3, 4))
    x = torch.randn(2, 6, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    y = cnn(x, mask)
    assert y.shape == (2, 12) and torch.all(y[1] == 0)
    alone = cnn(x[:1, :2], mask[:1, :2])
    assert torch.allclose(y[:1], alone, atol=1e-6)


def test_tiny_model_overfits_tiny_set():
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    titles = ["猫咪", "小狗", "枪战", "飙车", "蛋糕", "猫", "狗狗", "赛车"]
    videos = [video(rng, i, int(rng.integers(1, 6)), int(rng.integers(0, 4)), 3, titles[i],
                    [LABELS.labels[i % len(LABELS)]]) for i in range(8)]
    chars = CharVocab.build(v.title for v in videos)
    model = FusionModel(small_config(chars, dropout=0.0))
    batch = collate(videos, labels=LABELS, chars=chars)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch).logits, batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(batch).logits
    assert loss.item() < 0.05
    assert torch.equal(logits.argmax(1), batch.labels.argmax(1))


def test_labels_and_level1_scores(tmp_path):
    probs = np.array([[0.1, 0.7, 0.2, 0.05, 0.3]])
    assert LABELS.level1 == ["动物", "游戏", "美食"]
    np.testing.assert_allclose(LABELS.level1_scores(probs), [[0.7, 0.2, 0.3]])
    assert torch.allclose(LABELS.level1_scores(torch.tensor(probs)), torch.tensor([[0.7, 0.2, 0.3]], dtype=torch.float64))
    path = tmp_path / "class.txt"
    path.write_text("b-x\t1\na-y\t0\n", encoding="utf-8")
    assert LabelSet.from_file(path).labels == ["a-y", "b-x"]
    assert LabelSet(["a-y", "b-x"]).hash() != LabelSet(["b-x", "a-y"]).hash()


def test_segments_from_contributions():
    contrib = np.array([0.1, 0.9, 1.0, 0.2, -0.5, 0.6, 0.55])
    times = np.arange(7) + 0.5  # 1 fps, frames at the middle of each second
    segs = segments_from_contributions(contrib, times, duration=7.0, spacing=1.0, threshold=0.5)
    assert segs == [[1.0, 3.0], [5.0, 7.0]]
    assert segments_from_contributions(-np.ones(3), times[:3], duration=3, spacing=1.0) == []


# --- every mechanism must matter: each test below fails when its mechanism is removed ---------------


def test_attention_weights_depend_on_the_title(setup):
    """Text-guided attention: the same frames and audio under two titles get different weights (the
    guide reaches the attention), and a missing title (the learned fallback query) differs again."""
    videos, chars, model = setup
    v = videos[0]
    rng = np.random.default_rng(5)
    cat = run(model, [replace(v, title="可爱的猫咪")], chars)
    car = run(model, [replace(v, title="赛车 game", text=rng.normal(size=(4, DT)))], chars)
    none = run(model, [replace(v, title="", text=np.zeros((0, DT)))], chars)
    for name in ("image_attention", "audio_attention"):
        a, b, c = getattr(cat, name), getattr(car, name), getattr(none, name)
        assert (a - b).abs().max().item() > 1e-4, name
        assert (a - c).abs().max().item() > 1e-4 and (b - c).abs().max().item() > 1e-4, name
        # each is still a distribution over the same valid steps
        for w in (a, b, c):
            assert w.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_attention_masks_padding_exactly():
    """Padded steps get weight exactly 0, and padding (any amount, any values) changes no weight of a
    valid step; a sequence with no valid step gets all-zero weights."""
    torch.manual_seed(3)
    attention = GuidedAttention(state_dim=6, text_dim=4, attention_dim=5).eval()
    h = torch.randn(3, 7, 6)
    text = torch.randn(3, 4)
    lengths = torch.tensor([7, 3, 0])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    h_noisy = h.clone()
    h_noisy[~mask] = 1e4 * torch.randn(int((~mask).sum()), 6)  # huge values where there is padding
    with torch.no_grad():
        for states in (h, h_noisy):
            w = attention(states, mask, text)
            assert torch.all(w[~mask] == 0)
            assert w[0].sum().item() == pytest.approx(1.0, abs=1e-6) and w[1].sum().item() == pytest.approx(1.0, abs=1e-6)
            assert torch.all(w[2] == 0)
            # the weights of video 1 (3 steps) equal those it gets with no padding at all
            alone = attention(h[1:2, :3], mask[1:2, :3], text[1:2])
            assert torch.allclose(w[1, :3], alone[0], atol=1e-6)


def test_padding_changes_no_attention_weight_in_the_model(setup):
    videos, chars, model = setup
    together = run(model, videos, chars)
    for i, v in enumerate(videos):
        alone = run(model, [v], chars)
        n, m = len(v.image), len(v.audio)
        assert torch.all(together.image_attention[i, n:] == 0) and torch.all(together.audio_attention[i, m:] == 0)
        assert torch.allclose(alone.image_attention[0], together.image_attention[i, :n], atol=1e-6), i
        assert torch.allclose(alone.audio_attention[0, :m], together.audio_attention[i, :m], atol=1e-6), i


class _FixedAttention(nn.Module):
    """Wraps a GuidedAttention: ``ignore`` zeroes one frame's weight (the rest renormalised), ``only``
    puts all weight on one frame. The BiLSTM states are untouched."""

    def __init__(self, inner: nn.Module, *, ignore: int | None = None, only: int | None = None) -> None:
        super().__init__()
        self.inner, self.ignore, self.only = inner, ignore, only

    def forward(self, h, mask, text):
        alpha = self.inner(h, mask, text).clone()
        if self.only is not None:
            alpha = torch.zeros_like(alpha)
            alpha[:, self.only] = 1.0
        if self.ignore is not None:
            alpha[:, self.ignore] = 0.0
            alpha = alpha / alpha.sum(dim=1, keepdim=True)
        return alpha


def _tagger_and_evidence(setup, n_frames=8):
    """A one-video Tagger returning every label, and that video's per-frame, per-label head terms
    ``w_c . h_t`` (what each frame would add to logit c at full attention)."""
    _, chars, model = setup
    rng = np.random.default_rng(11)
    v = video(rng, 9, n_frames, 4, 3, "可爱的猫咪")
    ckpt = LoadedCheckpoint(model, model.config, LABELS, chars, {}, {"fps": 1.0}, "test")
    tagger = Tagger(ckpt, top_k=len(LABELS))
    with torch.no_grad():
        out = model(collate([v], labels=None, chars=chars))
        evidence = (out.image_states @ model.head.weight[:, model.head_slices["image"]].T)[0]  # (T, C)
    return tagger, v, evidence.numpy()


def _covers(segment, t):
    return segment[0] < t < segment[1]


def test_a_frame_the_attention_ignores_is_in_no_segment(setup):
    """Segments come from the attention: the frame with the strongest evidence of all, given weight 0,
    appears in no tag's segment (without the attention in the per-frame terms it would be the peak)."""
    tagger, v, evidence = _tagger_and_evidence(setup)
    k, c = np.unravel_index(np.argmax(evidence), evidence.shape)
    assert evidence[k, c] > 0
    model = tagger.model
    original = model.attentions["image"]
    model.attentions["image"] = _FixedAttention(original, ignore=int(k))
    try:
        tags = tagger.predict([v])[0].tags
    finally:
        model.attentions["image"] = original
    assert any(t.segments for t in tags)  # not vacuous: other frames do make segments
    for t in tags:
        assert not any(_covers(s, v.image_times[k]) for s in t.segments), (t.label, t.segments, k)


def test_segments_follow_the_attention(setup):
    """All attention on frame j: a tag whose head term at j is positive gets exactly frame j's
    interval, every other tag gets no segment."""
    tagger, v, evidence = _tagger_and_evidence(setup)
    # a frame where some labels have positive and some negative evidence
    j = next(t for t in range(len(evidence)) if (evidence[t] > 0).any() and (evidence[t] <= 0).any())
    model = tagger.model
    original = model.attentions["image"]
    model.attentions["image"] = _FixedAttention(original, only=j)
    try:
        tags = {t.label: t.segments for t in tagger.predict([v])[0].tags}
    finally:
        model.attentions["image"] = original
    t_j = float(v.image_times[j])
    for c, label in enumerate(LABELS.labels):
        expected = [[t_j - 0.5, t_j + 0.5]] if evidence[j, c] > 0 else []
        assert tags[label] == expected, (label, evidence[j, c])


def test_level1_score_is_the_max_of_its_level2_scores(setup):
    """model/labels.py: a level-1 category scores the maximum of its children's probabilities. Checked
    on the label set itself (numpy and torch) and on what the Tagger returns."""
    rng = np.random.default_rng(2)
    probs = rng.random((64, len(LABELS)))
    children = {"动物": [0, 1], "游戏": [2, 3], "美食": [4]}
    assert dict(zip(LABELS.level1, LABELS.children, strict=True)) == children
    expected = np.stack([probs[:, idx].max(axis=1) for idx in children.values()], axis=1)
    np.testing.assert_array_equal(LABELS.level1_scores(probs), expected)
    np.testing.assert_array_equal(LABELS.level1_scores(torch.from_numpy(probs)).numpy(), expected)
    videos, chars, model = setup
    ckpt = LoadedCheckpoint(model, model.config, LABELS, chars, {}, {"fps": 1.0}, "test")
    for pred in Tagger(ckpt, top_k=len(LABELS)).predict(videos):
        tags = {t.label: t.score for t in pred.tags}
        assert len(pred.categories) == len(children)
        for name, score in pred.categories:
            assert score == pytest.approx(max(tags[LABELS.labels[i]] for i in children[name]), abs=1e-7)
        scores = [score for _, score in pred.categories]
        assert scores == sorted(scores, reverse=True)
