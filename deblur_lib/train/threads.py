"""CPU threads for training on a machine that other processes may share (``--threads``).

torch's intra-op pool (OpenMP) busy-waits at every barrier for all of its threads: when another
process holds one of the cores, every parallel region waits for the descheduled thread, and a
step on this project's 2-core machine ran 3.6x slower than on the idle machine (896 vs 249 ms,
small preset, batch 8, 128 px; one thread: 411 ms, 1.65x). So ``--threads auto`` starts with one
thread per core and, at every log interval (the loop's host sync point, no extra cost per
step), measures how much CPU *other* processes used since the last check (system busy time
minus this process's and its DataLoader workers'); when others keep at least ``BUSY_CORE`` of
a core busy, it leaves them that many cores, and it takes them back when they are idle again.
``--threads N`` fixes N threads. On a GPU the pool only feeds the device: ``auto`` keeps one
thread per core there.
"""

from __future__ import annotations

import logging
import os
import time

import psutil
import torch

BUSY_CORE = 0.5  # other processes using this share of a core count as holding it
MIN_WINDOW_S = 1.0  # a shorter window since the last sample decides nothing: /proc/stat counts
# in 10 ms ticks, and the epoch's last check can follow the log interval's by a millisecond
log = logging.getLogger("deblur_lib.train")


def parse_threads(text: str) -> int | None:
    """``auto`` -> None; a positive int -> that many threads; ValueError otherwise."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--threads must be 'auto' or an integer >= 1 (got {text!r})")
    return n


class ThreadPolicy:
    """Sets ``torch.set_num_threads``: fixed (``threads`` an int) or adapted to the machine's
    other load (``threads`` None: see the module docstring). ``check()`` returns the count now
    in force; call it at the logging interval."""

    def __init__(self, threads: int | None, device: torch.device, settle: int = 1) -> None:
        """``settle``: change the count only when that many checks in a row want the same new
        count. Under ``torch.compile`` pass 2: the compiled step is guarded on the thread
        count, so the first step at each new count recompiles (about a minute on a 2-core CPU)
        and one busy interval should not cost that."""
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.fixed = threads
        self.adaptive = threads is None and device.type == "cpu" and self.cores > 1
        self.current = threads or self.cores
        self.settle = settle
        self._wanted, self._seen = self.current, 0  # a new count, and checks in a row wanting it
        torch.set_num_threads(self.current)
        self._me = psutil.Process()
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        """(wall s, system busy CPU s, the CPU s of this process and all its descendants).

        Each process's own user + system time plus that of its children that have ended
        (``children_user``, ``children_system``): the C++ compilers ``torch.compile`` runs for a
        few seconds each end between two checks, and counting them as other processes made a
        compiling run drop to one thread (and recompile for it)."""
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        mine = sum(self._me.cpu_times()[:4])
        for child in self._me.children(recursive=True):
            try:
                mine += sum(child.cpu_times()[:4])
            except psutil.Error:  # a worker that ended since children() listed it
                continue
        return time.monotonic(), busy, mine

    def others(self) -> float | None:
        """Cores' worth of CPU that other processes used since the last sample; None (and no
        new sample) when that was less than ``MIN_WINDOW_S`` ago."""
        if time.monotonic() - self._last[0] < MIN_WINDOW_S:
            return None
        now = self._sample()
        wall = now[0] - self._last[0]
        used = (now[1] - self._last[1]) - (now[2] - self._last[2])
        self._last = now
        return max(0.0, used / wall)

    def check(self) -> int:
        if not self.adaptive:
            return self.current
        others = self.others()
        if others is None:  # too soon after the last check to measure
            return self.current
        held = min(self.cores - 1, int(others + 1 - BUSY_CORE))
        wanted = max(1, self.cores - held)
        self._seen = self._seen + 1 if wanted == self._wanted else 1
        self._wanted = wanted
        if wanted != self.current and self._seen >= self.settle:
            log.info(
                "threads: %d -> %d (other processes hold %d of %d cores: %.2f cores' worth "
                "of CPU since the last check)",
                self.current, wanted, held, self.cores, others,
            )  # fmt: skip
            torch.set_num_threads(wanted)
            self.current = wanted
        return self.current
