"""Progress bars for long work, off when asked (tests, library use inside other loops)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class _Silent:
    """A stand-in with Progress's two methods that the engine uses, doing nothing."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass


@contextmanager
def progress_bar(enabled: bool, title: str) -> Iterator[Progress | _Silent]:
    """A rich progress bar titled `title`, or a silent one."""
    if not enabled:
        yield _Silent()
        return
    columns = (
        TextColumn(f"[bold]{title}[/] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        yield bar
