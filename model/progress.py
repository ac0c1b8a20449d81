"""Progress reporting that suits where the output goes: a tqdm bar on a terminal, log lines otherwise.

A tqdm bar redraws itself with carriage returns, which in a log file or a container log is one
ever-growing line of garbage. :class:`Progress` therefore draws a bar only when its stream (stderr by
default) is a terminal; otherwise it logs a plain line (``synth: 120/2000 video (6%), 3.1 video/s,
eta 10m07s``) at most every ``every_s`` seconds and, unless ``leave=False``, one at the end. Disabled
(``--no-progress``) it does neither.

:func:`quiet_model_libraries` keeps transformers' own progress bars (the weight-loading bar) and its
private stderr handler out of logs. Used by the ``model`` commands and by ``worker``; imports nothing
of ``worker``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

_log = logging.getLogger(__name__)


def is_terminal(stream: Any) -> bool:
    """True when ``stream`` is an open terminal (``isatty()``); False for files, pipes, StringIO."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Progress over ``total`` items (None: unknown). ``update(n)`` after each item or chunk,
    ``set_postfix(key=value)`` for extra figures, ``close()`` (or use it as a context manager, or
    iterate with :meth:`iterate`).

    On a terminal ``stream``: a tqdm bar on it. Otherwise: a log line through ``logger`` at INFO when
    ``every_s`` seconds have passed since the last line (checked at each update; ``every_s=0`` logs
    every update), plus a final line at :meth:`close` when ``leave`` is true."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "it",
        enabled: bool = True,
        stream: IO[str] | None = None,
        logger: logging.Logger | None = None,
        every_s: float = 10.0,
        leave: bool = True,
    ) -> None:
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.every_s = every_s
        self.logger = logger or _log
        self.count = 0
        self.postfix: dict[str, Any] = {}
        self._started = self._last_line = time.monotonic()
        self._closed = False
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if enabled and is_terminal(stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=leave)
        self.lines = enabled and self.bar is None

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self._last_line >= self.every_s:
            self._line()

    def set_postfix(self, **fields: Any) -> None:
        self.postfix.update(fields)
        if self.bar is not None:
            self.bar.set_postfix(**self.postfix)

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting one update after each; closes when exhausted or abandoned."""
        try:
            for item in items:
                yield item
                self.update()
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.leave:
            self._line(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        self._last_line = now
        elapsed = now - self._started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = f"{self.count}/{self.total}" if self.total is not None else str(self.count)
        parts = [f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.count / self.total:.0f}%)"
        if final:
            parts.append(f"done in {_duration(elapsed)}")
        else:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total is not None and rate > 0:
                parts.append(f"eta {_duration((self.total - self.count) / rate)}")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        self.logger.info("%s: %s", self.desc, ", ".join(parts))


def quiet_model_libraries(stream: IO[str] | None = None) -> None:
    """Keep transformers out of logs: its progress bars (the "Loading weights" bar) are turned off
    unless ``stream`` (default stderr) is a terminal, and its records go to the application's handlers
    (propagation to the root logger, its own plain stderr handler removed), so a JSON log stays JSON.
    Imports ``transformers.utils.logging``; call it where models are loaded."""
    from transformers.utils import logging as transformers_logging

    if not is_terminal(stream if stream is not None else sys.stderr):
        transformers_logging.disable_progress_bar()  # also huggingface_hub's bars
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
