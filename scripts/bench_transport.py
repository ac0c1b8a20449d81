"""Decode transport, side by side (issue 6, BENCHMARKS.md "NVDEC and CUDA contexts"): the same clip decoded by
``N`` decoders through the worker's isolated decoder processes and through a ``ProcessPoolExecutor``
(``bench_gpu_decode.DecoderFarm``), with and without bringing the frames and log-mel patches back to this
process, and with the log-mel patches cut where the audio is decoded (NumPy ``model.log_mel``, what the worker
does) or from the raw audio after the transport (torch ``PatchStream``: in this process for the decoder
processes, in the pool process for the process pool). Prints videos/s, decoder CPU seconds per video and this
process's CPU seconds per video (receiving, and cutting patches where they are cut here), alternating the
configurations ``--rounds`` times.

    python scripts/bench_transport.py                     # the 60 s 720p clip of bench_gpu.py, 2 decoders
    python scripts/bench_transport.py --decoders 16 --videos 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
os.environ["PYTHONPATH"] = os.pathsep.join(  # decode processes import the project and bench_gpu_decode
    p for p in (str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")) if p)

from bench_gpu_decode import DecoderFarm, make_clip  # noqa: E402


def measure(transport: str, keep: bool, child_patches: bool, clip: str, decoders: int, videos: int) -> dict:
    farm = DecoderFarm(decoders, transport, clip, "none", child_patches=child_patches)
    try:
        farm.warm()
        c0, t0 = time.process_time(), time.perf_counter()
        results = [f.result() for f in [farm.submit(keep) for _ in range(videos)]]
        wall = time.perf_counter() - t0
        main_cpu = time.process_time() - c0
        decoder_cpu = farm.decode_cpu_s(results)
    finally:
        farm.close()
    return {"videos_per_s": videos / wall, "decoder_cpu_s": decoder_cpu / videos, "main_cpu_s": main_cpu / videos}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default="", help="video to decode (default: bench_gpu.py's 60 s 720p clip, made if missing)")
    ap.add_argument("--decoders", type=int, default=2)
    ap.add_argument("--videos", type=int, default=16, help="videos per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/tagstream-gpu-bench", help="where bench_gpu.py keeps its clip")
    args = ap.parse_args()
    clip = args.clip or str(make_clip(Path(args.cache), 60.0))
    print(f"{args.decoders} decoders, {args.videos} videos of {Path(clip).name} per line")
    print("| transport | log-mel cut | arrays back | videos/s | decoder CPU s/video | this process CPU s/video |\n"
          "|---|---|---|---:|---:|---:|")
    for _ in range(args.rounds):
        for transport in DecoderFarm.TRANSPORTS:
            for child_patches in (False, True):
                for keep in (False, True):
                    r = measure(transport, keep, child_patches, clip, args.decoders, args.videos)
                    where = "decoder, NumPy" if child_patches else "after transport, torch"
                    print(f"| {transport} | {where} | {'yes' if keep else 'no'} | {r['videos_per_s']:.2f} "
                          f"| {r['decoder_cpu_s']:.3f} | {r['main_cpu_s']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
