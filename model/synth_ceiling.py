"""The Bayes ceiling of the generated benchmark: the best Hit@1 any model could expect on a split, from the
generator's own sampling probabilities (:mod:`model.synth_spec`). See :func:`bayes_ceiling` for the
derivation and its assumptions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from model import synth_spec
from model.synth_spec import GROUPS, SPLITS, VideoSpec, label_info, labels, make_spec, sound_signature

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
        info = label_info()
        group = np.array([info[lab][0] for lab in self.labels])
        n_tags = np.array([len(GROUPS[g][3]) for g in group])
        sibling = (group[:, None] == group[None, :]) & ~np.eye(n, dtype=bool)
        p_multi, p_noise = synth_spec.P_MULTI, synth_spec.P_LABEL_NOISE
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
                own = synth_spec.P_PREFERRED * (p == preferred) + (1 - synth_spec.P_PREFERRED) * (p in pool) / len(pool)
                ph[i, lab_i] = (1 - synth_spec.P_CONFUSER) * own + synth_spec.P_CONFUSER * (p in others) / len(others)
        self.photo = ph
        self.signature = [sound_signature(lab) for lab in self.labels]
        audio_total = sum(synth_spec.AUDIO_MODES.values())
        self.p_audio = {k: v / audio_total for k, v in synth_spec.AUDIO_MODES.items()}
        title_total = sum(synth_spec.TITLE_KINDS.values())
        self.p_title = {k: synth_spec.TITLE_KINDS.get(k, 0.0) / title_total for k in ("label", "group", "sibling", "filler", "empty")}

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
    out: dict = {"method": "bayes_ceiling (model/synth_ceiling.py): the generator's exact posterior of each video's "
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
    return split_ceilings(split_specs(meta["seed"], meta["videos"]))


def split_specs(seed: int, videos: int) -> list[VideoSpec]:
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
