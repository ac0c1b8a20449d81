"""The errors the ``tagstream`` command reports in one line, and their exit codes.

A command raises :class:`UsageError` (exit 2: a setting, flag or argument is wrong; argparse uses 2
too) or :class:`ServiceUnavailable` (exit 69, ``EX_UNAVAILABLE`` from sysexits: a service such as
Redis does not answer). :func:`explain` turns those, pydantic's ``ValidationError`` (a setting),
a command's :class:`model.errors.InputError` (a folder, checkpoint or output it cannot use; exit 2, as is a
missing file and a refused pickle), redis' connection errors and any other exception into the line :func:`worker.cli.main` prints and
its exit code. Any other exception is an internal error (exit 70, ``EX_SOFTWARE``), still one line,
with a pointer to ``--debug`` for the traceback. Exit status 1 stays what each command makes it (e.g.
``status`` for an unknown video, ``probe`` on bad input). Every line goes through :func:`redact`, so a
password inside a URL is never printed.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pydantic

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE
EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE

# scheme://USERINFO@ where USERINFO may hold a password (user:password, or :password)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/@]*)@")
_SENTINEL_PASSWORD = re.compile(r"(?P<key>[?&]sentinel_password=)[^&\s]*")


class CliError(Exception):
    """An error the CLI reports as one line: ``message`` (and ``setting``/``value`` when a setting is at
    fault) with ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str, *, setting: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.setting = setting
        self.value = value


class UsageError(CliError):
    """A wrong setting, flag or argument (exit 2). ``setting`` is a Settings field name (the line names
    its flag or environment variable, whichever was given) or a free-form name such as ``--gpus``."""

    exit_code = EXIT_USAGE


class ServiceUnavailable(CliError):
    """A service the command needs (Redis) does not answer (exit 69)."""

    exit_code = EXIT_UNAVAILABLE


def redact(text: str) -> str:
    """``text`` with the user info of every URL in it masked: ``redis://user:pw@h`` becomes
    ``redis://user:***@h`` and ``redis://pw@h`` becomes ``redis://***@h`` (a lone user info is treated
    as a possible password, since people write the password there by mistake). A ``redis+sentinel://``
    URL's ``sentinel_password=`` query value is masked too."""

    def mask(match: re.Match[str]) -> str:
        user, sep, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user + ':***' if sep else '***'}@"

    return _SENTINEL_PASSWORD.sub(r"\g<key>***", _USERINFO.sub(mask, text))


def setting_source(name: str, args: argparse.Namespace | None) -> str:
    """How the user gave the Settings field ``name``: its flag when given on the command line, else its
    ``TAGSTREAM_*`` variable when set, else the flag (the default was used). A name that is not a field
    (``--gpus``, ``VIDEO_ID``) is returned as it is."""
    # config, pydantic and redis are imported where an error is explained, not when worker.cli starts:
    # each takes 0.1-0.3 s to import, which `tagstream --help` and `--version` need not pay.
    from worker.config import Settings

    if name not in Settings.model_fields:
        return name
    flag = "--" + name.replace("_", "-")
    if args is not None and getattr(args, f"setting_{name}", None) is not None:
        return flag
    env = f"TAGSTREAM_{name.upper()}"
    return env if env in os.environ else flag


def _setting_line(setting: str | None, value: object, message: str, args: argparse.Namespace | None) -> str:
    if setting is None:
        return message
    where = setting_source(setting, args)
    return f"{where} {value!r}: {message}" if value is not None else f"{where}: {message}"


def _validation_line(exc: pydantic.ValidationError, args: argparse.Namespace | None) -> str:
    """One clause per pydantic error, '; '-joined: ``--concurrency 'abc': input should be a valid
    integer``. A validator's own ValueError text is used without pydantic's 'Value error, ' prefix."""
    parts = []
    for error in exc.errors():
        message = str(error.get("ctx", {}).get("error", "")) if error.get("type") == "value_error" else ""
        message = message or str(error.get("msg", "invalid"))
        message = message[:1].lower() + message[1:]
        loc = error.get("loc") or ()
        field = str(loc[0]) if loc else None
        parts.append(_setting_line(field, error.get("input"), message, args))
    return "; ".join(parts) or str(exc)


def explain(exc: BaseException, args: argparse.Namespace | None = None) -> tuple[str, int]:
    """The line (without the ``tagstream: `` prefix) and exit code for ``exc``; ``args`` (the parsed
    command line, when parsing got that far) tells whether a setting came from a flag or the
    environment. Redis errors not already turned into a :class:`CliError` by the command (the command
    checks the connection first) are reported with redis' own text, which names the server."""
    import pydantic  # see setting_source
    import redis

    from model.errors import InputError
    from model.safe_pickle import UnsafePickleError  # imports numpy: only when a command has failed

    if isinstance(exc, CliError):
        line, code = "error: " + _setting_line(exc.setting, exc.value, exc.message, args), exc.exit_code
    elif isinstance(exc, pydantic.ValidationError):
        line, code = "error: " + _validation_line(exc, args), EXIT_USAGE
    elif isinstance(exc, InputError | UnsafePickleError | FileNotFoundError):  # what the user pointed the command at
        line, code = f"error: {exc}", EXIT_USAGE
    elif isinstance(exc, redis.AuthenticationError):  # a ConnectionError subclass, but a setting is wrong
        line = f"error: Redis refused the credentials ({exc}); check the user and password in the Redis URL"
        code = EXIT_USAGE
    elif isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        line = f"error: Redis is unavailable ({exc}); start it or set TAGSTREAM_REDIS_URL"
        code = EXIT_UNAVAILABLE
    else:
        line = f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"
        code = EXIT_INTERNAL
    return redact(" ".join(line.split())), code
