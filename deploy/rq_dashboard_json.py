"""Run rq-dashboard on Tagstream's queues, which use rq's JSON serializer.

``rq-dashboard --json`` reads queues and jobs with the JSON serializer, but (0.9.0) lists workers with
``Worker.all()`` without it, so a busy worker's current job is unpickled and the Workers view answers
HTTP 500. Making JSON the serializer rq falls back to, in this process only, fixes that.

Usage: ``python deploy/rq_dashboard_json.py --redis-url redis://:PASSWORD@HOST:6379/0 [rq-dashboard options]``
(``--json`` is added for you).
"""

from __future__ import annotations

import sys

import rq.serializers


def main() -> None:
    rq.serializers.PickleSerializer = rq.serializers.JSONSerializer  # the fallback resolve_serializer returns
    from rq_dashboard.cli import main as dashboard_main

    if "--json" not in sys.argv and "-j" not in sys.argv:
        sys.argv.append("--json")
    dashboard_main()


if __name__ == "__main__":
    main()
