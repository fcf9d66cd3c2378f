"""--threads: ThreadPolicy's parsing and its count of the CPU this run itself uses."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from deblur_lib.train.threads import ThreadPolicy, parse_threads

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


@pytest.mark.parametrize(("text", "expected"), [("auto", None), ("1", 1), ("3", 3)])
def test_parse_threads(text, expected):
    assert parse_threads(text) == expected


@pytest.mark.parametrize("text", ["0", "-2", "two", ""])
def test_parse_threads_refuses_what_is_not_a_count(text):
    with pytest.raises(ValueError, match="--threads must be 'auto' or an integer >= 1"):
        parse_threads(text)


def test_cpu_of_a_child_that_ended_counts_as_this_runs_own():
    """A short-lived child (like the C++ compiler torch.compile runs) is this run's CPU, not
    another process's: it must not make --threads auto give up a core."""
    before = torch.get_num_threads()
    try:
        policy = ThreadPolicy(None, torch.device("cpu"))
        _, _, mine_before = policy._sample()
        subprocess.run([sys.executable, "-c", SPIN.format(s=0.6)], check=True)
        _, _, mine_after = policy._sample()
        assert mine_after - mine_before >= 0.5  # the child's 0.6 CPU s, ended and reaped
    finally:
        torch.set_num_threads(before)


def test_a_fixed_count_is_set_and_never_changed():
    before = torch.get_num_threads()
    try:
        policy = ThreadPolicy(1, torch.device("cpu"))
        assert torch.get_num_threads() == 1 and not policy.adaptive
        assert policy.check() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("settle", "changes_after"), [(1, 1), (2, 2)])
def test_auto_gives_up_a_core_after_settle_busy_checks_in_a_row(settle, changes_after, monkeypatch):
    before = torch.get_num_threads()
    try:
        policy = ThreadPolicy(None, torch.device("cpu"), settle=settle)
        policy.cores = policy.current = 2
        policy.adaptive = True
        load = iter([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # other processes' cores per check
        monkeypatch.setattr(policy, "others", lambda: next(load))
        counts = [policy.check() for _ in range(7)]
        if changes_after == 1:  # every busy check takes a core away, every idle one returns it
            assert counts == [1, 2, 1, 1, 1, 2, 2]
        else:  # one busy interval alone changes nothing; two in a row do
            assert counts == [2, 2, 2, 1, 1, 1, 2]
        assert torch.get_num_threads() == counts[-1]
    finally:
        torch.set_num_threads(before)


def test_a_check_right_after_another_decides_nothing(monkeypatch):
    """The epoch's last check can follow the log interval's by a millisecond; /proc/stat
    counts in 10 ms ticks, so one tick over that window read as several busy cores and gave
    up a core (seen as '6.00 cores' worth of CPU' on a 2-core machine)."""
    before = torch.get_num_threads()
    try:
        policy = ThreadPolicy(None, torch.device("cpu"))
        policy.cores = policy.current = 2
        policy.adaptive = True
        sampled = policy._last
        monkeypatch.setattr(policy, "_sample", lambda: pytest.fail("sampled a too-short window"))
        assert policy.others() is None and policy.check() == 2
        assert policy._last == sampled  # the next check measures from the older sample
    finally:
        torch.set_num_threads(before)
