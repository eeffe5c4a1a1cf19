"""What the user sees while a run works: one-line messages and progress bars on stderr
(stdout stays clean for --json)."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class UI:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False)

    def log(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg, markup=False)

    def error(self, msg: str) -> None:
        # One line, however narrow the terminal and whatever the message quotes (scripts grep it).
        msg = " ".join(line.strip() for line in str(msg).splitlines() if line.strip())
        self.console.print(f"error: {msg}", markup=False, style="bold red", soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: int):
        """Yields advance(n=1, **fields); fields show after the bar (e.g. loss=0.12)."""
        if self.quiet or total <= 0:
            yield lambda n=1, **kw: None
            return
        with Progress(TextColumn("  {task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                      transient=False) as bar:
            task = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, **fields):
                info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
                bar.update(task, advance=n, info=info)

            yield advance


SILENT = UI(quiet=True)
