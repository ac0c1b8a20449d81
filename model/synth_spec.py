"""What each video of the generated benchmark is made of (:func:`make_spec`), and the probabilities it is
drawn from: the label groups, photo pools, sound signatures, title kinds, label noise and multi-label rates.
:mod:`model.synth` renders a spec into a real encoded video; :mod:`model.synth_ceiling` computes from the
same probabilities the best Hit@1 any model could reach. The design is described in :mod:`model.synth`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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


def label_info() -> dict[str, tuple[int, int]]:
    return {f"{g}-{tag}": (gi, k) for gi, (g, _, _, tags) in enumerate(GROUPS) for k, (tag, _, _) in enumerate(tags)}


def sound_signature(label: str) -> tuple[str, float]:
    """(kind, centre Hz) of a label: siblings differ in both; groups use the combinations in other orders."""
    gi, k = label_info()[label]
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
    info = label_info()
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
