"""The ``tagstream`` command.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen module is imported, so ``tagstream enqueue`` does not load torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "probe": ("worker.probe", "Decode a file or URL and print what the decoder did, as JSON."),
    "tag": ("worker.tag_file", "Tag one local file without Redis; print the result document."),
    "extract": ("worker.extract", "Extract features for a folder of videos described by a TSV."),
    "dataset": ("model.synth", "Generated data sets: 'tagstream dataset synth OUT_DIR'."),
    "train": ("model.train", "Train the fusion model on a feature store or MultimodalVideoTag folder."),
    "evaluate": ("model.evaluate", "Evaluate a checkpoint: Hit@k, GAP@20, mAP as JSON."),
    "enqueue": ("worker.client", "Enqueue a video for tagging."),
    "status": ("worker.client_status", "Show a video's job state and result."),
    "worker": ("worker.runner", "Run a tagging worker; --gpus all runs one per visible GPU."),
    "demo": ("worker.demo", "Start Redis if none is configured, tag sample videos with a worker, print tags."),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: tagstream COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "tagstream COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        stream = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        print(_usage(), file=stream)
        return 0 if stream is sys.stdout else 2
    name = argv[0]
    module_name, description = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"tagstream {name}", description=description)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(
        level=getattr(args, "log_level", None) or "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
