"""Thread states from ``perf sched``: when each thread ran, waited for a CPU (runnable) or slept, and who held each CPU.

``Recording`` runs ``perf sched record -a -k CLOCK_MONOTONIC`` for a while (the clock of Python's
``time.monotonic()``, so perf's timestamps line up with the ``/hello`` poller's); ``Timeline.load`` reads the
switch and wake-up events back through ``perf script``. Needs ``perf`` and the right to trace every CPU
(root, or ``kernel.perf_event_paranoid`` at -1).
"""

from __future__ import annotations

import bisect
import collections
import re
import shutil
import signal
import subprocess
from pathlib import Path

EVENT = re.compile(
    r"\s*(?P<comm>.+?)\s+(?P<tid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<time>[\d.]+):\s+sched:(?P<kind>\w+):\s+(?P<rest>.*)"
)
SWITCH = re.compile(
    r"prev_pid=(?P<prev>\d+) .*prev_state=(?P<state>\S+) ==> next_comm=(?P<comm>.+?) next_pid=(?P<next>\d+)"
)
WAKEUP = re.compile(r" pid=(?P<pid>\d+) ")


class Recording:
    """``perf sched record`` of the whole machine for ``seconds``, into ``path``."""

    def __init__(self, seconds: float, path: Path) -> None:
        self.path = path
        argv = ["perf", "sched", "record", "-a", "-k", "CLOCK_MONOTONIC", "-o", str(path), "--", "sleep", f"{seconds}"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> str | None:
        """End the recording now (perf writes its file on SIGINT); ``None`` when it worked, else why not."""
        self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=120)
        if not self.path.exists() or self.path.stat().st_size == 0:
            return f"perf sched record wrote nothing (exit {self.process.returncode}): {err.strip()[-300:]}"
        return None


def perf_missing() -> str | None:
    """Why ``perf`` cannot be used here, or ``None``."""
    return None if shutil.which("perf") else "perf is not installed (Debian: linux-perf)"


class Timeline:
    """Per thread, its state changes ``(time, 'running' | 'runnable' | 'asleep')``; per CPU, who ran from when."""

    def __init__(self) -> None:
        self.states: dict[int, list[tuple[float, str]]] = collections.defaultdict(list)
        self.on_cpu: dict[int, list[tuple[float, int, str]]] = collections.defaultdict(list)

    @classmethod
    def load(cls, path: Path) -> Timeline:
        script = subprocess.run(["perf", "script", "-i", str(path)], capture_output=True, text=True, check=True)
        timeline = cls()
        for line in script.stdout.splitlines():
            event = EVENT.match(line)
            if event is not None:
                timeline.add(event)
        return timeline

    def add(self, event: re.Match[str]) -> None:
        at, kind, rest = float(event["time"]), event["kind"], event["rest"]
        if kind == "sched_switch":
            switch = SWITCH.search(rest)
            if switch is None:
                return
            # a thread switched out while still runnable (R, R+) was preempted: it waits for a CPU
            left = "runnable" if switch["state"].startswith("R") else "asleep"
            self.states[int(switch["prev"])].append((at, left))
            self.states[int(switch["next"])].append((at, "running"))
            self.on_cpu[int(event["cpu"])].append((at, int(switch["next"]), switch["comm"]))
        elif kind in ("sched_wakeup", "sched_wakeup_new"):
            woken = WAKEUP.search(rest + " ")
            if woken is not None:
                self.states[int(woken["pid"])].append((at, "runnable"))

    def breakdown(self, tid: int, start: float, end: float) -> dict[str, float]:
        """Seconds thread ``tid`` spent in each state within ``[start, end)`` ('unknown' before its first event)."""
        changes = self.states.get(tid, [])
        index = bisect.bisect_right(changes, (start, "~")) - 1
        state, since = (changes[index][1] if index >= 0 else "unknown"), start
        spent: collections.Counter[str] = collections.Counter()
        for at, new_state in changes[max(index + 1, 0) :]:
            if at >= end:
                break
            spent[state] += at - since
            state, since = new_state, at
        spent[state] += end - since
        return dict(spent)

    def holders(self, cpu: int, start: float, end: float) -> collections.Counter[tuple[int, str]]:
        """Seconds each ``(tid, comm)`` ran on ``cpu`` within ``[start, end)``."""
        runs = self.on_cpu.get(cpu, [])
        index = bisect.bisect_right(runs, (start, 1 << 62, "")) - 1
        who, since = ((runs[index][1], runs[index][2]) if index >= 0 else (-1, "?")), start
        held: collections.Counter[tuple[int, str]] = collections.Counter()
        for at, tid, comm in runs[max(index + 1, 0) :]:
            if at >= end:
                break
            held[who] += at - since
            who, since = (tid, comm), at
        held[who] += end - since
        return held
