"""The ``actsparse`` command line: the run options and config settings declared once
(``options``), the commands (``commands``) and what they print (``output``)."""

from actsparse.cli.commands import app, main

__all__ = ["app", "main"]
