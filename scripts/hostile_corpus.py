"""Run the hostile-input corpus (tests/hostile.py) through the worker's decode path and print a table.

Each case goes through what a worker does with a job's URI: the URI policy (``resolve_uri``), then the
decoder, once in a decoder process (``decode_isolation`` on, the default) and once in-process; the table
shows the reason each path gave, the time to refuse (isolated path) and the limit that bounds it. The
limits are ``tests/hostile.py``'s ``LIMITS`` (2 s open/read timeouts, 4 s decode budget, 320x240 pixels,
1 GiB files, 3 redirects). Exit status 1 when any reason differs from the expected one.

    python scripts/hostile_corpus.py            # RELIABILITY.md "Hostile and broken input"
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def refuse(uri: str, settings, pool) -> tuple[str, float]:
    from worker.errors import reason_of
    from worker.jobs.task import TagArgs, resolve_uri
    from worker.media.records import DecodeLimits
    from worker.media.sampling import SamplingPolicy
    from worker.media.source import VideoSource

    t0 = time.monotonic()
    try:
        resolved = resolve_uri(TagArgs("v", uri, ""), settings)
        policy, limits = SamplingPolicy(fps=settings.fps, max_frames=settings.max_frames), DecodeLimits.from_settings(settings)
        source = pool.source(resolved, policy, limits) if pool else VideoSource(resolved, policy, limits)
        with source:
            for _ in source.chunks():
                pass
        reason = "tagged"
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        reason = reason_of(exc)
    return reason, time.monotonic() - t0


def main() -> int:
    from hostile import LIMITS, HostileServer, budget_s, build_corpus, good_inputs, server_files

    from worker.config import Settings
    from worker.media.isolation import DecodePool
    from worker.media.open import OpenPolicy, set_thread_policy

    root = Path(tempfile.mkdtemp(prefix="tagstream-hostile-"))
    with HostileServer(server_files(root)) as server:
        cases = build_corpus(root, server.base)
        goods = good_inputs(root, server.base)
        settings = Settings(allowed_roots=[str(root / "media")], allowed_hosts=["127.0.0.1"], hwaccel="none", **LIMITS)
        set_thread_policy(OpenPolicy.from_settings(settings))
        pool = DecodePool.from_settings(settings, 1)
        refuse(goods["good_local_0"], settings, pool)  # decoder start-up is not charged to the first case
        rows, wrong, worst = [], 0, 0.0
        try:
            for case in cases:
                got_iso, elapsed = refuse(case.uri, settings, pool)
                got_in, _ = refuse(case.uri, settings, None)
                ok = got_iso == got_in == case.reason
                wrong += not ok
                worst = max(worst, elapsed - budget_s(case))
                rows.append(f"| {case.kind} | {case.note} | {case.reason} | {got_iso} | {got_in} | "
                            f"{elapsed:.2f} | {case.budget} ({budget_s(case):g} s) |{'' if ok else ' **WRONG**'}")
            good = {name: refuse(uri, settings, pool)[0] for name, uri in goods.items()}
        finally:
            pool.close()
        secret = server.hits.get("/secret-target", 0)
    print(f"## Hostile corpus: {len(cases)} cases\n")
    print("| case | what | expected | isolated | in-process | seconds (isolated) | bound |")
    print("|---|---|---|---|---|---:|---|")
    print("\n".join(rows))
    print(f"\n{len(cases) - wrong}/{len(cases)} refused with the expected reason on both paths; "
          f"worst time over its bound: {worst:+.2f} s; requests to the disallowed redirect target: {secret}; "
          f"good inputs after the corpus: {good}")
    return 1 if wrong or secret or set(good.values()) != {"tagged"} else 0


if __name__ == "__main__":
    sys.exit(main())
