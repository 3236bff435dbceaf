"""A run's progress as people watch it: a live bar in a terminal, one line per step elsewhere.

`RunProgress` turns a run's events (``metrics.jsonl`` lines, `fedlora.run`'s ``on_event``)
into what the CLI and the Python API show. In a terminal it is a rich progress bar; in
Jupyter, a log file or a pipe, where a live bar would not redraw, it prints one line per
round (and per phase), so a notebook cell shows the run as it goes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

__all__ = ["RunProgress", "figures", "pct"]

# How much of a client's error reason a progress line shows (the whole is in metrics.jsonl).
_REASON_CHARS = 200


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal; '-' where it was not measured."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def figures(event: dict[str, Any]) -> str:
    """A round's headline figures: perplexity for language models, else accuracy."""
    glob, personal = event.get("global_perplexity"), event.get("personalized_perplexity")
    if isinstance(glob, float) and not math.isnan(glob):
        shown = f"{personal:.1f}" if isinstance(personal, float) and not math.isnan(personal) else "-"
        return f"perplexity global {glob:.1f}  personalized {shown}"
    glob, personal = event.get("global_accuracy"), event.get("personalized_accuracy")
    return f"global {pct(glob)}  personalized {pct(personal)}"


class RunProgress:
    """A context manager that shows one run's progress; call it with each event.

    Parameters
    ----------
    total_rounds : int
        The run's federated rounds.
    title : str
        What the run is (a sweep names its runs: ``"run 2/6 fedavg/dual seed 0"``).
    live : bool, optional
        A live bar (default: when standard output is a terminal and not Jupyter's).
    then : callable, optional
        Also called with every event (the caller's own ``on_event``).

    """

    def __init__(
        self,
        total_rounds: int,
        *,
        title: str = "",
        live: bool | None = None,
        then: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.total = total_rounds
        self.title = title
        self.then = then
        console = Console()
        self.live = (console.is_terminal and not console.is_jupyter) if live is None else live
        self.started = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=console,
                transient=False,
            )
            self._task = self._bar.add_task(self._described("starting Flower"), total=total_rounds, status="")

    def __enter__(self) -> RunProgress:
        if self._bar is not None:
            self._bar.start()
        else:
            self._line("starting Flower")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        """Show one event, then pass it on."""
        kind = event.get("event")
        if kind == "start":
            self._show("federated rounds")
        elif kind == "round":
            self._show("federated rounds", completed=event["round"], status=figures(event))
        elif kind == "local-only":
            self._show("local-only baseline", status=f"{event['steps']} steps per client")
        elif kind == "responses":
            self._show(
                "side-by-side replies",
                status=f"{event['clients']} clients x {event['per_client']} held-out prompts",
            )
        elif kind == "client-error":
            self._note(
                f"client error (round {event['round']}, node {event['node']}): "
                f"{str(event['reason'])[:_REASON_CHARS]}"
            )
        if self.then is not None:
            self.then(event)

    def _described(self, phase: str) -> str:
        return f"{self.title}: {phase}" if self.title else phase

    def _show(self, phase: str, *, completed: int | None = None, status: str = "") -> None:
        if self._bar is not None and self._task is not None:
            fields: dict[str, Any] = {"description": self._described(phase), "status": status}
            if completed is not None:
                fields["completed"] = completed
            self._bar.update(self._task, **fields)
            return
        if completed is not None:
            self._line(f"round {completed}/{self.total}  {status}")
        elif phase != "federated rounds":
            self._line(f"{phase}{f'  {status}' if status else ''}")

    def _note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(f"[yellow]{text}")
        else:
            self._line(text)

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"{self._described(text)}  ({elapsed:.0f} s)", file=sys.stdout, flush=True)
