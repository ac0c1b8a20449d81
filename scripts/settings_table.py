"""Print the README's configuration table, generated from ``worker.config.Settings``.

One row per settings field: name, environment variable (``TAGSTREAM_<NAME>``), CLI flag (``--name``),
default and description (the field's ``description``; a ``Literal`` field also lists its choices).
The README holds the same table between ``<!-- settings-table:begin -->`` and
``<!-- settings-table:end -->``; ``tests/test_config.py`` fails when the two differ, so after adding or
changing a setting run::

    python scripts/settings_table.py --write README.md

Assumes only that ``worker.config`` imports (pydantic-settings installed); nothing else is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.config import Settings  # noqa: E402

BEGIN = "<!-- settings-table:begin -->"
END = "<!-- settings-table:end -->"


def _default(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, list):
        return f"`{','.join(map(str, value))}`" if value else '`""` (empty)'
    if isinstance(value, str) and not value:
        return '`""` (empty)'
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def table() -> str:
    """The markdown table (header, separator and one row per field), ending with a newline."""
    rows = [
        "| Setting | Environment variable | CLI flag | Default | Description |",
        "|---|---|---|---|---|",
    ]
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if info.annotation is bool:
            flag = f"{flag} / --no-{name.replace('_', '-')}"
        description = info.description or ""
        if get_origin(info.annotation) is Literal:
            description = f"{description} One of: {', '.join(map(str, get_args(info.annotation)))}.".strip()
        rows.append(
            f"| `{name}` | `TAGSTREAM_{name.upper()}` | `{flag}` | {_cell(_default(info.default))} "
            f"| {_cell(description)} |"
        )
    return "\n".join(rows) + "\n"


def embedded_table(text: str) -> str:
    """The table between the markers in ``text`` (without the marker lines); ValueError if absent."""
    try:
        start = text.index(BEGIN) + len(BEGIN)
        end = text.index(END, start)
    except ValueError:
        raise ValueError(f"markers {BEGIN} ... {END} not found") from None
    return text[start:end].strip("\n") + "\n"


def write(path: Path) -> bool:
    """Replace the table between the markers in ``path``; returns True when the file changed."""
    text = path.read_text(encoding="utf-8")
    old = embedded_table(text)
    if old == table():
        return False
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END, start)
    path.write_text(text[:start] + "\n" + table() + text[end:], encoding="utf-8")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", metavar="FILE", type=Path, help="update the table inside FILE instead of printing"
    )
    args = parser.parse_args()
    if args.write:
        changed = write(args.write)
        print(f"{args.write}: {'updated' if changed else 'already up to date'}")
    else:
        sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
