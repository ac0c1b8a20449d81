"""The frozen title encoder (packaged all-MiniLM-L6-v2), offline."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from model.text import TextEncoder, build_text_encoder, default_model_dir, encoder_dim, encoder_id


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return build_text_encoder()


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].float()
    return (states * m).sum(1) / m.sum(1).clamp(min=1)


def test_identity_and_frozen(encoder: TextEncoder) -> None:
    assert encoder.extractor_id == "all-minilm-l6-v2"
    assert encoder.feature_dim == 384 and encoder.max_tokens == 50
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training  # stays frozen even if a caller flips modes


def test_close_titles_are_closer_than_unrelated(encoder: TextEncoder) -> None:
    titles = ["a cat playing with a ball of yarn", "kitten plays with wool", "stock market falls sharply"]
    states, mask = encoder(titles)
    assert states.dtype == torch.float32 and mask.dtype == torch.bool
    emb = torch.nn.functional.normalize(mean_pool(states, mask), dim=1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2, sim
    assert sim[0, 1] > sim[1, 2] + 0.2, sim


def test_shapes_truncation_and_empty_title(encoder: TextEncoder) -> None:
    long_title = " ".join(["word"] * 200)
    states, mask = encoder(["short title", long_title, "", "   "])
    assert states.shape == (4, 50, 384) and mask.shape == (4, 50)
    assert mask[1].all()  # cut to exactly 50 tokens, special tokens included
    assert mask[0].sum() == 4  # [CLS] short title [SEP]
    assert not mask[2].any() and not mask[3].any()
    assert torch.count_nonzero(states[2]) == 0 and torch.count_nonzero(states[0, 4:]) == 0
    only_empty_states, only_empty_mask = encoder([""])
    assert not only_empty_mask.any() and only_empty_states.shape[-1] == 384


def test_batch_padding_does_not_change_states(encoder: TextEncoder) -> None:
    alone, m_alone = encoder(["a dog runs on the beach"])
    batched, m_batched = encoder(
        ["a dog runs on the beach", "a much longer title about many different things"]
    )
    n = int(m_alone.sum())
    assert m_batched[0].sum() == n
    assert torch.allclose(alone[0, :n], batched[0, :n], atol=1e-4)


def test_ids_tokenised_one_by_one_give_the_batch_tokenizers_states(encoder: TextEncoder) -> None:
    """The worker tokenises each title once (token_ids) and batches the ids (encode_ids): the same states
    as the tokenizer's own padded batch fed to the model."""
    titles = ["a dog runs on the beach", " ".join(["word"] * 200), "", "猫咪第一次见到雪", "a"]
    ids = [encoder.token_ids(t) for t in titles]
    assert ids[2] == [] and len(ids[1]) == 50
    states, mask = encoder.encode_ids(ids)
    enc = encoder.tokenize(titles)
    with torch.inference_mode():
        reference = encoder.model(**enc).last_hidden_state
    expected_mask = enc["attention_mask"].bool()
    expected_mask[2] = False  # an empty title is no title
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(states, reference * expected_mask[..., None], rtol=0, atol=1e-5)
    assert encoder.encode_ids([[], []])[0].shape == (2, 0, 384)


def test_chinese_is_mostly_unknown_to_minilm(encoder: TextEncoder) -> None:
    ids = encoder.tokenizer("小猫在玩毛线球")["input_ids"]
    unk = encoder.tokenizer.unk_token_id
    assert sum(i == unk for i in ids) >= 4  # why the fusion model has a character-level branch


def test_user_directory_id_and_missing_dir(tmp_path: Path) -> None:
    copy = tmp_path / "my-encoder"
    shutil.copytree(default_model_dir(), copy)
    enc = build_text_encoder(copy)
    sha12 = hashlib.sha256((copy / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert enc.extractor_id == f"my-encoder.{sha12}"
    assert encoder_id(copy) == enc.extractor_id and encoder_id(None) == "all-minilm-l6-v2"  # without loading
    assert encoder_dim(copy) == enc.feature_dim == 384
    with pytest.raises(FileNotFoundError):
        build_text_encoder(tmp_path / "absent")


def test_build_extractors_bundle_defaults() -> None:
    from model.extractors import build_extractors

    bundle = build_extractors(device="auto")
    assert bundle.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert bundle.ids() == {
        "image": {"id": "efficientnet_lite0.imagenet", "dim": 1280},
        "audio": {"id": "logmel-stats.v1", "dim": 128},
        "text": {"id": "all-minilm-l6-v2", "dim": 384},
    }
    with pytest.raises(FileNotFoundError):
        build_extractors(vggish_weights="/nonexistent/vggish.pth", device="cpu")
