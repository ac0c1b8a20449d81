"""Tagstream's worker: four stages that follow the data (docs/ARCHITECTURE.md).

:mod:`worker.media` (a URI in, frames and audio out), :mod:`worker.engine` (a request in, a result document
out), :mod:`worker.jobs` (rq and Redis around the engine), :mod:`worker.service` (the worker process),
and :mod:`worker.tools` (commands without a worker). The modules at this level are the vocabulary they
share: settings, Redis keys, errors, metrics, logging and the ``tagstream`` command. Each package imports
only the ones before it (tests/test_layering.py).
"""
