"""``tagstream dataset synth OUT_DIR --videos N --seed S``: a generated benchmark of real encoded videos.

Output (MultimodalVideoTag's layout, paths relative to OUT_DIR)::

    videos/<id>.mp4          H.264 (libx264, yuv420p) + AAC, 3-5 s, sizes 144x256 .. 480x270 (landscape,
                             portrait, square, wide), 12-30 fps, keyframe every 1 or 2 s, faststart
    class.txt                one "level1-level2" label per line
    train.tsv val.tsv test.tsv   ``videos/<id>.mp4 \\t title \\t label1,label2`` (title may be empty);
                             a fixed 70/15/15 permutation of the ids drawn from the seed
    meta.json                generator version, seed, N, split sizes, the mixing probabilities below
    truth.jsonl              per video: recorded labels, the labels its content was made from, the title
                             kind, the audio mode, the photos used (for analysis only; no reader needs it)
    ceiling.json             per split: the best Hit@1 any model could expect, with and without titles
                             (:func:`model.synth_ceiling.bayes_ceiling`; ``tagstream dataset synth`` also prints it)

Class design (the point of the set: every modality carries part of the answer, none all of it)
-------------------------------------------------------------------------------------------------
Eight level-1 groups, 29 Chinese "level1-level2" labels (:data:`model.synth_spec.GROUPS`). The downstream extractors
are an ImageNet CNN on 224x224 centre crops at 1 frame/s, log-mel statistics (or VGGish) per 0.96 s of
audio, and a character-level embedding of the title; the content is built for exactly those.

* Visuals decide mostly the level-1 group. Every group owns a pool of real photos shipped inside
  scikit-image's wheel (``skimage/data``: chelsea the cat, a horse silhouette on grass, coffee, the
  astronaut, the cameraman, LFW faces, a rocket, the moon, the Hubble deep field, motorcycles, a retina,
  IHC and cell micrographs, brick/gravel/coins/clock, colour charts, a chessboard, a logo, text). A
  video shows one of its group's photos with a per-video random zoom-and-pan (Ken Burns), flip, colour
  jitter (greyscale photos are tinted), a static noise grain and 0-3 moving coloured shapes. Each
  level-2 label prefers one photo of its pool (p = :data:`model.synth_spec.P_PREFERRED`), so the image says a little
  about level-2, but the pool is shared by the siblings. Confusion between groups: in
  :data:`model.synth_spec.P_CARD` of videos the photo is a card pasted on a brick/gravel/grass texture (the textures are
  the 家居 group's photos), and in :data:`model.synth_spec.P_CONFUSER` of videos the photo comes from another group.
* Sound partly separates level-2 labels inside a group. Each label has a signature: one of four kinds
  (steady harmonic tone, beeps at 2-6 Hz, repeated up-chirps, amplitude-modulated noise band) at one of
  four centre frequencies (300, 700, 1600, 3600 Hz, jittered x exp(N(0, 0.25))); siblings differ in
  both kind and centre, groups reuse the 16 combinations in other orders, so audio alone does not give
  the group. Every video has coloured background noise (white/pink/brown) and sometimes unrelated
  "music" (random chords). The signature is the label's in :data:`model.synth_spec.AUDIO_MODES` "label" cases, a random
  sibling's in "sibling" cases (misleading) and absent in "none" cases: audio is ambiguous by design.
* Title words separate level-2 further. Chinese titles are composed from the label's three keywords,
  the group's two words and twenty shared fillers (:data:`model.synth_spec.TITLE_KINDS`): "label" (a keyword of the
  label), "group" (only the group's words), "sibling" (a sibling's keyword: misleading), "filler" (no
  signal) and "empty".
* Label noise: in :data:`model.synth_spec.P_LABEL_NOISE` of videos the recorded label is replaced by another label (a
  sibling half of the time) while the content keeps the original one.
* Multi-label: :data:`model.synth_spec.P_MULTI` of videos carry two labels, two thirds of them siblings (both sound
  signatures, one after the other, title may name both) and one third from two groups (two scenes, each
  with its own photo and sound: the attention weights should find the segments).

Expected difficulty (what the design aims at, not a guarantee): image alone finds the group for most
videos but guesses among siblings; image+audio resolves about two thirds of the siblings; the title
adds the rest for most titled videos, so the three-modality model should beat image+audio by well over
5 points of Hit@1, and a model trained with title dropout should do better on videos without titles.
A proxy check (seed 21, 2,000 specs, 70/30 split; the image replaced by the true group with 12% of
groups wrong, audio = 64 log-mel band means + stds, title = char 1-2-gram tf-idf, logistic regression /
one-layer MLP) gave test Hit@1: image 0.26, audio 0.15-0.17, title 0.55-0.60, image+audio 0.46,
image+audio+title 0.59-0.63.

Bayes ceiling: because the generator knows every probability it samples from, :func:`model.synth_ceiling.bayes_ceiling`
computes each video's exact posterior of its recorded labels given what it shows (photos, sound
signatures, title words), hence the best single guess and its expected Hit@1. That is an upper bound on
what any model can reach on a split (derivation and assumptions in its docstring); on seed 1, 2,000
videos, the test split's ceiling is 0.787 with titles and 0.675 without.

Determinism: everything a video is made of is drawn from ``SeedSequence([seed, index])``, so a video's
labels, title and content do not depend on N, on the number of workers or on resuming; the TSVs are
byte-identical for the same seed and N. Encoded bytes are normally identical too (x264 runs with one
thread), but only the labels and titles are promised. Existing ``videos/<id>.mp4`` are kept (files are
written to a temporary name and renamed, so a crash leaves no half-written video behind).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import os
from dataclasses import asdict
from functools import cache
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from model import synth_spec
from model.progress import Progress
from model.synth_ceiling import CEILING_FILE, format_ceiling, read_ceiling, split_ceilings, split_specs
from model.synth_spec import GROUPS, SPLITS, VERSION, VideoSpec, labels, sound_signature

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- pictures

_FILES = {"cat": "chelsea.png", "coffee": "coffee.png", "astronaut": "astronaut.png", "camera": "camera.png",
          "rocket": "rocket.jpg", "moon": "moon.png", "hubble": "hubble_deep_field.jpg",
          "moto_left": "motorcycle_left.png", "moto_right": "motorcycle_right.png", "retina": "retina.jpg",
          "ihc": "ihc.png", "cell": "cell.png", "microaneurysms": "microaneurysms.png", "brick": "brick.png",
          "gravel": "gravel.png", "grass": "grass.png", "coins": "coins.png", "clock": "clock_motion.png",
          "color": "color.png", "phantom": "phantom.png", "chessboard": "chessboard_RGB.png",
          "logo": "logo.png", "text": "text.png"}


def skimage_data_dir() -> Path:
    """The ``skimage/data`` folder inside the installed wheel (no download)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed; the synthetic set uses its bundled photos")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@cache
def photo(name: str) -> np.ndarray:
    """A named source photo as (H, W, 3) uint8, long side at most 640 px (greyscale ones stay grey)."""
    root = skimage_data_dir()
    if name == "faces":
        faces = np.load(root / "lfw_subset.npy")[:36]  # (36, 25, 25) in [0, 1]
        grid = faces.reshape(6, 6, 25, 25).transpose(0, 2, 1, 3).reshape(150, 150)
        img = Image.fromarray((grid * 255).astype(np.uint8)).convert("RGB").resize((450, 450), Image.BILINEAR)
    elif name == "horse":
        mask = np.asarray(Image.open(root / "horse.png").convert("L")) < 128
        grass = np.asarray(Image.open(root / "grass.png").convert("L").resize(mask.shape[::-1])) / 255.0
        rgb = grass[..., None] * np.array([110.0, 190.0, 70.0]) + 30.0
        rgb[mask] = grass[mask][:, None] * np.array([60.0, 40.0, 25.0]) + np.array([110.0, 70.0, 40.0])
        img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    else:
        img = Image.open(root / _FILES[name]).convert("RGB")
    scale = 640 / max(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    elif max(img.size) < 320:
        img = img.resize((img.width * 3, img.height * 3), Image.BILINEAR)
    return np.asarray(img)


def _scene_image(rng: np.random.Generator, name: str, texture: str) -> np.ndarray:
    """The photo after per-scene flip and colour jitter, optionally as a card on a texture."""
    img = photo(name).astype(np.float32)
    if texture:
        canvas = np.asarray(Image.fromarray(photo(texture)).resize((img.shape[1], img.shape[0]))).astype(np.float32)
        canvas *= rng.uniform(0.5, 1.1, 3)
        s = rng.uniform(0.45, 0.8)
        h, w = max(2, int(img.shape[0] * s)), max(2, int(img.shape[1] * s))
        small = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((w, h), Image.BILINEAR)).astype(np.float32)
        y, x = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        canvas[y:y + h, x:x + w] = small
        img = canvas
    if rng.random() < 0.5:
        img = img[:, ::-1]
    grey = img.mean(axis=2, keepdims=True)
    if float(np.abs(img - grey).mean()) < 2.0:  # greyscale photo: tint it
        img = grey * rng.uniform(0.6, 1.3, 3)
    else:
        img = grey + (img - grey) * rng.uniform(0.5, 1.4)  # saturation
    img = img * rng.uniform(0.85, 1.15, 3) * rng.uniform(0.7, 1.25) + rng.uniform(-25, 25)
    return img.clip(0, 255).astype(np.uint8)


def _frames(spec: VideoSpec, rng: np.random.Generator):
    """Yield the (H, W, 3) uint8 frames: Ken Burns over each scene's image, moving shapes, grain."""
    w, h, aspect = spec.width, spec.height, spec.width / spec.height
    grain = rng.normal(0, rng.uniform(0, 5), (h + 16, w + 16, 3)).astype(np.int16)
    shapes = [(rng.uniform(0, 1, 2), rng.uniform(-0.3, 0.3, 2), rng.uniform(0.05, 0.15),
               tuple(int(c) for c in rng.integers(0, 256, 3)), bool(rng.random() < 0.5))
              for _ in range(int(rng.integers(0, 4)))]
    plans = []
    for name, texture, t0, t1 in spec.scenes:
        img = Image.fromarray(_scene_image(rng, name, texture))
        scale = 2.5 * h / min(img.height, img.width / aspect)  # widest crop = 2.5x the output: cheap resizes
        if scale < 1:
            img = img.resize((max(2, round(img.width * scale)), max(2, round(img.height * scale))), Image.BILINEAR)
        full_h = min(img.height, img.width / aspect)
        boxes = []
        for _ in range(2):
            bh = full_h * rng.uniform(0.4, 1.0)
            bw = bh * aspect
            cx = rng.uniform(bw / 2, img.width - bw / 2)
            cy = rng.uniform(bh / 2, img.height - bh / 2)
            box = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
            boxes.append(np.clip(box, 0, [img.width, img.height, img.width, img.height]))
        plans.append((img, boxes, t0, t1))
    for i in range(spec.n_frames):
        t = i / spec.fps
        img, (b0, b1), t0, t1 = next((p for p in plans if p[2] <= t < p[3]), plans[-1])
        a = min(1.0, max(0.0, (t - t0) / max(t1 - t0, 1e-6)))
        frame = img.resize((w, h), Image.BILINEAR, box=tuple(float(v) for v in b0 + (b1 - b0) * a))
        if shapes:
            draw = ImageDraw.Draw(frame)
            for pos, vel, size, colour, ellipse in shapes:
                p = np.abs(((pos + vel * t) % 2.0) - 1.0)  # bounce inside [0, 1]
                r = size * min(w, h)
                xy = (p[0] * w - r, p[1] * h - r, p[0] * w + r, p[1] * h + r)
                (draw.ellipse if ellipse else draw.rectangle)(xy, fill=colour)
        dy, dx = int(rng.integers(0, 16)), int(rng.integers(0, 16))
        out = np.asarray(frame, dtype=np.int16) + grain[dy:dy + h, dx:dx + w]
        yield out.clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- sounds

def _shaped_noise(rng: np.random.Generator, n: int, rate: int, gain) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / rate)
    out = np.fft.irfft(spec * gain(np.maximum(f, 1.0)), n)
    return out / (np.abs(out).max() + 1e-9)


def _signature(rng: np.random.Generator, label: str, n: int, rate: int) -> np.ndarray:
    kind, centre = sound_signature(label)
    f = centre * float(np.exp(rng.normal(0, 0.25)))
    t = np.arange(n) / rate
    if kind == "tone":
        phase = 2 * np.pi * f * t + 3 * np.sin(2 * np.pi * rng.uniform(3, 6) * t)
        return np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    if kind == "beeps":
        gate = (t * rng.uniform(2, 6) + rng.uniform()) % 1.0 < rng.uniform(0.3, 0.5)
        return np.sin(2 * np.pi * f * t) * gate
    if kind == "chirp":
        period = rng.uniform(0.4, 0.9)
        u = (t % period) / period  # sweep f/2 -> 2f, exponential
        inst = f / 2 * 4.0 ** u
        phase = 2 * np.pi * np.cumsum(inst) / rate
        return np.sin(phase) * np.sin(np.pi * u)
    band = _shaped_noise(rng, n, rate, lambda fr: np.exp(-0.5 * (np.log(fr / f) / 0.15) ** 2))
    return 2.0 * band * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))


def _audio(spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    """(channels, samples) float32 in [-1, 1]."""
    rate = spec.audio_rate
    n = int(round(spec.duration * rate))
    colour = float(rng.choice([0.0, 0.5, 1.0]))  # white, pink, brown (power ~ 1 / f^(2 colour))
    mix = _shaped_noise(rng, n, rate, lambda fr: fr ** -colour) * rng.uniform(0.05, 0.3)
    if rng.random() < synth_spec.P_MUSIC:
        t = np.arange(n) / rate
        chord = sum(np.sin(2 * np.pi * 220 * 2 ** (rng.integers(0, 36) / 12) * t) for _ in range(3))
        mix += chord / 3 * rng.uniform(0.1, 0.4) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.3, 1) * t))
    for label, t0, t1 in spec.sounds:
        a, b = int(t0 * rate), min(n, int(t1 * rate))
        if b > a:
            sig = _signature(rng, label, b - a, rate)
            mix[a:b] += sig / (np.abs(sig).max() + 1e-9) * rng.uniform(0.3, 0.9)
    mix = mix / max(1.0, float(np.abs(mix).max()) / 0.9)
    return np.repeat(mix[None, :], spec.channels, axis=0).astype(np.float32)


# ------------------------------------------------------------------------------------------ writing

def render(spec: VideoSpec, path: Path, seed: int) -> Path:
    """Encode one video (H.264 + AAC, interleaved) to ``path`` via a temporary file."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, spec.index, 1]))
    audio = _audio(spec, rng)
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    layout = "mono" if spec.channels == 1 else "stereo"
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        vs = out.add_stream("libx264", rate=spec.fps)
        vs.width, vs.height, vs.pix_fmt = spec.width, spec.height, "yuv420p"
        gop = spec.fps * spec.gop_s
        vs.gop_size = gop
        vs.options = {"preset": "superfast", "crf": "26", "threads": "1",
                      "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        aus = out.add_stream("aac", rate=spec.audio_rate, layout=layout)
        aus.options = {"aac_coder": "fast"}
        size = aus.codec_context.frame_size or 1024
        apts = 0

        def push_audio(until: int) -> None:
            nonlocal apts
            while apts < min(until, audio.shape[1]):
                chunk = np.ascontiguousarray(audio[:, apts:apts + size])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
                frame.sample_rate, frame.pts = spec.audio_rate, apts
                apts += chunk.shape[1]
                for packet in aus.encode(frame):
                    out.mux(packet)

        for i, rgb in enumerate(_frames(spec, rng)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                out.mux(packet)
            push_audio(int((i + 1) * spec.audio_rate / spec.fps))
        push_audio(audio.shape[1])
        for stream in (vs, aus):
            for packet in stream.encode():
                out.mux(packet)
    os.replace(tmp, path)
    return path


def _render_job(job: tuple[VideoSpec, str, int]) -> str:
    spec, path, seed = job
    render(spec, Path(path), seed)
    return spec.vid


def generate(out_dir: str | os.PathLike, videos: int, seed: int, workers: int = 1, progress: bool = True) -> Path:
    """Write (or complete) the data set in ``out_dir`` and return its path.

    Videos already present are kept, so an interrupted run resumes; a folder generated with another
    seed or generator version is refused (ValueError) rather than mixed. ``progress``: a bar on a
    terminal, periodic log lines otherwise (:class:`model.progress.Progress`); False shows neither.
    """
    if videos < 1:
        raise ValueError("videos must be >= 1")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old.get("seed") != seed or old.get("version") != VERSION:
            raise ValueError(f"{out} holds a set made with seed {old.get('seed')} (version "
                             f"{old.get('version')}); use an empty folder")
    specs = split_specs(seed, videos)
    (out / "class.txt").write_text("".join(f"{lab}\n" for lab in labels()), encoding="utf-8")
    for name, _ in SPLITS:
        rows = [f"videos/{s.vid}.mp4\t{s.title}\t{','.join(s.labels)}\n" for s in specs if s.split == name]
        (out / f"{name}.tsv").write_text("".join(rows), encoding="utf-8")
    with open(out / "truth.jsonl", "w", encoding="utf-8") as fh:
        for s in specs:
            fh.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")
    meta = {"generator": "tagstream dataset synth", "version": VERSION, "seed": seed, "videos": videos,
            "splits": {name: sum(s.split == name for s in specs) for name, _ in SPLITS},
            "labels": len(labels()), "groups": len(GROUPS), "p_preferred_photo": synth_spec.P_PREFERRED,
            "p_card_on_texture": synth_spec.P_CARD, "p_confuser_photo": synth_spec.P_CONFUSER, "p_label_noise": synth_spec.P_LABEL_NOISE,
            "p_multi_label": synth_spec.P_MULTI, "p_music": synth_spec.P_MUSIC, "title_kinds": synth_spec.TITLE_KINDS,
            "audio_modes": synth_spec.AUDIO_MODES}
    meta_path.write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / CEILING_FILE).write_text(json.dumps(split_ceilings(specs), indent=2) + "\n", encoding="utf-8")
    jobs = [(s, str(out / "videos" / f"{s.vid}.mp4"), seed) for s in specs
            if not (out / "videos" / f"{s.vid}.mp4").exists()]
    log.info("%d videos in %s, %d to render with %d worker(s)", videos, out, len(jobs), workers)
    bar = Progress(len(jobs), "synth", unit="video", enabled=progress, logger=log)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                _render_job(job)
                bar.update()
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_render_job, jobs, chunksize=2):
                    bar.update()
    finally:
        bar.close()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["synth"], help="what to do (only 'synth')")
    parser.add_argument("out_dir", help="output folder (created; existing videos are kept)")
    parser.add_argument("--videos", type=int, default=2000, help="number of videos (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed: fixes labels, titles, content, split")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="render processes")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (on a terminal) or progress log lines (otherwise)")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    try:
        out = generate(args.out_dir, args.videos, args.seed, workers=args.workers, progress=not args.no_progress)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    log.info("wrote %s", out)
    print(format_ceiling(read_ceiling(out)))
    return 0
