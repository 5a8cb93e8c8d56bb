"""One base class for the mistakes a user can make, so the CLI can tell them from bugs.

A wrong path, a span that is not in the prompt or a model without an adapter is the user's
to fix: the command line prints such an error as one short paragraph (what was expected,
what came, what to do) and exits 2. Anything else is a bug in vlmtrace or a library and keeps
its traceback.

    try:
        vt.patch(vlm, samples, corruption=vt.ReplaceSpan("visual"))
    except vt.UserError as error:        # DatasetError, CorruptionError, GridError, ...
        print(error)

Every user-facing error subclasses both `UserError` and `ValueError`, so code that caught
`ValueError` before keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names what was expected, what came and what to do."""
