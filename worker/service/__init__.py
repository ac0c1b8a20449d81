"""Service: settings in, a running worker process out (or one per GPU).

:mod:`.run` is ``tagstream worker``: the pre-flight check (settings, device, Redis), the metrics and
health server (:mod:`.health`), the resident models and the engine, then the rq worker and the uploads
bridge of :mod:`worker.jobs`, until SIGTERM. With ``--gpus`` it becomes :mod:`.supervisor`, which runs
and restarts one worker process per GPU and loads no model. :mod:`.doctor` (with :mod:`.doctor_checks`,
:mod:`.doctor_device`, :mod:`.doctor_redis`) is ``tagstream doctor``; its cheap checks are also logged
by every worker at start-up, which is why it lives here and not in :mod:`worker.tools`.
"""
