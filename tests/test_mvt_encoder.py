"""The pretrained-text path on MultimodalVideoTag folders: a frozen BERT-family encoder (a tiny random
BERT with a Chinese vocabulary, built here, standing in for ERNIE 1.0) encodes the titles, cached per
split and encoder; the encoder TextCNN trains on its states (``--text-branch encoder`` and ``both``);
the checkpoint records the encoder's id, so another encoder is refused; 50 tokens with [CLS] ... [SEP];
an empty title is "no title" on both the training and the worker path."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_mvt_data import CLASSES, write_mvt

from model import batch_predict
from model import evaluate as evaluate_cmd
from model import train as train_cmd
from model.checkpoint import CheckpointMismatchError, load_checkpoint
from model.collate import collate
from model.mvt_data import MVTDataset, open_source
from model.text import TextEncoder, build_text_encoder, encoder_id
from model.title_cache import TitleEncoderCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DIM = 16
MVT_IDS = {"image": "mvt-resnet50", "audio": "mvt-vggish"}


def write_tiny_bert(path: Path, seed: int) -> Path:
    """A BERT in transformers' local-directory format (config, weights, tokenizer), random weights,
    vocab: the special tokens plus a few hundred CJK characters (those of the test titles first)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True)
    used = dict.fromkeys(ch for label in CLASSES for ch in "标题重复无文件只有未知" + label if ch != "-")
    cjk = list(used) + [chr(c) for c in range(0x4E00, 0x4E00 + 300) if chr(c) not in used]
    (path / "vocab.txt").write_text("\n".join(SPECIALS + cjk + ["-"]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(path / "vocab.txt"))
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {"A": write_tiny_bert(root / "ernie-a", seed=1), "B": write_tiny_bert(root / "ernie-b", seed=2)}


@pytest.fixture(scope="module")
def encoder_a(encoders) -> TextEncoder:
    return build_text_encoder(encoders["A"])


def train_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    return parser.parse_args([*argv, "--epochs", "1", "--batch-size", "4", "--image-hidden", "8", "--audio-hidden", "4",
                              "--text-filters", "4", "--char-dim", "4", "--device", "cpu", "--no-progress"])


def test_truncation_keeps_cls_and_sep_within_50_tokens(encoder_a):
    tok = encoder_a.tokenizer
    long_title = "标题" * 60  # 120 characters, one token each
    ids = encoder_a.tokenize([long_title, "标题"])["input_ids"]
    assert ids.shape == (2, 50)  # MVT's text_max_len, special tokens included
    assert ids[0, 0] == tok.cls_token_id and ids[0, 49] == tok.sep_token_id
    assert (ids[0, 1:49] != tok.pad_token_id).all() and tok.unk_token_id not in ids[0].tolist()
    assert ids[1, :4].tolist() == [tok.cls_token_id, *tok.convert_tokens_to_ids(["标", "题"]), tok.sep_token_id]
    states, mask = encoder_a([long_title, "标题"])
    assert states.shape == (2, 50, DIM) and mask.sum(dim=1).tolist() == [50, 4]


def test_empty_title_is_no_title_on_the_training_and_the_worker_path(tmp_path, encoders, encoder_a):
    """The worker encodes with TextEncoder and keeps states[mask]; training on an MVT folder reads the
    cache. Both give an empty title zero rows, so the fusion model takes its no-title path; a titled
    video gets the same states either way."""
    states, mask = encoder_a(["", "   ", "标题"])
    assert not mask[0].any() and not mask[1].any() and torch.count_nonzero(states[:2]) == 0
    root = write_mvt(tmp_path / "datasets")
    ds = open_source(root, text_encoder_dir=encoders["A"], device="cpu", progress=False)
    untitled = ds.load("http://example.com/videos/0003.mp4")  # "" in train.txt
    titled = ds.load("http://example.com/videos/0000.mp4")
    assert untitled.title == "" and untitled.text.shape == (0, DIM)
    worker_rows = states[2][mask[2]].numpy()
    alone = encoder_a([titled.title])
    np.testing.assert_allclose(titled.text, alone[0][0][alone[1][0]].numpy(), atol=1e-5)
    assert titled.text.shape == (len(titled.title) + 2, DIM) and worker_rows.shape == (4, DIM)
    batch = collate([untitled, titled], labels=None, chars=None, dims=ds.dims)
    assert batch.has_title.tolist() == [False, True]
    assert batch.text_mask[0].sum() == 0 and batch.text_mask[1].sum() == len(titled.title) + 2


def test_cache_per_split_keyed_by_encoder(tmp_path, encoders):
    root = write_mvt(tmp_path / "datasets")
    cache_dir = tmp_path / "cache"
    id_a, id_b = encoder_id(encoders["A"]), encoder_id(encoders["B"])
    assert id_a.startswith("ernie-a.") and id_a != id_b
    ds = MVTDataset(root, text_cache=TitleEncoderCache(encoders["A"], cache_dir, device="cpu", progress=False))
    assert ds.extractors["text"] == {"id": id_a, "dim": DIM}
    first = {v: ds.load(v).text for v in ds.rows}
    files = sorted(p.relative_to(cache_dir).as_posix() for p in cache_dir.rglob("*.safetensors"))
    assert files == [f"{id_a}/test.safetensors", f"{id_a}/train.safetensors", f"{id_a}/val.safetensors"]
    with safe_open(str(cache_dir / id_a / "train.safetensors"), framework="np") as f:
        meta = f.metadata()
    assert meta["encoder"] == id_a and meta["max_tokens"] == "50"
    assert "" not in json.loads(meta["titles"])  # empty titles are not encoded

    # a second opening reads the cache: the encoder is never built, the states are the same
    again_cache = TitleEncoderCache(encoders["A"], cache_dir, device="cpu", progress=False)
    again = MVTDataset(root, text_cache=again_cache)
    for v, text in first.items():
        np.testing.assert_array_equal(again.load(v).text, text)
    assert again_cache._encoder is None

    # encoder B never reads A's states, even from a file planted where B's would be
    (cache_dir / id_b).mkdir()
    shutil.copy(cache_dir / id_a / "train.safetensors", cache_dir / id_b / "train.safetensors")
    b_cache = TitleEncoderCache(encoders["B"], cache_dir, device="cpu", progress=False)
    other = MVTDataset(root, text_cache=b_cache)
    video = "http://example.com/videos/0000.mp4"
    assert b_cache._encoder is None
    assert other.load(video).text.shape == first[video].shape
    assert b_cache._encoder is not None  # it had to encode
    assert not np.allclose(other.load(video).text, first[video])
    with safe_open(str(cache_dir / id_b / "train.safetensors"), framework="np") as f:
        assert f.metadata()["encoder"] == id_b

    # an edited list (a new title) encodes that split again
    train_txt = root / "train.txt"
    train_txt.write_text(train_txt.read_text("utf-8").replace("标题拍人-帅哥", "新标题拍人-帅哥", 1), encoding="utf-8")
    edited_cache = TitleEncoderCache(encoders["A"], cache_dir, device="cpu", progress=False)
    edited = MVTDataset(root, text_cache=edited_cache)
    assert edited.load(video).title == "新标题拍人-帅哥"
    assert edited.load(video).text.shape == (len("新标题拍人-帅哥") + 2, DIM)
    assert edited_cache._encoder is not None


@pytest.mark.parametrize("branch", ["encoder", "both"])
def test_trains_on_encoder_states_and_records_the_encoder(tmp_path, capsys, encoders, branch):
    root = write_mvt(tmp_path / "datasets")
    ck = tmp_path / "ck"
    assert train_cmd.run(train_args(str(root), str(ck), "--text-branch", branch,
                                    "--text-encoder-dir", str(encoders["A"]))) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs_run"] == 1
    config = json.loads((ck / "config.json").read_text("utf-8"))
    id_a, id_b = encoder_id(encoders["A"]), encoder_id(encoders["B"])
    assert config["fusion"]["text_dim"] == DIM and config["fusion"]["text_branch"] == branch
    assert (config["fusion"]["char_vocab_size"] > 2) == (branch == "both")
    assert config["extractors"]["text"] == {"id": id_a, "dim": DIM}
    assert (root / ".tagstream-cache" / "text-states" / id_a / "train.safetensors").is_file()
    ckpt = load_checkpoint(ck)
    assert ckpt.model.encoder_cnn is not None and ckpt.model.encoder_cnn.convs[0].in_channels == DIM

    # the worker's check (worker/models.py: expected ids from its extractors, then load_checkpoint)
    load_checkpoint(ck, expected_extractors={**MVT_IDS, "text": id_a})
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(ck, expected_extractors={**MVT_IDS, "text": build_text_encoder(encoders["B"]).extractor_id})
    assert id_a in str(err.value) and id_b in str(err.value)
    with pytest.raises(CheckpointMismatchError, match="no text features"):  # the folder without an encoder
        load_checkpoint(ck, expected_extractors={**MVT_IDS, "text": None})


def test_encoder_branch_without_an_encoder_says_what_to_pass(tmp_path):
    root = write_mvt(tmp_path / "datasets")
    with pytest.raises(ValueError, match="pass --text-encoder-dir DIR"):
        train_cmd.run(train_args(str(root), str(tmp_path / "ck"), "--text-branch", "encoder"))


def test_resuming_with_another_encoder_is_refused(tmp_path, capsys, encoders):
    root = write_mvt(tmp_path / "datasets")
    ck = tmp_path / "ck"
    assert train_cmd.run(train_args(str(root), str(ck), "--text-encoder-dir", str(encoders["A"]))) == 0
    with pytest.raises(ValueError, match="other options"):
        train_cmd.run(train_args(str(root), str(ck), "--text-encoder-dir", str(encoders["B"])))


@pytest.fixture(scope="module")
def encoder_trained(tmp_path_factory, encoders) -> tuple[Path, Path]:
    """(MVT folder, checkpoint) trained once with ``--text-branch encoder`` on encoder A."""
    tmp = tmp_path_factory.mktemp("encoder-trained")
    root, ck = write_mvt(tmp / "datasets"), tmp / "ck"
    assert train_cmd.run(train_args(str(root), str(ck), "--text-branch", "encoder",
                                    "--text-encoder-dir", str(encoders["A"]))) == 0
    return root, ck


def test_predict_on_the_folder_needs_the_same_encoder(tmp_path, capsys, caplog, encoders, encoder_trained):
    root, ck = encoder_trained
    parser = argparse.ArgumentParser()
    batch_predict.add_arguments(parser)
    out = tmp_path / "pred.jsonl"
    base = [str(ck), str(root), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert batch_predict.run(parser.parse_args(base)) == 2
    assert "no text features" in caplog.text and "--text-encoder-dir" in caplog.text
    assert batch_predict.run(parser.parse_args([*base, "--text-encoder-dir", str(encoders["B"])])) == 2
    assert encoder_id(encoders["B"]) in caplog.text
    assert not out.exists() or out.read_text("utf-8") == ""
    capsys.readouterr()
    assert batch_predict.run(parser.parse_args([*base, "--text-encoder-dir", str(encoders["A"])])) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 16
    assert len(out.read_text("utf-8").splitlines()) == 16


def test_evaluate_on_the_folder_with_the_training_encoder(capsys, caplog, encoders, encoder_trained):
    root, ck = encoder_trained
    parser = argparse.ArgumentParser()
    evaluate_cmd.add_arguments(parser)
    base = [str(ck), str(root), "--split", "val", "--device", "cpu"]
    capsys.readouterr()
    assert evaluate_cmd.run(parser.parse_args(base)) == 2  # no encoder: no text features for the checkpoint
    assert "no text features" in caplog.text
    assert evaluate_cmd.run(parser.parse_args([*base, "--text-encoder-dir", str(encoders["A"])])) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["videos"] > 0
