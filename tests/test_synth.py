"""The generated benchmark set: layout, real decodable media, TSV format, determinism, coverage."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from model import synth, synth_ceiling, synth_spec
from worker.cli import main as cli_main

N = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    assert cli_main(["dataset", "synth", str(out), "--videos", str(N), "--seed", "7", "--workers", "2"]) == 0
    return out


def _rows(out: Path) -> dict[str, list[list[str]]]:
    return {name: [line.split("\t") for line in (out / f"{name}.tsv").read_text(encoding="utf-8").splitlines()]
            for name in ("train", "val", "test")}


def test_cli_writes_the_layout(dataset: Path) -> None:
    for name in ("class.txt", "train.tsv", "val.tsv", "test.tsv", "meta.json", "truth.jsonl"):
        assert (dataset / name).is_file(), name
    videos = sorted(p.name for p in (dataset / "videos").iterdir())
    assert videos == [f"v{i:05d}.mp4" for i in range(N)]  # no temporary files left behind
    meta = json.loads((dataset / "meta.json").read_text(encoding="utf-8"))
    assert (meta["seed"], meta["videos"], meta["version"]) == (7, N, synth_spec.VERSION)
    assert sum(meta["splits"].values()) == N


def test_class_file_holds_chinese_two_level_labels(dataset: Path) -> None:
    classes = (dataset / "class.txt").read_text(encoding="utf-8").splitlines()
    assert classes == synth_spec.labels()
    assert 25 <= len(classes) <= 35 and len(set(classes)) == len(classes)
    groups = {c.split("-")[0] for c in classes}
    assert 6 <= len(groups) <= 10
    assert all(c.count("-") == 1 and all("\u4e00" <= ch <= "\u9fff" for ch in c.replace("-", "")) for c in classes)


def test_tsv_rows_parse_and_splits_partition_the_ids(dataset: Path) -> None:
    classes = set((dataset / "class.txt").read_text(encoding="utf-8").splitlines())
    rows = _rows(dataset)
    assert all(rows.values()), {k: len(v) for k, v in rows.items()}
    paths = []
    for split_rows in rows.values():
        for row in split_rows:
            assert len(row) == 3, row
            path, title, labels = row
            assert (dataset / path).is_file() and path.startswith("videos/")
            assert "\t" not in title and "\n" not in title
            assert labels and set(labels.split(",")) <= classes, labels
            paths.append(path)
    assert len(paths) == len(set(paths)) == N
    assert len(rows["train"]) > len(rows["test"])


def test_videos_are_real_h264_aac_with_the_planned_duration_and_varied_formats(dataset: Path) -> None:
    truth = [json.loads(line) for line in (dataset / "truth.jsonl").read_text(encoding="utf-8").splitlines()]
    shapes = set()
    for spec in truth:
        with av.open(str(dataset / "videos" / f"{spec['vid']}.mp4")) as container:
            vs, aus = container.streams.video[0], container.streams.audio[0]
            assert vs.codec_context.name == "h264" and aus.codec_context.name == "aac"
            assert (vs.width, vs.height) == (spec["width"], spec["height"])
            assert aus.rate == spec["audio_rate"] and aus.channels == spec["channels"]
            frames = list(container.decode(video=0))
        assert len(frames) == spec["n_frames"]
        assert frames[0].format.name == "yuv420p"
        seconds = spec["n_frames"] / spec["fps"]
        assert 3.0 <= seconds <= 5.0
        assert float(frames[-1].pts * frames[-1].time_base) == pytest.approx(seconds - 1 / spec["fps"], abs=1e-3)
        rgb = frames[len(frames) // 2].to_ndarray(format="rgb24")
        assert rgb.std() > 10  # a picture, not a flat colour
        shapes.add((spec["width"], spec["height"], spec["fps"]))
    assert len(shapes) >= 4


def test_audio_decodes_and_carries_the_labelled_signature() -> None:
    # A "label" video's sound has its energy near the label's centre frequency.
    spec = next(s for s in (synth_spec.make_spec(11, i) for i in range(200))
                if s.audio_mode == "label" and len(s.content) == 1
                and synth_spec.sound_signature(s.content[0])[0] == "tone")
    rng = np.random.default_rng(0)
    audio = synth._audio(spec, rng)[0]
    spectrum = np.abs(np.fft.rfft(audio))
    freqs = np.fft.rfftfreq(audio.size, 1 / spec.audio_rate)
    centre = synth_spec.sound_signature(spec.content[0])[1]
    peak = freqs[np.argmax(spectrum * (freqs > 150))]
    assert centre * 0.4 < peak < centre * 2.5


def test_same_seed_same_labels_and_titles_other_seed_differs(dataset: Path, tmp_path: Path) -> None:
    # Metadata is drawn before any rendering: compare the TSVs of a second, fresh run.
    again = tmp_path / "again"
    synth.generate(again, N, seed=7, workers=1)
    for name in ("train", "val", "test", "class"):
        suffix = ".txt" if name == "class" else ".tsv"
        assert (again / f"{name}{suffix}").read_bytes() == (dataset / f"{name}{suffix}").read_bytes()
    specs = [synth_spec.make_spec(8, i) for i in range(N)]
    assert [(s.title, s.labels) for s in specs] != [(s.title, s.labels) for s in (synth_spec.make_spec(7, i) for i in range(N))]


def test_rerun_keeps_existing_videos_and_refuses_another_seed(dataset: Path) -> None:
    target = dataset / "videos" / "v00000.mp4"
    before = target.stat().st_mtime_ns
    synth.generate(dataset, N, seed=7, workers=1)
    assert target.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="seed 7"):
        synth.generate(dataset, N, seed=8)
    assert cli_main(["dataset", "synth", str(dataset), "--videos", str(N), "--seed", "9"]) == 2


def test_every_group_is_covered_and_the_mix_matches_the_design() -> None:
    n = 400
    specs = [synth_spec.make_spec(3, i) for i in range(n)]
    # Groups come in shuffled blocks: the first 8 videos already cover all 8 groups.
    assert {s.content[0].split("-")[0] for s in specs[:8]} == {g[0] for g in synth_spec.GROUPS}
    recorded = {lab.split("-")[0] for s in specs[:24] for lab in s.labels}
    assert recorded == {g[0] for g in synth_spec.GROUPS}
    kinds = [s.title_kind for s in specs]
    for kind, p in synth_spec.TITLE_KINDS.items():
        assert abs(kinds.count(kind) / n - p) < 0.07, kind
    assert all(s.title == "" for s in specs if s.title_kind == "empty")
    assert all(s.title for s in specs if s.title_kind != "empty")
    multi = sum(len(s.labels) > 1 for s in specs) / n
    noisy = sum(s.labels[0] != s.content[0] for s in specs) / n
    assert 0.05 < multi < 0.2 and 0.02 < noisy < 0.12
    # An informative title names one of the content's keywords; a misleading one a sibling's.
    keywords = {f"{g}-{t}": kws for g, _, _, tags in synth_spec.GROUPS for t, kws, _ in tags}
    for s in specs:
        if s.title_kind == "label":
            assert any(k in s.title for k in keywords[s.content[0]])
        if s.title_kind == "sibling":
            siblings = [lab for lab in keywords if lab.split("-")[0] == s.content[0].split("-")[0] and lab != s.content[0]]
            assert any(k in s.title for lab in siblings for k in keywords[lab])


# ------------------------------------------------------------------------------------ Bayes ceiling

def test_ceiling_is_one_without_label_noise_and_with_fully_informative_titles(monkeypatch) -> None:
    """Every title names c0 (and maybe c1) and no recorded label is replaced: the best guess is always right."""
    monkeypatch.setattr(synth_spec, "P_LABEL_NOISE", 0.0)
    monkeypatch.setattr(synth_spec, "TITLE_KINDS", {"label": 1.0})
    specs = [synth_spec.make_spec(4, i) for i in range(400)]
    ceiling = synth_ceiling.bayes_ceiling(specs)
    assert ceiling["hit_at_1"] == pytest.approx(1.0, abs=1e-12)
    assert ceiling["bayes_rule_hit_at_1"] == 1.0 and ceiling["title_fallbacks"] == 0
    assert synth_ceiling.bayes_ceiling(specs, use_title=False)["hit_at_1"] < 0.9  # the titles are what made it 1


def test_ceiling_drops_as_the_label_noise_rises(monkeypatch) -> None:
    ceilings = []
    for noise in (0.0, 0.06, 0.2, 0.5):
        monkeypatch.setattr(synth_spec, "P_LABEL_NOISE", noise)
        ceilings.append(synth_ceiling.bayes_ceiling([synth_spec.make_spec(6, i) for i in range(300)])["hit_at_1"])
    assert all(a > b + 0.02 for a, b in zip(ceilings, ceilings[1:], strict=False)), ceilings
    # the titles' noise too: misleading (sibling) titles instead of informative ones
    monkeypatch.setattr(synth_spec, "P_LABEL_NOISE", 0.0)
    clean = synth_ceiling.bayes_ceiling([synth_spec.make_spec(6, i) for i in range(300)])["hit_at_1"]
    monkeypatch.setattr(synth_spec, "TITLE_KINDS", {**synth_spec.TITLE_KINDS, "label": 0.2, "sibling": 0.48})
    assert synth_ceiling.bayes_ceiling([synth_spec.make_spec(6, i) for i in range(300)])["hit_at_1"] < clean - 0.05


@pytest.mark.parametrize("use_title", [True, False])
def test_ceiling_matches_a_monte_carlo_of_the_generator(use_title: bool) -> None:
    """The ceiling is the Bayes rule's *expected* Hit@1 under the derived posterior; scoring that rule
    against the labels the generator actually recorded on 3,000 fresh videos must agree within sampling
    error (SE <= 0.009), which it cannot if the posterior misstates the generator's probabilities."""
    specs = [synth_spec.make_spec(123, i) for i in range(3000)]
    ceiling = synth_ceiling.bayes_ceiling(specs, use_title=use_title)
    assert abs(ceiling["hit_at_1"] - ceiling["bayes_rule_hit_at_1"]) < 0.03, ceiling
    assert 0.5 < ceiling["hit_at_1"] < ceiling["content_oracle_hit_at_1"] < 1.0
    # the content oracle: only label noise left; 1 - P_LABEL_NOISE for one label, 1 for two (c1 is kept)
    multi = sum(len(s.content) > 1 for s in specs) / len(specs)
    assert ceiling["content_oracle_hit_at_1"] == pytest.approx((1 - multi) * (1 - synth_spec.P_LABEL_NOISE) + multi)


def test_generated_set_records_and_prints_its_ceiling(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = json.loads((dataset / synth_ceiling.CEILING_FILE).read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(synth_ceiling.split_ceilings(synth_ceiling.split_specs(7, N))))
    assert set(written["splits"]) == {"train", "val", "test", "all"}
    for split in written["splits"].values():
        assert 0.0 <= split["no_title"]["hit_at_1"] <= 1.0 and 0.0 <= split["hit_at_1"] <= 1.0
    assert synth_ceiling.read_ceiling(dataset) == written
    assert cli_main(["dataset", "synth", str(dataset), "--videos", str(N), "--seed", "7", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"Bayes ceiling test ({written['splits']['test']['videos']} videos): Hit@1" in out
