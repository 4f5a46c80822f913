"""What ``/proc`` tells about processes: parents, children, and the ``/dev/shm`` files they
map (vLLM's engines leave theirs behind when they are killed)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

#: how long processes sent SIGKILL get to exit before their resource trackers are ended
SERVED_EXIT_S = 10.0


def proc_stat(pid: int) -> tuple[int, str, str] | None:
    """A process's parent pid, state and start time, from ``/proc/<pid>/stat``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], fields[19]


def process_tree() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid in _pids():
        if (stat := proc_stat(pid)) is not None:
            tree.setdefault(stat[0], []).append(pid)
    return tree


def running(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` is a live process (not a zombie) and, given its start time, still the
    same one (a pid is reused once its process is gone)."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z" and (started is None or stat[2] == started)


def is_resource_tracker(pid: int) -> bool:
    """Whether ``pid`` is Python's multiprocessing resource tracker: it ignores SIGTERM and,
    once every process that shares its pipe is gone, removes the semaphores they left
    (``/dev/shm/sem.mp-*``). Killed first, it leaves them behind."""
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def children(pid: int) -> set[int]:
    return set(process_tree().get(pid, ()))


def shared_memory(pid: int) -> set[Path]:
    """The ``/dev/shm`` files a process maps (not those already removed)."""
    found: set[Path] = set()
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                if "/dev/shm/" in line and not line.rstrip().endswith("(deleted)"):
                    found.add(Path(line.split(maxsplit=5)[5].rstrip("\n")))
    except OSError:
        pass
    return found


def unmapped(paths: set[Path]) -> set[Path]:
    """Those of ``paths`` that exist and no running process maps: left behind (another
    program's live segments are mapped by their owners)."""
    paths = {path for path in paths if path.exists()}
    for pid in _pids() if paths else ():
        paths -= shared_memory(pid)
    return paths


def _pids() -> list[int]:
    with suppress(OSError), os.scandir("/proc") as entries:
        return [int(entry.name) for entry in entries if entry.name.isdigit()]
    return []


def unlink(path: Path) -> bool:
    try:
        path.unlink()
    except OSError:
        return False
    return True


def descendants(pid: int) -> set[int]:
    """Every process under ``pid`` (children, their children, ...)."""
    tree, found, todo = process_tree(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class Leftovers:
    """A process tree and the ``/dev/shm`` files it maps, as seen while it ran: what to clean
    up once its root has died (vLLM's engine processes and segments outlive a killed actor)."""

    def __init__(self, processes: dict[int, str], segments: set[Path]) -> None:
        self.processes = processes  #: pid -> start time (a reused pid is not ours)
        self.segments = segments

    @classmethod
    def of(cls, root: int) -> Leftovers:
        pids = {root, *descendants(root)}
        processes = {pid: s[2] for pid in pids if (s := proc_stat(pid)) is not None}
        segments = {path for pid in processes for path in shared_memory(pid)}
        return cls(processes, segments)

    def alive(self) -> list[int]:
        return [pid for pid, started in self.processes.items() if running(pid, started)]

    def kill(self, tracker_grace_s: float = 2.0) -> list[int]:
        """SIGKILL what is still alive of the tree, Python's resource trackers last (given
        ``tracker_grace_s`` to remove the semaphores the others left); the pids signalled."""
        alive = self.alive()
        trackers = [pid for pid in alive if is_resource_tracker(pid)]
        others = [pid for pid in alive if pid not in trackers]
        killed = _kill(others)
        return killed + end_trackers(
            trackers, lambda pid: running(pid, self.processes[pid]), others, tracker_grace_s
        )

    def remove_segments(self) -> list[Path]:
        """Unlink the segments (a process still mapping one keeps its memory till it exits)."""
        return [path for path in sorted(self.segments) if unlink(path)]


def end_trackers(
    trackers: list[int],
    alive: Callable[[int], bool],
    served: Sequence[int] = (),
    grace_s: float = 2.0,
) -> list[int]:
    """End resource trackers once the processes they ``served`` (signalled already) are gone:
    a tracker removes their semaphores when the last of them has exited, and a big process
    takes seconds to exit after its SIGKILL on a busy machine. Those still ``alive``
    ``grace_s`` after that get a SIGKILL; the pids signalled."""
    deadline = time.monotonic() + SERVED_EXIT_S
    while any(alive(pid) for pid in served) and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = time.monotonic() + grace_s
    while (trackers := [pid for pid in trackers if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _kill(trackers)


def _kill(pids: list[int]) -> list[int]:
    killed = []
    for pid in pids:
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed
