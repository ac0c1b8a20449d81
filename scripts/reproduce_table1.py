"""Reproduce the paper's Table 1 on a generated set: image+audio vs image+audio+text, with and without
title dropout, for several seeds.

Usage (after ``tagstream dataset synth DATA --videos 2000 --seed 1`` and ``tagstream extract DATA FEATURES``)::

    python scripts/reproduce_table1.py FEATURES RUNS_DIR --seeds 1,2 [--jobs 2] [--threads 1]

For each seed it trains three models with ``tagstream train`` (the paper's schedule and sizes unless flags
override them) and scores each with ``tagstream evaluate`` on the test split, with titles and with
``--no-title``. Runs whose ``results.json`` exists are not repeated. Prints the table (markdown, the
paper's layout plus the no-title column) and writes ``RUNS_DIR/table1.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIGS = {  # name -> (row label, train flags)
    "ia": ("image+audio", ["--modalities", "image,audio"]),
    "iat": ("image+audio+title text", ["--modalities", "image,audio,text"]),
    "iat_drop": ("image+audio+title text, title dropout 0.4", ["--modalities", "image,audio,text",
                                                               "--title-dropout", "0.4"]),
}


def tagstream(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tagstream {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_one(features: str, runs: Path, name: str, seed: int, extra: list[str]) -> dict:
    ckpt = runs / f"{name}_s{seed}"
    done = ckpt / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    tagstream("train", features, str(ckpt), "--seed", str(seed), "--no-progress", *CONFIGS[name][1], *extra)
    result = {}
    for no_title in (False, True):
        out = json.loads(tagstream("evaluate", str(ckpt), features, "--split", "test",
                                   *(["--no-title"] if no_title else [])))
        out.pop("per_class_ap", None)
        result["no_title" if no_title else "title"] = out
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features")
    parser.add_argument("runs")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    args, extra = parser.parse_known_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = ["--threads", str(args.threads), *extra]
    tasks = [(name, seed) for seed in seeds for name in CONFIGS]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(tasks, pool.map(lambda t: run_one(args.features, runs, t[0], t[1], extra), tasks), strict=True))
    (runs / "table1.json").write_text(json.dumps({f"{n}_s{s}": r for (n, s), r in results.items()}, indent=1))

    print("| model | seed | Hit@1 | Hit@2 | Hit@1, no titles | Hit@2, no titles | mAP | GAP@20 |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        for name, (label, _) in CONFIGS.items():
            r = results[(name, seed)]
            t, n = r["title"], r["no_title"]
            print(f"| {label} | {seed} | {t['hit_at_1']:.3f} | {t['hit_at_2']:.3f} | {n['hit_at_1']:.3f} | "
                  f"{n['hit_at_2']:.3f} | {t['map']:.3f} | {t['gap_at_20']:.3f} |")
    for seed in seeds:
        gap = results[("iat", seed)]["title"]["hit_at_1"] - results[("ia", seed)]["title"]["hit_at_1"]
        drop = results[("iat_drop", seed)]["no_title"]["hit_at_1"] - results[("iat", seed)]["no_title"]["hit_at_1"]
        print(f"seed {seed}: three modalities - two = {100 * gap:+.1f} points of test Hit@1; "
              f"title dropout 0.4 changes no-title Hit@1 by {100 * drop:+.1f} points")


if __name__ == "__main__":
    main()
