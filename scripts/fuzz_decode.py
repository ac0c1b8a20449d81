"""Mutation fuzzing of the decoder: mutated valid videos through isolated decoder processes.

Seeds are real encoded clips (H.264 in MP4, fast-start MP4, Matroska and MPEG-TS; HEVC in MP4; VP9/Opus
in WebM; MPEG-4 Part 2/MP3 in AVI; MJPEG in AVI; AAC audio), 1-2 s, small. Each mutant is one seed with
one to three mutations:

``bitflip``   flip 1-16 random bits             ``insert``    insert 1-64 random bytes
``delete``    delete a run of 1-256 bytes        ``truncate``  cut the file at a random point
``boxsize``   rewrite one MP4 box size, Matroska element size byte or RIFF chunk size (0, 1, 7, off by a
              few, 2**31 - 1, 0xFFFFFFFF, or random)
``magic``     overwrite 4 bytes with 0, 0xFFFFFFFF, 0x7FFFFFFF or 0x80000000
``splice``    copy a random run of the file over another place in it

Every mutant is decoded end to end (frames and audio) by a :class:`worker.media.isolation.DecodePool`
child with the production limits (``--decode-budget-s``, ``decode_memory_limit_mb``). Outcomes: tagged,
a typed refusal (reason code), ``decoder_crash`` (the child died: a native crash), a hard-deadline
kill (``timeout`` past budget + grace), or ``internal_error`` (an exception the decoder did not type).
Reported: counts by outcome and mutator, wall time per file (p50/p99/max, against the budget), peak RSS
of any decoder process, and RSS growth of this (parent) process. Mutants that crashed, hung or raised
``internal_error`` are kept under ``--keep`` with the recipe that rebuilds them (seed, mutator, RNG seed).

    python scripts/fuzz_decode.py --count 1000            # the full run (RELIABILITY.md)
    python scripts/fuzz_decode.py --count 48 --json out.json   # CI size (tests/test_fuzz.py)

Exit status 1 when any mutant crashed the decoder, passed the hard deadline, or pushed a decoder past
``--max-rss-mb``.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEEDS = {
    "h264_aac.mp4": dict(codec="libx264", audio="aac", gop=5),
    "h264_fast.mp4": dict(codec="libx264", faststart=True, bframes=2),
    "h264.mkv": dict(codec="libx264", audio="libopus"),
    "h264.ts": dict(codec="libx264", audio="aac"),
    "hevc.mp4": dict(codec="libx265"),
    "vp9_opus.webm": dict(codec="libvpx-vp9", audio="libopus"),
    "mpeg4_mp3.avi": dict(codec="mpeg4", audio="mp3"),
    "mjpeg.avi": dict(codec="mjpeg"),
}
MUTATORS = ("bitflip", "insert", "delete", "truncate", "boxsize", "magic", "splice")


def make_seeds(directory: Path) -> dict[str, bytes]:
    from media import make_video

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, kw in SEEDS.items():
        path = directory / name
        if not path.exists():
            make_video(path, **{"seconds": 1.5, "fps": 10, "size": (128, 96), "pattern": "busy", **kw})
        out[name] = path.read_bytes()
    return out


# --- mutators -----------------------------------------------------------------------------------------
def _size_fields(data: bytes) -> list[tuple[int, str]]:
    """Offsets of container size fields: MP4 box sizes, RIFF chunk sizes, EBML size bytes (sampled)."""
    fields: list[tuple[int, str]] = []
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free"):
        from hostile import mp4_boxes

        fields += [(pos, ">I") for _name, pos, _size in mp4_boxes(data)]
    elif data[:4] == b"RIFF":
        pos = 12
        while pos + 8 <= len(data) and len(fields) < 4096:
            fields.append((pos + 4, "<I"))
            size = struct.unpack_from("<I", data, pos + 4)[0]
            pos = pos + 12 if data[pos : pos + 4] == b"LIST" else pos + 8 + size + (size & 1)
    elif data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: the byte after a few common element ids
        for ident in (b"\x18\x53\x80\x67", b"\x16\x54\xae\x6b", b"\x1f\x43\xb6\x75", b"\xae", b"\xa3", b"\xa0"):
            at = data.find(ident)
            while 0 <= at < len(data) - len(ident) - 1 and len(fields) < 256:
                fields.append((at + len(ident), "B"))
                at = data.find(ident, at + 1)
    return fields


def mutate(data: bytes, mutator: str, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    n = len(buf)
    pos = int(rng.integers(0, n))
    if mutator == "bitflip":
        for _ in range(int(rng.integers(1, 17))):
            i = int(rng.integers(0, n))
            buf[i] ^= 1 << int(rng.integers(0, 8))
    elif mutator == "insert":
        buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    elif mutator == "delete":
        del buf[pos : pos + int(rng.integers(1, 257))]
    elif mutator == "truncate":
        del buf[max(1, pos) :]
    elif mutator == "boxsize":
        fields = _size_fields(data)
        if not fields:
            return mutate(data, "magic", rng)
        at, fmt = fields[int(rng.integers(0, len(fields)))]
        if fmt == "B":
            buf[at] = int(rng.choice([0x80, 0x81, 0xFF, 0x01, 0x10, int(rng.integers(0, 256))]))
        else:
            old = struct.unpack_from(fmt, buf, at)[0]
            new = int(rng.choice([0, 1, 7, old + int(rng.integers(-8, 9)), 0x7FFFFFFF, 0xFFFFFFFF,
                                  int(rng.integers(0, 1 << 32))]))  # fmt: skip
            struct.pack_into(fmt, buf, at, new & 0xFFFFFFFF)
    elif mutator == "magic":
        at = min(pos, max(0, n - 4))
        buf[at : at + 4] = struct.pack(">I", int(rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000])))
    elif mutator == "splice":
        length = int(rng.integers(1, min(4096, n) + 1))
        src = int(rng.integers(0, max(1, n - length)))
        buf[pos : pos + length] = data[src : src + length]
    else:
        raise ValueError(mutator)
    return bytes(buf) if buf else b"\x00"


def recipe(index: int, seeds: list[str], base_seed: int) -> tuple[str, list[str], int]:
    """(seed name, mutators, RNG seed) of mutant ``index``: a pure function, so findings rebuild exactly."""
    rng = np.random.default_rng([base_seed, index])
    seed = seeds[index % len(seeds)]
    muts = [MUTATORS[int(i)] for i in rng.integers(0, len(MUTATORS), int(rng.integers(1, 4)))]
    return seed, muts, int(rng.integers(0, 2**31))


def build(seed_bytes: bytes, muts: list[str], rng_seed: int) -> bytes:
    rng = np.random.default_rng(rng_seed)
    data = seed_bytes
    for m in muts:
        data = mutate(data, m, rng)
    return data


# --- running --------------------------------------------------------------------------------------------
def decode_one(pool, path: Path, policy, limits) -> tuple[str, float]:
    from worker.errors import reason_of

    t0 = time.monotonic()
    try:
        with pool.source(str(path), policy, limits) as src:
            for _ in src.chunks():
                pass
        outcome = "tagged"
    except Exception as exc:  # noqa: BLE001 - the outcome is the reason code
        outcome = reason_of(exc)
        if outcome == "timeout" and "hard deadline" in str(exc):
            outcome = "hard_timeout"
    return outcome, time.monotonic() - t0


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(args: argparse.Namespace) -> dict:
    from worker.config import Settings
    from worker.media.isolation import DecodePool
    from worker.media.records import DecodeLimits
    from worker.media.sampling import SamplingPolicy

    settings = Settings(decode_budget_s=args.decode_budget_s, open_timeout_s=5.0, read_timeout_s=5.0, hwaccel="none")
    limits = DecodeLimits.from_settings(settings)
    policy = SamplingPolicy(fps=settings.fps, max_frames=settings.max_frames)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tagstream-fuzz-"))
    seeds = make_seeds(work / "seeds")
    names = sorted(seeds)
    keep = Path(args.keep) if args.keep else work / "findings"
    pool = DecodePool(args.workers, memory_limit_mb=settings.decode_memory_limit_mb, open_policy=None)
    lock = threading.Lock()
    outcomes: Counter[str] = Counter()
    by_mutator: dict[str, Counter[str]] = {}
    times: list[float] = []
    findings: list[dict] = []
    rss_start = _rss_mb()
    hard_limit = limits.open_timeout_s + limits.decode_budget_s + pool.grace_s

    def one(index: int) -> None:
        seed, muts, rng_seed = recipe(index, names, args.seed)
        data = build(seeds[seed], muts, rng_seed)
        path = work / "mutants" / f"m{index:05d}{Path(seed).suffix}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        outcome, elapsed = decode_one(pool, path, policy, limits)
        with lock:
            outcomes[outcome] += 1
            by_mutator.setdefault("+".join(sorted(set(muts))), Counter())[outcome] += 1
            times.append(elapsed)
            if outcome in ("decoder_crash", "hard_timeout", "internal_error") or elapsed > hard_limit:
                keep.mkdir(parents=True, exist_ok=True)
                kept = keep / path.name
                kept.write_bytes(data)
                findings.append({"index": index, "seed": seed, "mutators": muts, "rng_seed": rng_seed,
                                 "outcome": outcome, "elapsed_s": round(elapsed, 3), "file": str(kept)})
        path.unlink()

    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(args.workers) as ex:
            list(ex.map(one, range(args.start, args.start + args.count)))
    finally:
        pool.close()
    wall = time.monotonic() - t0
    t = np.array(times)
    report = {
        "mutants": args.count, "seeds": names, "workers": args.workers, "rng_seed": args.seed,
        "decode_budget_s": limits.decode_budget_s, "hard_deadline_s": hard_limit,
        "memory_limit_mb": settings.decode_memory_limit_mb,
        "outcomes": dict(sorted(outcomes.items())),
        "by_mutator": {k: dict(v) for k, v in sorted(by_mutator.items())},
        "crashes": outcomes["decoder_crash"], "hard_timeouts": outcomes["hard_timeout"],
        "internal_errors": outcomes["internal_error"],
        "time_s": {"p50": float(np.percentile(t, 50)), "p99": float(np.percentile(t, 99)), "max": float(t.max())},
        "over_budget": int((t > limits.open_timeout_s + limits.decode_budget_s).sum()),
        "decoder_peak_rss_mb": round(pool.peak_rss_kb / 1024, 1),
        "parent_rss_mb": {"start": round(rss_start, 1), "end": round(_rss_mb(), 1)},
        "parent_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "respawns": pool.crashes + pool.kills, "wall_s": round(wall, 1), "findings": findings,
    }  # fmt: skip
    report["ok"] = not (report["crashes"] or report["hard_timeouts"] or report["over_budget"]
                        or report["decoder_peak_rss_mb"] > args.max_rss_mb)  # fmt: skip
    return report


def print_report(r: dict) -> None:
    print(f"## Mutation fuzzing: {r['mutants']} mutants of {len(r['seeds'])} seeds, {r['workers']} decoder processes")
    print(f"decode budget {r['decode_budget_s']} s (hard deadline {r['hard_deadline_s']} s), "
          f"address-space limit {r['memory_limit_mb']} MB per decoder")
    print("\n| outcome | mutants |\n|---|---:|")
    for k, v in r["outcomes"].items():
        print(f"| {k} | {v} |")
    ts = r["time_s"]
    print(f"\ncrashes {r['crashes']}, hard-deadline kills {r['hard_timeouts']}, internal errors {r['internal_errors']}, "
          f"over budget {r['over_budget']}")
    print(f"time per mutant: p50 {ts['p50']:.3f} s, p99 {ts['p99']:.3f} s, max {ts['max']:.3f} s; wall {r['wall_s']} s")
    print(f"decoder peak RSS {r['decoder_peak_rss_mb']} MB; this process {r['parent_rss_mb']['start']} -> "
          f"{r['parent_rss_mb']['end']} MB (peak {r['parent_peak_rss_mb']} MB)")
    for f in r["findings"]:
        print(f"finding: {f}")
    print("OK" if r["ok"] else "FAILED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="number of mutants")
    parser.add_argument("--start", type=int, default=0, help="first mutant index (to resume or shard)")
    parser.add_argument("--seed", type=int, default=20260101, help="base RNG seed")
    parser.add_argument("--workers", type=int, default=2, help="decoder processes (and driver threads)")
    parser.add_argument("--decode-budget-s", type=float, default=10.0)
    parser.add_argument("--max-rss-mb", type=float, default=1024.0, help="fail when a decoder's peak RSS exceeds it")
    parser.add_argument("--workdir", default=None, help="where seeds and mutants go (default: a temp dir)")
    parser.add_argument("--keep", default=None, help="where findings are kept (default: WORKDIR/findings)")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
