"""The ``tagstream`` command.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen module is imported, so ``tagstream enqueue`` does not load torch.

Errors: an exception that leaves a command is printed as ONE line on stderr (``tagstream: error: ...``
or ``tagstream: internal error: ...``) and becomes the exit status: 2 for a usage or configuration
error (as argparse's own errors), 69 when Redis is unavailable, 70 for anything unexpected (see
:mod:`worker.cli_errors`, the one place that decides). 1 stays what each command makes it. ``--debug``
anywhere in the command line, or log level DEBUG (``TAGSTREAM_LOG_LEVEL`` / ``--log-level``), prints
the traceback instead of the line (same exit status).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import traceback

from worker.cli_errors import EXIT_USAGE, UsageError, explain
from worker.logs import FORMATS, configure_logging, logging_options

COMMANDS: dict[str, tuple[str, str]] = {
    "probe": ("worker.media.probe", "Decode a file or URL and print what the decoder did, as JSON."),
    "tag": ("worker.tools.tag_file", "Tag one local file without Redis; print the result document."),
    "extract": ("worker.tools.extract", "Extract features for a folder of videos described by a TSV."),
    "dataset": ("model.synth", "Generated data sets: 'tagstream dataset synth OUT_DIR'."),
    "train": ("model.train", "Train the fusion model on a feature store or MultimodalVideoTag folder."),
    "evaluate": ("model.evaluate", "Evaluate a checkpoint: Hit@k, GAP@20, mAP as JSON."),
    "enqueue": ("worker.jobs.enqueue", "Enqueue a video for tagging."),
    "status": ("worker.jobs.status", "Show a video's job state and result."),
    "worker": ("worker.service.run", "Run a tagging worker; --gpus all runs one (--workers-per-gpu N: N) per visible GPU."),
    "demo": ("worker.tools.demo", "Start Redis if none is configured, tag sample videos with a worker, print tags."),
    "doctor": ("worker.service.doctor", "Check this host: versions, lock, device, Redis, policy, CPU budget."),
    "predict": ("worker.tools.predict", "Tag a feature store, MultimodalVideoTag folder or folder of videos: JSON Lines or MVT's JSON."),
}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: tagstream [--debug] [--version] COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "tagstream COMMAND --help shows a command's options; --debug (anywhere) shows tracebacks.",
              "Exit status: 0 ok, 1 the command's own failure, 2 usage or configuration error,",
              "69 Redis unavailable, 70 internal error."]  # fmt: skip
    return "\n".join(lines)


def version() -> str:
    """The installed distribution's version (importlib.metadata), ``unknown`` when not installed."""
    try:
        return importlib.metadata.version("tagstream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there. ``--debug`` is global: it may stand
    anywhere before a ``--`` (after one it is an ordinary argument and stays)."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [arg for arg in argv[:end] if arg != "--debug"]
    return head + argv[end:], len(head) < end


def log_options(args: argparse.Namespace | None) -> tuple[str, str]:
    """(level, format) of the command's logging (:func:`worker.logs.logging_options`: its flags, else
    ``TAGSTREAM_LOG_LEVEL`` / ``TAGSTREAM_LOG_FORMAT``), the level upper-cased; :class:`UsageError` for a
    level other than DEBUG, INFO, WARNING or ERROR, or a format other than text or json."""
    level, fmt = logging_options(args)
    if level.strip().upper() not in LOG_LEVELS:
        raise UsageError("expected DEBUG, INFO, WARNING or ERROR", setting="log_level", value=level)
    if fmt not in FORMATS:
        raise UsageError(f"expected {' or '.join(FORMATS)}", setting="log_format", value=fmt)
    return level.strip().upper(), fmt


def _debug_level(args: argparse.Namespace | None) -> bool:
    try:
        return log_options(args)[0] == "DEBUG"
    except UsageError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Run one ``tagstream`` command and return its exit status.

    As the program (``argv`` None: the ``tagstream`` script, ``python -m worker.cli``), an exception from
    the command is printed as one line and mapped to an exit status by :func:`worker.cli_errors.explain`,
    or with ``--debug``/log level DEBUG printed as a traceback with the same status. Called from Python
    with an explicit ``argv`` (tests, scripts), exceptions propagate to the caller as from any function.
    """
    as_program = argv is None
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    if argv[0] == "--version":
        print(f"tagstream {version()}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"tagstream: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    name = argv[0]
    args = None
    try:
        module_name, description = COMMANDS[name]
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"tagstream {name}", description=description)
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        configure_logging(*log_options(args))
        return int(module.run(args) or 0)
    except Exception as exc:
        if not as_program:
            raise
        line, code = explain(exc, args)
        if debug or _debug_level(args):
            traceback.print_exc()
        else:
            print(f"tagstream: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
