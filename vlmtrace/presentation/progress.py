"""Progress bars for long work that say what they sweep, off when asked (tests, library loops).

The engine opens a bar per sweep ("patching shapes-llava"); only the caller knows which part
of an experiment that sweep is. A recipe names it for every bar opened inside a block:

    with sweeping("multi_constraint: visual constraint, replace span, probability"):
        vt.patch(...)      # bar: "multi_constraint: visual constraint, ... | patching shapes-llava"
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column

BAR_WIDTH = 20
"""Characters of the bar itself: enough to see it move, little enough to leave the title room."""

_part: ContextVar[str] = ContextVar("vlmtrace_progress_part", default="")


@contextmanager
def sweeping(part: str) -> Iterator[None]:
    """Name the part of an experiment that the bars opened inside this block belong to."""
    token = _part.set(part)
    try:
        yield
    finally:
        _part.reset(token)


class _Silent:
    """A stand-in with Progress's two methods that the engine uses, doing nothing."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass


def title_of(title: str) -> str:
    """`title`, prefixed with the part of the experiment being swept, if one is named."""
    part = _part.get()
    return f"{part} | {title}" if part else title


@contextmanager
def progress_bar(enabled: bool, title: str) -> Iterator[Progress | _Silent]:
    """A rich progress bar titled `title` (and the part being swept), or a silent one."""
    if not enabled:
        yield _Silent()
        return
    # The title takes the width left over and is cut with "…": the count and the time left are what
    # a user waits on, so they keep their place at any terminal width (a long title pushed them off).
    columns = (
        TextColumn(
            f"[bold]{escape(title_of(title))}[/] {{task.description}}",
            table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis", min_width=8),
        ),
        BarColumn(bar_width=BAR_WIDTH),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TimeRemainingColumn(table_column=Column(no_wrap=True)),
    )
    with Progress(*columns, transient=False, expand=True) as bar:
        yield bar


def escape(text: str) -> str:
    """Text shown as written, not read as rich markup ("[visual]" would vanish)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text).replace("{", "{{").replace("}", "}}")
