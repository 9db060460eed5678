"""GuestMemory's three ways of mapping guest RAM (anonymous, a shared file
or memfd, a template's file) when the host refuses a region: what was
mapped is unmapped, and one line names the option and the size."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from stratopy import memory
from stratopy.errors import StratoError

MiB = 1 << 20
LAYOUT = [(0, 2 * MiB), (4 * MiB, 3 * MiB)]


@pytest.fixture
def refuse_second(monkeypatch):
    """mmap.mmap as stratopy.memory sees it: the first call maps, the second
    fails with ENOMEM; records the maps made and their offsets."""
    made: list = []
    real = mmap.mmap

    def fake(fd, size, **kw):
        if made:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        m = real(-1, size)
        made.append((m, kw.get("offset", 0)))
        return m

    monkeypatch.setattr(memory.mmap, "mmap", fake)
    return made


@pytest.fixture
def memfd():
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * MiB)
    yield fd
    os.close(fd)


def _refusal(made, build) -> str:
    """The one line ``build()`` fails with; what it mapped is unmapped."""
    with pytest.raises(StratoError) as e:
        build()
    assert len(made) == 1 and made[0][0].closed
    return str(e.value)


def test_anonymous(refuse_second):
    assert _refusal(refuse_second, lambda: memory.GuestMemory.anonymous(LAYOUT)) == (
        "-m: cannot map 5 MiB of guest memory: Cannot allocate memory"
        " (address-space limit, ulimit -v, or overcommit policy?)")


def test_shared_names_the_refused_region(refuse_second, memfd):
    msg = _refusal(refuse_second,
                   lambda: memory.GuestMemory._map_shared(memfd, LAYOUT, "mem-share", False))
    assert msg == ("mem-share: cannot map 3 MiB of guest memory: "
                   "Cannot allocate memory (not enough free huge pages?)")


def test_template_file_at_its_base_offset(refuse_second, memfd):
    msg = _refusal(refuse_second,
                   lambda: memory.GuestMemory.from_fd(memfd, LAYOUT, mapped=True, base=8 * MiB))
    assert msg.startswith("the template's memory: cannot map 5 MiB of guest memory")
    assert refuse_second[0][1] == 8 * MiB
