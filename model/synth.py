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
                             (:func:`bayes_ceiling`; ``tagstream dataset synth`` also prints it)

Class design (the point of the set: every modality carries part of the answer, none all of it)
-------------------------------------------------------------------------------------------------
Eight level-1 groups, 29 Chinese "level1-level2" labels (:data:`GROUPS`). The downstream extractors
are an ImageNet CNN on 224x224 centre crops at 1 frame/s, log-mel statistics (or VGGish) per 0.96 s of
audio, and a character-level embedding of the title; the content is built for exactly those.

* Visuals decide mostly the level-1 group. Every group owns a pool of real photos shipped inside
  scikit-image's wheel (``skimage/data``: chelsea the cat, a horse silhouette on grass, coffee, the
  astronaut, the cameraman, LFW faces, a rocket, the moon, the Hubble deep field, motorcycles, a retina,
  IHC and cell micrographs, brick/gravel/coins/clock, colour charts, a chessboard, a logo, text). A
  video shows one of its group's photos with a per-video random zoom-and-pan (Ken Burns), flip, colour
  jitter (greyscale photos are tinted), a static noise grain and 0-3 moving coloured shapes. Each
  level-2 label prefers one photo of its pool (p = :data:`P_PREFERRED`), so the image says a little
  about level-2, but the pool is shared by the siblings. Confusion between groups: in
  :data:`P_CARD` of videos the photo is a card pasted on a brick/gravel/grass texture (the textures are
  the 家居 group's photos), and in :data:`P_CONFUSER` of videos the photo comes from another group.
* Sound partly separates level-2 labels inside a group. Each label has a signature: one of four kinds
  (steady harmonic tone, beeps at 2-6 Hz, repeated up-chirps, amplitude-modulated noise band) at one of
  four centre frequencies (300, 700, 1600, 3600 Hz, jittered x exp(N(0, 0.25))); siblings differ in
  both kind and centre, groups reuse the 16 combinations in other orders, so audio alone does not give
  the group. Every video has coloured background noise (white/pink/brown) and sometimes unrelated
  "music" (random chords). The signature is the label's in :data:`AUDIO_MODES` "label" cases, a random
  sibling's in "sibling" cases (misleading) and absent in "none" cases: audio is ambiguous by design.
* Title words separate level-2 further. Chinese titles are composed from the label's three keywords,
  the group's two words and twenty shared fillers (:data:`TITLE_KINDS`): "label" (a keyword of the
  label), "group" (only the group's words), "sibling" (a sibling's keyword: misleading), "filler" (no
  signal) and "empty".
* Label noise: in :data:`P_LABEL_NOISE` of videos the recorded label is replaced by another label (a
  sibling half of the time) while the content keeps the original one.
* Multi-label: :data:`P_MULTI` of videos carry two labels, two thirds of them siblings (both sound
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

Bayes ceiling: because the generator knows every probability it samples from, :func:`bayes_ceiling`
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
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from model.progress import Progress

log = logging.getLogger(__name__)

VERSION = 2
SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))

# group, its photos, its title words, [(level-2 tag, its keywords, its preferred photo)]
GROUPS: list[tuple[str, list[str], list[str], list[tuple[str, list[str], str]]]] = [
    ("动物", ["cat", "horse"], ["动物", "小动物"], [
        ("猫", ["猫咪", "喵星人", "橘猫"], "cat"),
        ("马", ["骏马", "马术", "赛马"], "horse"),
        ("萌宠", ["萌宠", "宠物", "铲屎官"], "cat"),
        ("野生", ["野生", "大草原", "野外"], "horse")]),
    ("美食", ["coffee"], ["美食", "吃货"], [
        ("咖啡", ["咖啡", "拿铁", "手冲"], "coffee"),
        ("甜点", ["甜点", "蛋糕", "甜品"], "coffee"),
        ("探店", ["探店", "打卡", "网红店"], "coffee"),
        ("早餐", ["早餐", "早饭", "元气"], "coffee")]),
    ("拍人", ["astronaut", "camera", "faces"], ["拍人", "人像"], [
        ("帅哥", ["帅哥", "小哥哥", "男神"], "camera"),
        ("美女", ["美女", "小姐姐", "女神"], "astronaut"),
        ("秀特效", ["特效", "变装", "魔法"], "faces"),
        ("街拍", ["街拍", "路人", "抓拍"], "camera")]),
    ("航天", ["rocket", "moon", "hubble"], ["航天", "太空"], [
        ("火箭", ["火箭", "发射", "点火"], "rocket"),
        ("星空", ["星空", "银河", "星系"], "hubble"),
        ("月球", ["月球", "月亮", "登月"], "moon")]),
    ("机车", ["moto_left", "moto_right"], ["机车", "摩旅"], [
        ("摩托", ["摩托", "重机", "仿赛"], "moto_left"),
        ("改装", ["改装", "排气", "轮毂"], "moto_right"),
        ("骑行", ["骑行", "跑山", "兜风"], "moto_left")]),
    ("医学", ["retina", "ihc", "cell", "microaneurysms"], ["医学", "科普"], [
        ("眼科", ["眼科", "眼底", "视网膜"], "retina"),
        ("病理", ["病理", "切片", "染色"], "ihc"),
        ("显微镜", ["显微镜", "细胞", "放大"], "cell")]),
    ("家居", ["brick", "gravel", "coins", "clock"], ["家居", "生活"], [
        ("装修", ["装修", "砖墙", "翻新"], "brick"),
        ("收藏", ["收藏", "硬币", "古钱"], "coins"),
        ("园艺", ["园艺", "花园", "石子路"], "gravel"),
        ("钟表", ["钟表", "时钟", "机芯"], "clock")]),
    ("设计", ["color", "phantom", "chessboard", "logo", "text"], ["设计", "创意"], [
        ("配色", ["配色", "色彩", "调色"], "color"),
        ("字体", ["字体", "书法", "排版"], "text"),
        ("标志", ["标志", "商标", "品牌"], "logo"),
        ("棋盘", ["棋盘", "象棋", "格子"], "chessboard")]),
]
FILLERS = ["今天", "分享", "一下", "日常", "记录", "第一次", "终于", "超级", "真的", "太好看了", "哈哈哈",
           "快来看", "小伙伴们", "周末", "随手拍", "合集", "推荐", "一起", "vlog", "治愈"]
SEPARATORS = ["", "", "", "，", " ", "！", "｜"]
TEXTURES = ["brick", "gravel", "grass"]

P_PREFERRED = 0.4
P_CARD = 0.3
P_CONFUSER = 0.07
P_LABEL_NOISE = 0.06
P_MULTI = 0.12
P_MUSIC = 0.3
TITLE_KINDS = {"label": 0.58, "group": 0.08, "sibling": 0.10, "filler": 0.18, "empty": 0.06}
AUDIO_MODES = {"label": 0.65, "sibling": 0.15, "none": 0.20}
SOUND_KINDS = ["tone", "beeps", "chirp", "noiseband"]
SOUND_CENTRES_HZ = [300.0, 700.0, 1600.0, 3600.0]
SIZES = [(160, 120), (192, 144), (240, 180), (320, 240), (320, 180), (384, 216), (426, 240), (480, 270),
         (180, 320), (144, 256), (270, 480), (200, 200), (240, 240), (300, 160), (352, 144)]
FPS = [12, 15, 20, 24, 25, 30]
AUDIO_RATES = [16000, 16000, 22050, 44100]


def labels() -> list[str]:
    """All "level1-level2" labels in class.txt order."""
    return [f"{g}-{tag}" for g, _, _, tags in GROUPS for tag, _, _ in tags]


def _label_info() -> dict[str, tuple[int, int]]:
    return {f"{g}-{tag}": (gi, k) for gi, (g, _, _, tags) in enumerate(GROUPS) for k, (tag, _, _) in enumerate(tags)}


def sound_signature(label: str) -> tuple[str, float]:
    """(kind, centre Hz) of a label: siblings differ in both; groups use the combinations in other orders."""
    gi, k = _label_info()[label]
    return SOUND_KINDS[(k + gi) % 4], SOUND_CENTRES_HZ[(3 * k + gi) % 4]


@dataclass
class VideoSpec:
    """Everything needed to render one video; drawn from the seed, never from the rendering."""

    index: int
    vid: str
    labels: list[str]  # recorded (may carry label noise)
    content: list[str]  # what the pictures and sounds were made from
    title: str
    title_kind: str
    audio_mode: str
    width: int
    height: int
    fps: int
    n_frames: int
    gop_s: int
    audio_rate: int
    channels: int
    scenes: list[tuple[str, str, float, float]] = field(default_factory=list)  # photo, texture, t0, t1
    sounds: list[tuple[str, float, float]] = field(default_factory=list)  # signature label, t0, t1
    split: str = ""

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps


def _pick(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    return keys[int(rng.choice(len(keys), p=np.array([probs[k] for k in keys]) / sum(probs.values())))]


def _title(rng: np.random.Generator, kind: str, keywords: list[str], group_words: list[str]) -> str:
    if kind == "empty":
        return ""
    tokens = [str(w) for w in rng.choice(FILLERS, size=int(rng.integers(1, 4)), replace=False)]
    if kind in ("label", "sibling") or rng.random() < 0.3:
        tokens += list(keywords)
    if kind == "group" or (kind != "filler" and rng.random() < 0.5):
        tokens.append(str(rng.choice(group_words)))
    order = rng.permutation(len(tokens))
    out = ""
    for j in order:
        out += (str(rng.choice(SEPARATORS)) if out else "") + tokens[j]
    return out + str(rng.choice(["", "", "！", "~", "。"]))


def make_spec(seed: int, index: int) -> VideoSpec:
    """Draw video ``index`` of the set generated with ``seed`` (independent of N)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    all_labels = labels()
    info = _label_info()
    # Groups in shuffled blocks of len(GROUPS): any N >= 8 covers every group.
    block = np.random.default_rng(np.random.SeedSequence([seed, 10**9 + index // len(GROUPS)]))
    gi = int(block.permutation(len(GROUPS))[index % len(GROUPS)])
    group, pool, group_words, tags = GROUPS[gi]
    k = int(rng.integers(len(tags)))
    content = [f"{group}-{tags[k][0]}"]
    cross = False
    if rng.random() < P_MULTI:
        if rng.random() < 2 / 3:
            content.append(f"{group}-{tags[int(rng.choice([j for j in range(len(tags)) if j != k]))][0]}")
        else:
            cross = True
            content.append(str(rng.choice([lab for lab in all_labels if info[lab][0] != gi])))
    recorded = list(content)
    if rng.random() < P_LABEL_NOISE:
        siblings = [f"{group}-{t}" for j, (t, _, _) in enumerate(tags) if j != k]
        others = [lab for lab in all_labels if lab not in content]
        recorded[0] = str(rng.choice(siblings if rng.random() < 0.5 else others))
        recorded = list(dict.fromkeys(recorded))
    title_kind = _pick(rng, TITLE_KINDS)
    if title_kind == "label":
        keywords = [str(rng.choice(GROUPS[info[lab][0]][3][info[lab][1]][1])) for lab in content
                    if lab == content[0] or rng.random() < 0.6]
    elif title_kind == "sibling":
        j = int(rng.choice([j for j in range(len(tags)) if j != k]))
        keywords = [str(rng.choice(tags[j][1]))]
    else:
        keywords = []
    title = _title(rng, title_kind, keywords, group_words)
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    fps = int(rng.choice(FPS))
    n_frames = int(round(rng.uniform(3.0, 5.0) * fps))
    duration = n_frames / fps
    cut = duration * rng.uniform(0.35, 0.65) if cross else duration
    scenes = []
    for lab, t0, t1 in [(content[0], 0.0, cut)] + ([(content[1], cut, duration)] if cross else []):
        lg, lk = info[lab]
        lpool, preferred = GROUPS[lg][1], GROUPS[lg][3][lk][2]
        photo = preferred if rng.random() < P_PREFERRED else str(rng.choice(lpool))
        if rng.random() < P_CONFUSER:
            photo = str(rng.choice([p for g in GROUPS if g[0] != GROUPS[lg][0] for p in g[1]]))
        texture = str(rng.choice(TEXTURES)) if rng.random() < P_CARD else ""
        scenes.append((photo, texture, t0, t1))
    audio_mode = _pick(rng, AUDIO_MODES)
    sounds: list[tuple[str, float, float]] = []
    if audio_mode != "none":
        heard = list(content)
        if audio_mode == "sibling":
            heard[0] = f"{group}-{tags[int(rng.choice([j for j in range(len(tags)) if j != k]))][0]}"
        if len(heard) == 1:
            sounds = [(heard[0], 0.0, duration)]
        else:
            mid = cut if cross else duration * rng.uniform(0.35, 0.65)
            sounds = [(heard[0], 0.0, mid), (heard[1], mid, duration)]
    return VideoSpec(index=index, vid=f"v{index:05d}", labels=recorded, content=content, title=title,
                     title_kind=title_kind, audio_mode=audio_mode, width=width, height=height, fps=fps,
                     n_frames=n_frames, gop_s=int(rng.choice([1, 2])),
                     audio_rate=int(rng.choice(AUDIO_RATES)), channels=int(rng.choice([1, 2])),
                     scenes=scenes, sounds=sounds)


# ------------------------------------------------------------------------------------ Bayes ceiling

CEILING_FILE = "ceiling.json"


def title_mentions(title: str) -> tuple[frozenset[int], int]:
    """What a title says about the labels: (indices of labels one of whose keywords it contains, index of
    the group whose group word it contains, or -1). Fillers and separators carry no label information."""
    mentioned = frozenset(i for i, lab in enumerate(labels())
                          for word in _keywords()[lab] if word in title)
    group = next((gi for gi, (_, _, words, _) in enumerate(GROUPS) if any(w in title for w in words)), -1)
    return mentioned, group


@cache
def _keywords() -> dict[str, tuple[str, ...]]:
    return {f"{g}-{tag}": tuple(kws) for g, _, _, tags in GROUPS for tag, kws, _ in tags}


@dataclass(frozen=True)
class Evidence:
    """Everything about a video's labels that its rendered content and title can show (see
    :func:`bayes_ceiling`): the photo of each scene and the sound signature of each sound segment, in
    time order, and the title's mentions (None: the title is not used; ``()``: the title is empty)."""

    photos: tuple[str, ...]
    sounds: tuple[tuple[str, float], ...]
    title: tuple[frozenset[int], int] | tuple[()] | None

    @classmethod
    def of(cls, spec: VideoSpec, use_title: bool = True) -> Evidence:
        title: tuple[frozenset[int], int] | tuple[()] | None = None
        if use_title:
            title = title_mentions(spec.title) if spec.title else ()
        return cls(photos=tuple(s[0] for s in spec.scenes),
                   sounds=tuple(sound_signature(lab) for lab, _, _ in spec.sounds), title=title)


class _Posterior:
    """The generator's own model of a video (:func:`make_spec`), inverted by enumeration.

    A hypothesis is the content ``(c0, c1)`` (``c1 = -1``: one label); its prior, the likelihood of each
    piece of :class:`Evidence` given it, and ``P(label l is recorded | content)`` are read off
    :func:`make_spec`'s sampling with the module's probabilities *at construction time* (tests change
    them). Every other random choice of a video (size, fps, texture, grain, shapes, music, jitter,
    fillers, separators, cut times) is drawn independently of the labels and cancels out.
    """

    def __init__(self) -> None:
        self.labels = labels()
        n = len(self.labels)
        info = _label_info()
        group = np.array([info[lab][0] for lab in self.labels])
        n_tags = np.array([len(GROUPS[g][3]) for g in group])
        sibling = (group[:, None] == group[None, :]) & ~np.eye(n, dtype=bool)
        p_multi, p_noise = P_MULTI, P_LABEL_NOISE
        hypotheses: list[tuple[int, int, float]] = []  # (c0, c1, prior)
        for a in range(n):
            p_a = 1 / len(GROUPS) / n_tags[a]  # group uniform (blocks of len(GROUPS)), tag uniform within
            hypotheses.append((a, -1, p_a * (1 - p_multi)))
            for b in range(n):
                if sibling[a, b]:  # two thirds of the second labels: a uniform sibling
                    hypotheses.append((a, b, p_a * p_multi * 2 / 3 / (n_tags[a] - 1)))
                elif group[b] != group[a]:  # one third: a uniform label of another group
                    hypotheses.append((a, b, p_a * p_multi / 3 / (n - n_tags[a])))
        self.c0 = np.array([h[0] for h in hypotheses])
        self.c1 = np.array([h[1] for h in hypotheses])
        self.prior = np.array([h[2] for h in hypotheses])
        self.multi = self.c1 >= 0
        self.cross = self.multi & (group[self.c0] != group[np.maximum(self.c1, 0)])
        self.group, self.n_tags, self.sibling = group, n_tags, sibling
        # P(label l recorded | content): c1 always stays; c0 survives the noise; any other label only as
        # the noise's replacement (a sibling of c0 half the time, else any label outside the content).
        rec = np.zeros((len(self.c0), n))
        for h, (a, b) in enumerate(zip(self.c0, self.c1, strict=True)):
            outside = n - (2 if b >= 0 else 1)
            for lab in range(n):
                if lab == b:
                    rec[h, lab] = 1.0
                elif lab == a:
                    rec[h, lab] = 1 - p_noise
                else:
                    rec[h, lab] = p_noise * (0.5 * sibling[a, lab] / (n_tags[a] - 1) + 0.5 / outside)
        self.recorded = rec
        # P(photo | scene label): the preferred photo or one of the pool, then maybe a confuser
        photos = sorted({p for g in GROUPS for p in g[1]})
        self.photo_index = {p: i for i, p in enumerate(photos)}
        ph = np.zeros((len(photos), n))
        for lab_i, lab in enumerate(self.labels):
            gi, k = info[lab]
            pool, preferred = GROUPS[gi][1], GROUPS[gi][3][k][2]
            others = [p for g in GROUPS if g[0] != GROUPS[gi][0] for p in g[1]]
            for p, i in self.photo_index.items():
                own = P_PREFERRED * (p == preferred) + (1 - P_PREFERRED) * (p in pool) / len(pool)
                ph[i, lab_i] = (1 - P_CONFUSER) * own + P_CONFUSER * (p in others) / len(others)
        self.photo = ph
        self.signature = [sound_signature(lab) for lab in self.labels]
        audio_total = sum(AUDIO_MODES.values())
        self.p_audio = {k: v / audio_total for k, v in AUDIO_MODES.items()}
        title_total = sum(TITLE_KINDS.values())
        self.p_title = {k: TITLE_KINDS.get(k, 0.0) / title_total for k in ("label", "group", "sibling", "filler", "empty")}

    def _image(self, photos: tuple[str, ...]) -> np.ndarray:
        """P(scene photos | h): one scene for c0, or two (c0 then c1) when the second label is cross-group."""
        like = np.zeros(len(self.c0))
        if len(photos) == 1:
            like[~self.cross] = self.photo[self.photo_index[photos[0]], self.c0[~self.cross]]
        elif len(photos) == 2:
            i, j = self.photo_index[photos[0]], self.photo_index[photos[1]]
            like[self.cross] = self.photo[i, self.c0[self.cross]] * self.photo[j, self.c1[self.cross]]
        return like

    def _audio(self, sounds: tuple[tuple[str, float], ...]) -> np.ndarray:
        """P(sound signatures | h): none (mode "none"), else one per content label in order, the first being
        the label's own ("label") or a uniformly drawn sibling's ("sibling")."""
        if not sounds:
            return np.full(len(self.c0), self.p_audio.get("none", 0.0))
        like = np.zeros(len(self.c0))
        for h, (a, b) in enumerate(zip(self.c0, self.c1, strict=True)):
            if len(sounds) != (2 if b >= 0 else 1) or (b >= 0 and self.signature[b] != sounds[1]):
                continue
            siblings_heard = sum(self.signature[s] == sounds[0] for s in np.flatnonzero(self.sibling[a]))
            like[h] = (self.p_audio.get("label", 0.0) * (self.signature[a] == sounds[0])
                       + self.p_audio.get("sibling", 0.0) * siblings_heard / (self.n_tags[a] - 1))
        return like

    def _title(self, title: tuple[frozenset[int], int] | tuple[()] | None) -> np.ndarray:
        """P(title mentions | h), up to factors common to every hypothesis (the keyword drawn among a
        label's three, fillers, separators). Kinds: "label" names c0 (and c1 with p 0.6), "sibling" one
        sibling of c0, each with the group word half of the time; "group" only the group word; "filler"
        nothing; "empty" is the empty title."""
        if title is None:
            return np.ones(len(self.c0))
        if title == ():
            return np.full(len(self.c0), self.p_title["empty"])
        mentioned, group_word = title
        p = self.p_title
        own_group = self.group[self.c0]
        word_ok = (group_word == -1) | (group_word == own_group)
        like = np.zeros(len(self.c0))
        if len(mentioned) == 0:
            like += p["group"] * (group_word == own_group) + p["filler"] * (group_word == -1)
        elif len(mentioned) == 1:
            (m,) = mentioned
            label_kind = (self.c0 == m) * np.where(self.multi, 0.4, 1.0)
            sibling_kind = self.sibling[self.c0, m] / (self.n_tags[self.c0] - 1)
            like += word_ok * 0.5 * (p["label"] * label_kind + p["sibling"] * sibling_kind)
        elif len(mentioned) == 2:
            both = self.multi & np.array([{a, b} == mentioned for a, b in zip(self.c0, self.c1, strict=True)])
            like += word_ok * 0.5 * p["label"] * 0.6 * both
        return like

    def recorded_probability(self, evidence: Evidence) -> tuple[np.ndarray, bool]:
        """(P(label l is among the recorded labels | evidence) for every l, whether the title had to be
        ignored because no hypothesis explains it: a keyword formed across two title tokens)."""
        weight = self.prior * self._image(evidence.photos) * self._audio(evidence.sounds)
        with_title = weight * self._title(evidence.title)
        fallback = bool(with_title.sum() <= 0)
        if not fallback:
            weight = with_title
        if weight.sum() <= 0:
            raise ValueError(f"no hypothesis explains {evidence}")
        return weight @ self.recorded / weight.sum(), fallback


def bayes_ceiling(specs: list[VideoSpec], use_title: bool = True) -> dict:
    """The best Hit@1 any model could reach on ``specs``, from the generator's own probabilities.

    Derivation. A video's recorded labels R depend on what can be observed only through its content
    labels (c0, c1): the label noise is drawn independently of the title, the pictures and the sounds.
    The observable evidence E is taken to be, *perceived perfectly*: the photo of each scene (the
    number of scenes shows a cross-group second label), the sound signature (kind, centre) of each
    sound segment (their number shows a second label unless the video is silent), and the title's
    label keywords and group word. Then ``P(l in R | E) = sum_h P(h | E) P(l in R | h)`` over the
    content hypotheses h, with ``P(h | E) ~ P(h) P(photos | h) P(sounds | h) P(title | h)`` exactly as
    :func:`make_spec` samples them (:class:`_Posterior`). The Bayes-optimal single guess is
    ``argmax_l P(l in R | E)`` and its expected Hit@1 on the video is ``max_l P(l in R | E)``.

    Returns, averaged over ``specs``:

    * ``hit_at_1``: the ceiling, the mean of ``max_l P(l in R | E)`` (the Bayes rule's expected Hit@1);
    * ``bayes_rule_hit_at_1``: the Bayes guess scored against the labels actually recorded (a draw
      around the ceiling; a lucky model can beat it on a finite split, not the ceiling in expectation);
    * ``content_oracle_hit_at_1``: a looser bound that assumes the content labels themselves are seen
      (only the label noise is left): ``max_l P(l in R | c0, c1)``;
    * ``title_fallbacks``: videos whose title no hypothesis explains (a keyword formed across two tokens,
      e.g. "石子路" + "人像" reads "路人"), scored without their title.

    Assumptions (each makes the ceiling an upper bound for real models): the photo and the sound
    signature are perceived without error (real extractors confuse zoomed crops, cards on textures and
    jittered frequencies), the group prior is uniform (the generator balances groups in blocks of
    ``len(GROUPS)`` videos), and the model knows the generator's probabilities (a trained model only
    approximates them from finite data). ``use_title=False`` gives the ceiling without titles (the
    image+audio rows, and ``evaluate --no-title``).
    """
    if not specs:
        raise ValueError("no videos")
    post = _Posterior()
    cache_: dict[Evidence, tuple[np.ndarray, bool]] = {}
    expected, realised, oracle, fallbacks = 0.0, 0, 0.0, 0
    index = {lab: i for i, lab in enumerate(post.labels)}
    hypothesis = {(int(a), int(b)): h for h, (a, b) in enumerate(zip(post.c0, post.c1, strict=True))}
    for spec in specs:
        evidence = Evidence.of(spec, use_title)
        if evidence not in cache_:
            cache_[evidence] = post.recorded_probability(evidence)
        probs, fallback = cache_[evidence]
        expected += float(probs.max())
        realised += int(post.labels[int(np.argmax(probs))] in spec.labels)
        content = (index[spec.content[0]], index[spec.content[1]] if len(spec.content) > 1 else -1)
        oracle += float(post.recorded[hypothesis[content]].max())
        fallbacks += int(fallback)
    n = len(specs)
    return {"videos": n, "hit_at_1": expected / n, "bayes_rule_hit_at_1": realised / n,
            "content_oracle_hit_at_1": oracle / n, "title_fallbacks": fallbacks}


def split_ceilings(specs: list[VideoSpec]) -> dict:
    """Per split ("all" too): :func:`bayes_ceiling` with titles and without (``no_title``)."""
    out: dict = {"method": "bayes_ceiling (model/synth.py): the generator's exact posterior of each video's "
                           "recorded labels given perfectly perceived photos, sound signatures and title words",
                 "splits": {}}
    for name in [n for n, _ in SPLITS] + ["all"]:
        chosen = [s for s in specs if name == "all" or s.split == name]
        if chosen:
            out["splits"][name] = {**bayes_ceiling(chosen), "no_title": bayes_ceiling(chosen, use_title=False)}
    return out


def read_ceiling(data_dir: str | os.PathLike) -> dict:
    """The ceilings of a generated set: its ``ceiling.json``, or computed from its meta.json (seed, N)."""
    path = Path(data_dir) / CEILING_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    meta = json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8"))
    return split_ceilings(_split_specs(meta["seed"], meta["videos"]))


def _split_specs(seed: int, videos: int) -> list[VideoSpec]:
    """The specs of a set, each with its split (the fixed permutation :func:`generate` uses)."""
    specs = [make_spec(seed, i) for i in range(videos)]
    order = np.random.default_rng(np.random.SeedSequence([seed, 2**31])).permutation(videos)
    n_val = n_test = max(1, round(0.15 * videos)) if videos >= 3 else 0
    for rank, idx in enumerate(order):
        specs[idx].split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return specs


def format_ceiling(ceiling: dict) -> str:
    """One line per split, as ``tagstream dataset synth`` prints them."""
    lines = []
    for name, c in ceiling["splits"].items():
        lines.append(f"Bayes ceiling {name} ({c['videos']} videos): Hit@1 {c['hit_at_1']:.3f} with titles, "
                     f"{c['no_title']['hit_at_1']:.3f} without (content oracle {c['content_oracle_hit_at_1']:.3f}; "
                     f"Bayes rule on the recorded labels {c['bayes_rule_hit_at_1']:.3f} / "
                     f"{c['no_title']['bayes_rule_hit_at_1']:.3f})")
    return "\n".join(lines)


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
    if rng.random() < P_MUSIC:
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
    specs = _split_specs(seed, videos)
    (out / "class.txt").write_text("".join(f"{lab}\n" for lab in labels()), encoding="utf-8")
    for name, _ in SPLITS:
        rows = [f"videos/{s.vid}.mp4\t{s.title}\t{','.join(s.labels)}\n" for s in specs if s.split == name]
        (out / f"{name}.tsv").write_text("".join(rows), encoding="utf-8")
    with open(out / "truth.jsonl", "w", encoding="utf-8") as fh:
        for s in specs:
            fh.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")
    meta = {"generator": "tagstream dataset synth", "version": VERSION, "seed": seed, "videos": videos,
            "splits": {name: sum(s.split == name for s in specs) for name, _ in SPLITS},
            "labels": len(labels()), "groups": len(GROUPS), "p_preferred_photo": P_PREFERRED,
            "p_card_on_texture": P_CARD, "p_confuser_photo": P_CONFUSER, "p_label_noise": P_LABEL_NOISE,
            "p_multi_label": P_MULTI, "p_music": P_MUSIC, "title_kinds": TITLE_KINDS,
            "audio_modes": AUDIO_MODES}
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
