"""How a training job's progress looks on a console: the CLI's and the demo's view.

The job (:mod:`step_infra.train.job.launcher`) only reports :class:`JobEvent` objects; this
module renders them, and while the trainers run it also tails ``events.jsonl`` so that the
controller's detections, evictions, restarts and checkpoints appear as they happen.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from step_infra.telemetry.events import read_events
from step_infra.train.job.launcher import JobEvent

STYLE = {"warning": "yellow", "error": "red", "done": "green"}


class EventTail(threading.Thread):
    """Prints the controller's and launcher's events from ``events.jsonl`` while the job runs."""

    SHOWN = (
        "detection",
        "eviction",
        "spare_activated",
        "restart",
        "join",
        "recovered",
        "fault_injected",
        "hang",
    )
    KEEP = ("node", "step", "generation", "resume_step", "reason", "kind", "pid")

    def __init__(self, run_dir: Path, console: Console) -> None:
        super().__init__(daemon=True, name="event-tail")
        self.run_dir, self.console = run_dir, console
        self.stop = threading.Event()
        self._seen = len(read_events(run_dir))
        self._last_step = -1

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.flush()

    def flush(self) -> None:
        events = read_events(self.run_dir)
        for ev in events[self._seen :]:
            kind = ev["event"]
            if kind == "checkpoint" and int(ev.get("step", -1)) > self._last_step:
                self._last_step = int(ev["step"])
                self.console.print(f"  checkpoint  step {ev['step']} durable")
            elif kind in self.SHOWN:
                detail = ", ".join(f"{k}={ev[k]}" for k in self.KEEP if k in ev)
                self.console.print(f"  [bold]{kind:<11}[/] {escape(detail)}")
        self._seen = len(events)


class JobProgressPrinter:
    """An ``on_event`` sink for :class:`~step_infra.train.job.launcher.TrainingJob`."""

    def __init__(self, console: Console, run_dir: Path) -> None:
        self.console = console
        self.run_dir = Path(run_dir)
        self._tail: EventTail | None = None

    def __call__(self, event: JobEvent) -> None:
        if event.phase == "train" and event.kind == "start":
            self._start_tail()
        if event.phase == "train" and event.kind in ("done", "error"):
            self._stop_tail()
        style = STYLE.get(event.kind)
        text = escape(event.message)
        indent = "" if event.kind == "start" else "  "
        self.console.print(f"{indent}[{style}]{text}[/]" if style else f"{indent}{text}")

    def _start_tail(self) -> None:
        self._stop_tail()
        self._tail = EventTail(self.run_dir, self.console)
        self._tail.start()

    def _stop_tail(self) -> None:
        if self._tail is not None:
            self._tail.stop.set()
            self._tail.join(timeout=2)
            self._tail.flush()
            self._tail = None
