"""Media: a URI or file in, sampled frames and 16 kHz audio chunks (or log-mel patches) out (PyAV; no torch,
no rq).

In: a :class:`~worker.media.records.DecodeRequest` (URI, sampling policy, decode limits, open policy,
output options). Out: :class:`~worker.media.records.FrameChunk` s (RGB crops with timestamps) and
:class:`~worker.media.records.AudioChunk` s (16 kHz mono float32) or, when the request asks for
``audio_patches``, :class:`~worker.media.records.PatchChunk` s (VGGish log-mel patches, cut by
:class:`model.log_mel.PatchCutter` in NumPy where the audio is decoded), interleaved by time, then
:class:`~worker.media.records.MediaInfo` and :class:`~worker.media.records.DecodeStats`; or a typed
:class:`~worker.errors.TagstreamError`. ``VideoSource.open(request)`` (:mod:`.source`) decodes in the
calling thread, ``DecodePool.open(request)`` (:mod:`.isolation`) in a supervised decoder process
(:mod:`.decoder_child`, framing in :mod:`.wire`, frames through the shared memory of
:mod:`.frame_slots`); both yield the same records. Around them: :mod:`.open`
(allow-lists, timeouts, redirects, typed errors), :mod:`.uri_policy` (which URIs a job may name),
:mod:`.sampling` (targets and the decode plan), :mod:`.audio`, :mod:`.rgb` (frame conversion) and
:mod:`.probe` (``tagstream probe``). Nothing here imports torch, rq or, except the probe command, the
settings module; of model/ only :mod:`model.log_mel` (NumPy).
"""
