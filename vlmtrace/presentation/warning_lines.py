"""Warnings as a command shows them: each one once, and vlmtrace's own in one line.

A recipe runs several sweeps over the same samples (a data check, then one sweep per corruption
and site), and each sweep re-encodes every answer, so the same "answer 'tennis' is 6 tokens"
warning came once per sweep, from a different line each time, which Python's "default" action
counts as a new warning. A command shows each (category, message) once:

    with each_warning_once():
        run_the_command()

Only what is shown changes: filters still decide (`-W error` still raises, "ignore" still hides).
vlmtrace's warnings say what happened and what to do, so they are printed as one line,
"Warning (AnswerTokenWarning): ...", without the source line of the call that raised them.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def each_warning_once() -> Iterator[None]:
    """Show each distinct warning once inside the block (see the module docstring)."""
    shown: set[tuple[type, str]] = set()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        key = (category, str(message))
        if key in shown:
            return
        shown.add(key)
        if category.__module__.split(".")[0] == "vlmtrace":
            stream = file if file is not None else sys.stderr
            try:
                stream.write(f"Warning ({category.__name__}): {message}\n")
            except OSError:  # a closed stderr must not turn a warning into a failure
                pass
            return
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
