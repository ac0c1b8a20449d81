"""Reproduce the paper's Table 1 on a generated set: image+audio vs image+audio+text, with and without
title dropout, for several seeds; beside it the MVT training recipe, MVT's attention (no bilinear term),
standardised features, a smaller training set, and the generator's Bayes ceiling with each row's gap to it.

Usage (after ``tagstream dataset synth DATA --videos 2000 --seed 1`` and ``tagstream extract DATA FEATURES``)::

    python scripts/reproduce_table1.py FEATURES RUNS_DIR --seeds 1,2 [--jobs 2] [--threads 1] [--data DATA]
        [--rows ia,iat,iat_drop] [--train-videos N] [--tag NAME] [any tagstream train flags]

For each seed and row (``--rows``, names in :data:`CONFIGS`; default the paper's three) it trains a model
with ``tagstream train`` (the paper's schedule and sizes unless flags override them) and scores it with
``tagstream evaluate`` on the test split, with titles and with ``--no-title``. Train flags the script does
not know (e.g. ``--schedule-samples 2800 --epochs 60``) go to every training of the call, after the row's
own flags, so they win over ``--preset mvt``; ``--tag NAME`` keeps such runs apart (run directories
``RUNS/<row>[_n<N>][_<tag>]_s<seed>``). ``--train-videos N`` trains on a fixed subset of N training videos
(``tagstream train --train-videos``; validation and test splits unchanged). Rows marked "standardised"
train and evaluate on a copy of the features with the image and audio dimensions standardised by the
training split's mean and standard deviation (written once to ``RUNS/features_std``).

Runs whose ``results.json`` exists are not repeated. Prints the table (markdown, the paper's layout plus
the no-title column; with ``--data`` the set's Bayes ceiling, model/synth_ceiling.py, and each row's gap to it:
the with-title ceiling for rows that read titles, the no-title ceiling for image+audio rows) and writes
``RUNS_DIR/table1.json`` (merged with earlier calls).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IAT = ["--modalities", "image,audio,text"]
CONFIGS: dict[str, tuple[str, list[str]]] = {  # name -> (row label, train flags)
    "ia": ("image+audio", ["--modalities", "image,audio"]),
    "iat": ("image+audio+title text", IAT),
    "iat_drop": ("image+audio+title text, title dropout 0.4", [*IAT, "--title-dropout", "0.4"]),
    "iat_nobil": ("image+audio+title text, no bilinear term (MVT's attention)", [*IAT, "--no-bilinear"]),
    "ia_mvt": ("image+audio, --preset mvt", ["--modalities", "image,audio", "--preset", "mvt"]),
    "iat_mvt": ("image+audio+title text, --preset mvt", [*IAT, "--preset", "mvt"]),
    "iat_mvt_bil": ("image+audio+title text, --preset mvt --bilinear", [*IAT, "--preset", "mvt", "--bilinear"]),
    "iat_std": ("image+audio+title text, standardised features", IAT),
    "iat_mvt_std": ("image+audio+title text, --preset mvt, standardised features", [*IAT, "--preset", "mvt"]),
}
STANDARDISED = {"iat_std", "iat_mvt_std"}


def tagstream(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tagstream {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def standardised_store(features: str, out: Path) -> str:
    """A copy of ``features`` with image and audio standardised per dimension by the training split's
    frame mean and standard deviation (text states untouched); extractor ids get a ``+std`` suffix so a
    checkpoint trained on it refuses the raw features."""
    from model.feature_store import FeatureStoreWriter
    from model.mvt_data import open_source

    if (out / "done").is_file():
        return str(out)
    source = open_source(features)
    stats = {}
    for modality in ("image", "audio"):
        rows = np.concatenate([getattr(source.load(v), modality) for v in source.split_ids("train")])
        stats[modality] = (rows.mean(axis=0), rows.std(axis=0) + 1e-6)
    extractors = {k: {**v, "id": f"{v['id']}+std"} if k in stats else v for k, v in source.extractors.items()}
    with FeatureStoreWriter(out, extractors, source.sampling, labels=source.labels) as writer:
        for split in source.splits():
            for vid in source.split_ids(split):
                if writer.has(vid):
                    continue
                video = source.load(vid)
                for modality, (mean, std) in stats.items():
                    setattr(video, modality, ((getattr(video, modality) - mean) / std).astype(np.float32))
                writer.write(video, split)
    (out / "done").write_text("ok\n")
    return str(out)


def run_one(features: str, ckpt: Path, train_flags: list[str]) -> dict:
    done = ckpt / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    tagstream("train", features, str(ckpt), "--no-progress", *train_flags)
    result = {}
    for no_title in (False, True):
        out = json.loads(tagstream("evaluate", str(ckpt), features, "--split", "test",
                                   *(["--no-title"] if no_title else [])))
        out.pop("per_class_ap", None)
        result["no_title" if no_title else "title"] = out
    history = json.loads((ckpt / "history.json").read_text())
    result["epochs_run"] = len(history)
    result["best_epoch"] = max(history, key=lambda h: h["val_hit_at_1"])["epoch"]
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features")
    parser.add_argument("runs")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--rows", default="ia,iat,iat_drop", help=f"comma-separated, of {','.join(CONFIGS)}")
    parser.add_argument("--train-videos", type=int, default=0, help="train on a fixed subset of N videos (0: all)")
    parser.add_argument("--tag", default="", help="suffix of the run directories (for runs with extra flags)")
    parser.add_argument("--data", help="the generated data set: print its Bayes ceiling and each row's gap")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    args, extra = parser.parse_known_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in CONFIGS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(CONFIGS)}")
    suffix = (f"_n{args.train_videos}" if args.train_videos else "") + (f"_{args.tag}" if args.tag else "")
    std_features = standardised_store(args.features, runs / "features_std") if STANDARDISED & set(rows) else ""

    def task(name: str, seed: int) -> dict:
        flags = ["--seed", str(seed), *CONFIGS[name][1], "--threads", str(args.threads),
                 *(["--train-videos", str(args.train_videos)] if args.train_videos else []), *extra]
        features = std_features if name in STANDARDISED else args.features
        return run_one(features, runs / f"{name}{suffix}_s{seed}", flags)

    tasks = [(name, seed) for seed in seeds for name in rows]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(tasks, pool.map(lambda t: task(*t), tasks), strict=True))
    table = runs / "table1.json"
    merged = json.loads(table.read_text()) if table.is_file() else {}
    merged.update({f"{n}{suffix}_s{s}": {**r, "train_flags": [*CONFIGS[n][1], *extra],
                                          "train_videos": args.train_videos or "all"} for (n, s), r in results.items()})
    table.write_text(json.dumps(merged, indent=1))

    ceiling = None
    if args.data:
        from model.synth_ceiling import read_ceiling

        ceiling = read_ceiling(args.data)["splits"]["test"]
        print(f"Bayes ceiling of the test split ({ceiling['videos']} videos): Hit@1 {ceiling['hit_at_1']:.3f} with "
              f"titles, {ceiling['no_title']['hit_at_1']:.3f} without\n")
    label_extra = (f", {args.train_videos} training videos" if args.train_videos else "") + \
        (f" [{' '.join(extra)}]" if extra else "")
    head = "| model | seed | Hit@1 | Hit@2 | Hit@1, no titles | Hit@2, no titles | mAP | GAP@20 | epochs (best) |"
    print(head + (" gap to ceiling | gap, no titles |" if ceiling else ""))
    print("|---" * (9 + (2 if ceiling else 0)) + "|")
    for seed in seeds:
        for name in rows:
            r = results[(name, seed)]
            t, n = r["title"], r["no_title"]
            line = (f"| {CONFIGS[name][0]}{label_extra} | {seed} | {t['hit_at_1']:.3f} | {t['hit_at_2']:.3f} | "
                    f"{n['hit_at_1']:.3f} | {n['hit_at_2']:.3f} | {t['map']:.3f} | {t['gap_at_20']:.3f} | "
                    f"{r['epochs_run']} ({r['best_epoch']}) |")
            if ceiling:
                flags = CONFIGS[name][1]
                reads_titles = "text" in flags[flags.index("--modalities") + 1]
                top = ceiling["hit_at_1"] if reads_titles else ceiling["no_title"]["hit_at_1"]
                line += (f" {100 * (top - t['hit_at_1']):.1f} | "
                         f"{100 * (ceiling['no_title']['hit_at_1'] - n['hit_at_1']):.1f} |")
            print(line)
    for seed in seeds:
        if {"ia", "iat"} <= set(rows):
            gap = results[("iat", seed)]["title"]["hit_at_1"] - results[("ia", seed)]["title"]["hit_at_1"]
            print(f"seed {seed}: three modalities - two = {100 * gap:+.1f} points of test Hit@1")
        if {"iat", "iat_drop"} <= set(rows):
            drop = results[("iat_drop", seed)]["no_title"]["hit_at_1"] - results[("iat", seed)]["no_title"]["hit_at_1"]
            print(f"seed {seed}: title dropout 0.4 changes no-title Hit@1 by {100 * drop:+.1f} points")


if __name__ == "__main__":
    main()
