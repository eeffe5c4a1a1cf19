"""What the user sees while a run works: one-line messages and progress on stderr (stdout stays
clean for --json). On a terminal progress is a live bar; elsewhere (CI logs, pipes) a bar would
only be drawn at the end, so plain lines are printed instead: at most one every PLAIN_EVERY seconds
(so an epoch longer than that always gets one), and one when the loop ends."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PLAIN_EVERY = 10.0  # seconds between two plain progress lines


def _fields(fields: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PlainProgress:
    """Progress as log lines, rate-limited; `clock` is injectable for tests."""

    def __init__(self, write: Callable[[str], None], description: str, total: int, per_epoch: int = 0,
                 every: float = PLAIN_EVERY, clock: Callable[[], float] = time.monotonic):
        self.write, self.description, self.total, self.per_epoch = write, description, total, per_epoch
        self.every, self.clock = every, clock
        self.start = self.last = clock()
        self.done = 0
        self.fields: dict = {}

    def _where(self) -> str:
        text = f"step {self.done}/{self.total}"
        if self.per_epoch:
            epochs = -(-self.total // self.per_epoch)
            text += f", epoch {min(epochs, self.done // self.per_epoch + 1)}/{epochs}"
        return text

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields = fields
        now = self.clock()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done)
            info = _fields(fields)
            self.write(f"{self.description}: {self._where()}{', ' + info if info else ''}, "
                       f"elapsed {_duration(elapsed)}, ETA {_duration(eta)}")

    def close(self) -> None:
        info = _fields(self.fields)
        epochs = -(-self.done // self.per_epoch) if self.per_epoch else 0
        where = f" ({epochs} epoch{'s' if epochs != 1 else ''})" if epochs else ""
        self.write(f"{self.description}: done, {self.done} steps{where}{', ' + info if info else ''}, "
                   f"{_duration(self.clock() - self.start)}")


class UI:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False)

    def log(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg, markup=False, soft_wrap=True)  # one line each, also in an 80-column log

    def error(self, msg: str) -> None:
        # One line, however narrow the terminal and whatever the message quotes (scripts grep it).
        msg = " ".join(line.strip() for line in str(msg).splitlines() if line.strip())
        self.console.print(f"error: {msg}", markup=False, style="bold red", soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: int, per_epoch: int = 0):
        """Yields advance(n=1, **fields); fields show after the bar (e.g. loss=0.12). per_epoch: steps
        in one epoch, so plain lines can say which epoch they are in."""
        if self.quiet or total <= 0:
            yield lambda n=1, **kw: None
            return
        if not self.console.is_terminal:
            plain = PlainProgress(lambda line: self.console.print(line, markup=False, soft_wrap=True), description,
                                  total, per_epoch)
            yield plain.advance
            plain.close()
            return
        with Progress(TextColumn("  {task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                      transient=False) as bar:
            task = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, **fields):
                bar.update(task, advance=n, info=_fields(fields))

            yield advance


SILENT = UI(quiet=True)
