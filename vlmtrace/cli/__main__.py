"""`python -m vlmtrace.cli`: the `vlmtrace` command without its console script."""

from . import app

app(prog_name="vlmtrace")
