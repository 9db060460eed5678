"""A template directory: crash-safe re-templating, leftovers, locks, modes."""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time

import pytest

from stratopy.errors import MigrationError
from stratopy.memory import GuestMemory
from stratopy.migration import memfile, template_dir

MiB = 1 << 20
L4 = [(0, 4 * MiB)]
META = {"arch": "x86_64", "cpu_vendor": "GenuineIntel", "machine": {"vcpus": 1}}
EXPECT = {"expect_arch": "x86_64", "expect_vendor": "GenuineIntel"}


def _save(d, marker: bytes):
    with GuestMemory.anonymous(L4) as mem:
        mem.write(0x1000, marker)
        mem.write(3 * MiB, marker)
        return template_dir.save_template(str(d), mem, META, {"marker": marker.decode()})


def _restore_marker(d) -> bytes:
    """What a restore from ``d`` would give the guest (every check, full verify)."""
    t = template_dir.open_template(str(d), L4, **EXPECT)
    try:
        memfile.verify_chunks(t.memory_fd, t.memory_path, t.record, L4)
        with memfile.map_memory(t.memory_fd, L4) as mem:
            marker = mem.read(0x1000, 3)
        assert t.components["marker"] == marker.decode()
        return marker
    finally:
        t.close()


def _crash_child(d, step: str) -> None:
    """Re-template ``d`` in a child process that dies (no cleanup, no atexit)
    at ``step``, as a SIGKILL would leave it."""
    pid = os.fork()
    if pid == 0:
        try:
            def die(s):
                if s == step:
                    os._exit(9)
            template_dir.fault_hook = die
            _save(d, b"NEW")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9, "the child did not reach the step"


@pytest.mark.parametrize("step", template_dir.STEPS)
def test_crash_at_any_step_leaves_a_complete_template(tmp_path, step):
    """Killed at any step of a re-template, DIR holds a usable template: the
    old one until the commit, the new one from it on. The next snapshot
    removes the RAM-sized leftovers."""
    _save(tmp_path, b"OLD")
    _crash_child(tmp_path, step)
    expected = b"OLD" if template_dir.STEPS.index(step) < 2 else b"NEW"
    assert _restore_marker(tmp_path) == expected
    if step == "memory-written":
        assert any(n.startswith(".memory-") for n in os.listdir(tmp_path))
    _save(tmp_path, b"3RD")
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]
    assert _restore_marker(tmp_path) == b"3RD"


def test_crash_after_commit_is_finished_by_the_next_writer(tmp_path):
    _save(tmp_path, b"OLD")
    _crash_child(tmp_path, "committed")
    assert any(n.startswith(".memory-") for n in os.listdir(tmp_path))
    with template_dir.writer_lock(str(tmp_path)):
        template_dir.remove_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]
    assert _restore_marker(tmp_path) == b"NEW"


@pytest.mark.parametrize("step", template_dir.STEPS[:2])
def test_failure_before_the_commit_keeps_the_old_template(tmp_path, step, monkeypatch):
    _save(tmp_path, b"OLD")

    def fail(s):
        if s == step:
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(template_dir, "fault_hook", fail)
    with pytest.raises((MigrationError, OSError)):
        _save(tmp_path, b"NEW")
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]
    assert _restore_marker(tmp_path) == b"OLD"


def test_failure_after_the_commit_is_a_complete_new_template(tmp_path, monkeypatch):
    _save(tmp_path, b"OLD")
    monkeypatch.setattr(template_dir, "fault_hook",
                        lambda s: (_ for _ in ()).throw(OSError(5, "EIO")) if s == "committed"
                        else None)
    _save(tmp_path, b"NEW")                   # committed: reported done
    assert _restore_marker(tmp_path) == b"NEW"


def test_template_dir_and_files_are_private_under_umask_000(tmp_path):
    old = os.umask(0)
    try:
        d = tmp_path / "a" / "b" / "tpl"
        _save(d, b"UMK")
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", d):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o700, p
    for name in ("state", "memory"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600


def test_writer_waits_for_a_reader_and_refuses_a_second_writer(tmp_path):
    _save(tmp_path, b"OLD")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)            # a restore opening the template
        threading.Timer(0.3, lambda: fcntl.flock(fd, fcntl.LOCK_UN)).start()
        t0 = time.monotonic()
        _save(tmp_path, b"NEW")                   # waits for the reader, then writes
        assert time.monotonic() - t0 >= 0.25
        fcntl.flock(fd, fcntl.LOCK_EX)            # another writer at work
        with pytest.raises(MigrationError, match="another snapshot is being written"):
            _save(tmp_path, b"3RD")
    finally:
        os.close(fd)
    assert _restore_marker(tmp_path) == b"NEW"


def test_reader_does_not_wait_for_a_writer(tmp_path):
    """A writer may hold DIR for minutes: a restore meanwhile opens the
    committed template at once (the ids pair the files)."""
    _save(tmp_path, b"OLD")
    with template_dir.writer_lock(str(tmp_path)):
        t0 = time.monotonic()
        assert _restore_marker(tmp_path) == b"OLD"
        assert time.monotonic() - t0 < 1.0


def test_incoming_verify_option():
    from stratopy.cli_parse import parse_args
    from stratopy.errors import ConfigError
    base = ["-kernel", "/k", "-incoming"]
    assert parse_args(base + ["file:/t"]).incoming.verify == "lazy"
    cfg = parse_args(base + ["file:/t,verify=full,mapped=off"])
    assert (cfg.incoming.verify, cfg.incoming.mapped) == ("full", False)
    with pytest.raises(ConfigError, match="verify=sometimes: use verify=lazy"):
        parse_args(base + ["file:/t,verify=sometimes"])


def test_reader_racing_a_commit_retries_until_the_pair_matches(tmp_path):
    """With a writer at work (lock held), a reader that sees the new state
    beside the old memory reads again instead of failing or mixing them."""
    import shutil
    _save(tmp_path / "d", b"OLD")
    _save(tmp_path / "n", b"NEW")
    d = tmp_path / "d"
    with template_dir.writer_lock(str(d)):
        shutil.copyfile(tmp_path / "n" / "state", d / "state.new")
        os.replace(d / "state.new", d / "state")          # new state, old memory
        threading.Timer(0.2, lambda: os.replace(tmp_path / "n" / "memory",
                                                d / "memory")).start()
        assert _restore_marker(d) == b"NEW"
    # with no writer, the same mismatch is an error at once
    _save(tmp_path / "n2", b"N2!")
    shutil.copyfile(tmp_path / "n2" / "state", d / "state")
    from stratopy.errors import TemplateError
    with pytest.raises(TemplateError, match="belongs to another template"):
        _restore_marker(d)
