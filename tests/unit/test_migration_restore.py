"""restore.start_lazy_verify: the background check of a template's memory
digests (wake-up, priority, damage report, fd ownership)."""

from __future__ import annotations

import os
import threading
import time

from stratopy.errors import TemplateError
from stratopy.memory import PAGE_SIZE, GuestMemory
from stratopy.migration import memfile, restore, template_dir

MiB = 1 << 20
L4 = [(0, 4 * MiB)]
META = {"arch": "x86_64", "cpu_vendor": "GenuineIntel", "machine": {"vcpus": 1}}
TIMEOUT = 30.0


class Opened:
    memory_fd, memory_path, record = -1, "memory", {}

    def __init__(self):
        self.closed = threading.Event()

    def close(self):
        self.closed.set()


def _nice_of(thread: threading.Thread) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


def test_it_waits_at_nice_19_and_starts_when_the_vm_runs(monkeypatch):
    """The thread is at the lowest priority BEFORE it waits (so its wake-up
    never competes with the guest's first I/O at nice 0), does not read
    before ``started`` is set, and starts on the event, not on the fallback
    (made far longer than this test's waits)."""
    monkeypatch.setattr(restore, "START_FALLBACK_S", 3600.0)
    entered, nice_in_check = threading.Event(), []

    def fake_verify(fd, name, record, layout, stop=None):
        nice_in_check.append(os.getpriority(os.PRIO_PROCESS, 0))
        entered.set()
        return 0
    monkeypatch.setattr(memfile, "verify_chunks", fake_verify)
    opened, started = Opened(), threading.Event()
    th = restore.start_lazy_verify(opened, L4, started, lambda e: None)
    try:
        deadline = time.monotonic() + TIMEOUT
        while th.is_alive() and _nice_of(th) != 19 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert th.is_alive() and _nice_of(th) == 19, "not at nice 19 while it waits"
        assert not entered.is_set(), "the check ran before the VM started"
    finally:
        started.set()
    assert entered.wait(TIMEOUT), "the check did not start when the VM ran"
    th.join(TIMEOUT)
    assert not th.is_alive() and opened.closed.is_set()
    assert nice_in_check == [19]


def test_a_damaged_chunk_is_reported_once_and_the_fd_closed(tmp_path):
    mem = GuestMemory.anonymous(L4)
    try:
        mem.write(3 * MiB, b"\x42" * PAGE_SIZE)
        template_dir.save_template(str(tmp_path), mem, META, {"k": [1]})
    finally:
        mem.close()
    with open(tmp_path / "memory", "r+b") as f:
        f.seek(memfile.HEADER_SIZE + 3 * MiB + 9)
        f.write(b"\x43")
    opened = template_dir.open_template(str(tmp_path), L4, expect_arch="x86_64",
                                        expect_vendor="GenuineIntel")
    errors: list[TemplateError] = []
    started = threading.Event()
    started.set()
    th = restore.start_lazy_verify(opened, L4, started, errors.append)
    th.join(TIMEOUT)
    assert not th.is_alive()
    assert len(errors) == 1
    assert "chunk at guest address 0x200000" in str(errors[0])
    assert opened.memory_fd == -1                # the thread closed what it owned
