"""Jobs: the rq side of a worker, and the only package that imports rq.

In: rq jobs from the queue (``worker.jobs.tag_video(video_id, uri=None, title="")`` by dotted path,
JSON serializer) and entries of the ``tagstream:uploads`` stream. Out: a
:class:`~worker.engine.request.VideoRequest` per job to the engine, and the result document written to
``tagstream:tags:{video_id}`` plus an event on ``tagstream:tagged``. :mod:`.task` is the job and its
payload checks (:mod:`.payload_guard`), :mod:`.worker` the rq worker running K jobs at once
(heartbeats: :mod:`.heartbeat`, maintenance: :mod:`.maintenance`), :mod:`.enqueue` and :mod:`.status`
the producer side (no torch), :mod:`.uploads` the stream bridge, :mod:`.sink` the result writer, and
:mod:`.redis_retry` the one retry policy they share. This ``__init__`` exposes :func:`tag_video`, so rq
finds the job by its dotted path.
"""

from worker.jobs.task import tag_video

__all__ = ["tag_video"]
