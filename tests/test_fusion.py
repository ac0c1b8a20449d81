"""Fusion model: shapes, masking (padding changes nothing), attention, exact logit decomposition,
text fallback, modality switches, overfitting a tiny set, labels/chars, and per-tag segments."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from model.chars import CharVocab
from model.collate import collate
from model.features import VideoFeatures
from model.fusion import FusionConfig, FusionModel
from model.labels import LabelSet
from model.predict import segments_from_contributions
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
