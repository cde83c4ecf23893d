"""The ``reptok`` Typer app. Each command module registers itself on ``common.app``."""

from __future__ import annotations

import importlib

from .common import app

# One module per command group; importing a module registers its commands.
COMMAND_MODULES = [
    "info",
    "data",
    "train",
    "distill",  # registers into the train group
    "tokens",
    "sample",
    "quickstart",
    "convert",
    "export",
    "bench",
    "eval",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"reptok_cli.{_name}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
