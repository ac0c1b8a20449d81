"""Engine: a :class:`~worker.engine.request.VideoRequest` in, a future of its result document out (torch; no rq).

:class:`~worker.engine.pipeline.Pipeline` ``.submit(request)`` returns a ``Future`` resolved with the
result document (:mod:`.document`, the only place that builds one), with the video's
:class:`~model.features.VideoFeatures` (``features_only``), or with a
:class:`~worker.errors.TagstreamError` carrying the stage timings so far. Inside: decode threads
(:mod:`.decoding`, over :mod:`worker.media`) send typed :mod:`.events` to one batcher thread, which fills
size-or-wait buffers across videos and accumulates each video's features (:mod:`.buffers`), runs due
batches through the extractors on inference threads (:mod:`.inference`) and the fusion model over
finished videos. :mod:`.models` loads the resident models. This package's ``__init__`` and
:mod:`.request` import no torch, so code that only builds requests stays light.
"""
