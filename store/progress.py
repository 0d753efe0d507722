"""Progress of long steps: a tqdm bar on a terminal, plain lines otherwise, or a callback.

Library loops (folds, runs, genes, datasets, batches) report through :func:`progress` or
:func:`track`; where the report goes is chosen by the caller, not by the loop:

- by default it goes to **stderr** (never stdout, which carries tables and JSON): a tqdm bar
  when stderr is a terminal, else plain lines such as ``evaluate: 3/10 folds (30%)`` at every
  tenth of the way and a final ``evaluate: 10/10 folds (100%) in 4.2 s``; both only once the
  loop has run :data:`DELAY_S` seconds, so quick steps (and quick failures) print nothing;
- :func:`configure` ``(enabled=False)`` silences it (``scdrugmap --quiet``);
- inside :func:`report_to` it goes to a callback ``(fraction, text)`` instead (the web page's
  jobs record it and show it on their status).

Loops nest: a loop started while another runs is its child, and the fraction a callback gets
covers the whole outer loop (``(done + child fraction) / total``). The state is a
:class:`contextvars.ContextVar`, so each thread (each web job) has its own.

Only the standard library is imported here (tqdm when a bar is drawn), so the command layer can
import this module without loading torch or scanpy.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "Sink", "configure", "enabled", "progress", "report_to", "track"]

T = TypeVar("T")

#: ``callback(fraction, text)``: fraction of the outermost loop done (0–1), what runs now.
Sink = Callable[[float, str], None]

_ENABLED = True
_SINK: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("scdrugmap_progress_sink", default=None)
_STACK: contextvars.ContextVar[tuple[Progress, ...]] = contextvars.ContextVar(
    "scdrugmap_progress_stack", default=()
)
#: plain lines: one at every ``1 / LINE_STEPS`` of the way (and the final one).
LINE_STEPS = 10
#: plain lines of a loop of unknown length: at most one every this many seconds.
LINE_SECONDS = 5.0
#: seconds a loop runs before anything is shown on stderr (quick steps and quick failures stay quiet).
DELAY_S = 2.0


def configure(*, enabled: bool) -> None:
    """Show (``True``) or hide (``False``) progress on stderr in this process.

    A :func:`report_to` callback still receives progress when hidden.
    """
    global _ENABLED
    _ENABLED = bool(enabled)


def enabled() -> bool:
    """Whether progress is shown on stderr in this process (``False`` after ``scdrugmap --quiet``)."""
    return _ENABLED


@contextlib.contextmanager
def report_to(sink: Sink) -> Iterator[None]:
    """Send the progress of loops run inside the block to ``sink`` instead of stderr.

    Parameters
    ----------
    sink
        ``sink(fraction, text)``: fraction (0–1) of the outermost loop done and a line saying
        what runs, e.g. ``"predict 2/4 steps: scoring › cells 1/3 batches"``. Called on every
        step; it must be quick and must not raise.
    """
    token = _SINK.set(sink)
    stack = _STACK.set(())
    try:
        yield
    finally:
        _STACK.reset(stack)
        _SINK.reset(token)


class Progress:
    """One loop's progress (use :func:`progress` or :func:`track` rather than this class).

    Parameters
    ----------
    label
        What runs, e.g. ``"evaluate"`` (the start of each line and the bar's title).
    total
        Steps expected (``None``: unknown; lines then report counts only).
    unit
        What a step is, plural (``"folds"``, ``"genes"``).
    """

    def __init__(self, label: str, total: int | None, *, unit: str = "steps") -> None:
        self.label, self.total, self.unit = label, (None if total is None else int(total)), unit
        self.done = 0
        self.stage = ""
        self._t0 = time.perf_counter()
        self._next_line = 1
        self._sink = _SINK.get()
        self._bar: Any = None
        self._token: contextvars.Token | None = None
        self._closed = False
        self._depth = 0
        self._last_line = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        stack = _STACK.get()
        self._depth = len(stack)
        self._token = _STACK.set((*stack, self))
        if self._sink is None and _ENABLED and _isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.label, unit=self.unit.rstrip("s") or "it",
                             leave=self._depth == 0, position=self._depth, file=sys.stderr,
                             delay=DELAY_S)  # fmt: skip
        self._emit()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(final=exc[0] is None)

    def close(self, *, final: bool = True) -> None:
        """Finish: the bar closes; plain lines end with one summary line (when it completed)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._sink is None and _ENABLED and final:
            elapsed = time.perf_counter() - self._t0
            if self._last_line or elapsed >= DELAY_S:
                _line(f"{self.label}: {self._count()} in {elapsed:.1f} s")
        if self._token is not None:
            with contextlib.suppress(ValueError):  # closed in another context: leave the stack alone
                _STACK.reset(self._token)
        if self._sink is not None and final and self._depth == 0:
            self._sink(1.0, f"{self.label}: done")

    # -- steps -------------------------------------------------------------------------------
    def update(self, n: int = 1, *, stage: str | None = None) -> None:
        """``n`` more steps done; ``stage`` says what runs next (none: the last stage is cleared)."""
        self.done += n
        if stage is not None or n:
            self.stage = stage or ""
        if self._bar is not None:
            self._bar.update(n)
            if stage is not None:
                self._bar.set_postfix_str(stage, refresh=False)
        self._emit()

    def set_stage(self, stage: str) -> None:
        """Say what runs now without counting a step."""
        self.update(0, stage=stage)

    def fraction(self) -> float:
        """Fraction done, counting the running child loop's fraction (0 when the total is unknown)."""
        if not self.total:
            return 0.0
        stack = _STACK.get()
        child = 0.0
        if self in stack and stack.index(self) + 1 < len(stack):
            child = stack[stack.index(self) + 1].fraction()
        return max(0.0, min(1.0, (self.done + child) / self.total))

    # -- output ------------------------------------------------------------------------------
    def _count(self) -> str:
        if self.total is None:
            return f"{self.done} {self.unit}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.done}/{self.total} {self.unit}{pct}"

    def _emit(self) -> None:
        if self._sink is not None:
            stack = _STACK.get()
            top = stack[0] if stack else self
            text = " › ".join(
                f"{p.label} {p.done}/{p.total if p.total is not None else '?'} {p.unit}"
                + (f": {p.stage}" if p.stage else "")
                for p in (stack or (self,))
            )
            self._sink(top.fraction(), text)
            return
        if self._bar is not None or not _ENABLED or self.done == 0:
            return
        if time.perf_counter() - self._t0 < DELAY_S:
            return
        if self.total:
            mark = self.done * LINE_STEPS // self.total
            if mark < self._next_line or self.done >= self.total:
                return  # the final line comes from close()
            self._next_line = mark + 1
        elif self._last_line and time.perf_counter() - self._last_line < LINE_SECONDS:
            return
        self._last_line = time.perf_counter()
        stage = f" – {self.stage}" if self.stage else ""
        _line(f"{self.label}: {self._count()}{stage}")


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def progress(label: str, total: int | None, *, unit: str = "steps") -> Progress:
    """A progress context for a loop of ``total`` steps; call ``.update()`` after each.

    Examples
    --------
    >>> with progress("evaluate", 5, unit="folds") as p:  # doctest: +SKIP
    ...     for f in range(5):
    ...         fit(f)
    ...         p.update()
    """
    return Progress(label, total, unit=unit)


def track(
    items: Iterable[T], label: str, *, total: int | None = None, unit: str = "steps",
    stage: Callable[[T], str] | None = None,
) -> Iterator[T]:  # fmt: skip
    """Iterate ``items``, counting a step after each item's body has run.

    Parameters
    ----------
    items
        The loop's items.
    label, unit
        As :func:`progress`.
    total
        Steps (default ``len(items)`` when it has one).
    stage
        ``stage(item)``: text saying what the item is (shown while it runs).
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(label, total, unit=unit) as p:
        for item in items:
            if stage is not None:
                p.set_stage(stage(item))
            yield item
            p.update()
