"""The ``reptok`` command line (Typer). Thin: parse, call the ``reptok`` package, print."""
