"""stratopy.record and the classes written out with it (Slot, Region,
I8042State): what @dataclass gave them -- field-wise equality within one
class, a repr naming the fields, unhashable, mutable fields, the same
constructor defaults."""

from __future__ import annotations

import mmap

import pytest

from stratopy.devices.i8042 import I8042State
from stratopy.machine.slots import Slot
from stratopy.memory import Region


def test_slot_defaults_equality_and_mutation():
    s = Slot(3, 0xd000_0000, 5, "blk")
    assert (s.config, s.device, s.transport, s.notify_fds, s.backend, s.hot, s.net_readable) == \
        (None, None, None, (), None, False, None)
    t = Slot(3, 0xd000_0000, 5, "blk")
    assert s == t
    t.hot = True
    assert s != t and t.hot
    assert Slot(index=1, base=2, irq=3, kind="net", hot=True).hot
    with pytest.raises(AttributeError):
        s.not_a_field = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        hash(s)
    assert repr(Slot(0, 16, 5, "other")) == (
        "Slot(index=0, base=16, irq=5, kind='other', config=None, device=None, "
        "transport=None, notify_fds=(), backend=None, hot=False, net_readable=None)")


def test_region_fields_and_equality():
    mm = mmap.mmap(-1, 4096)
    try:
        r = Region(0x1000, 4096, mm, 0)
        assert (r.gpa, r.size, r.mm, r.file_offset, r.end) == (0x1000, 4096, mm, 0, 0x2000)
        assert r == Region(0x1000, 4096, mm, 0) and r != Region(0x1000, 4096, mm, 4096)
        assert repr(r).startswith("Region(gpa=4096, size=4096, mm=")
    finally:
        mm.close()


def test_i8042_state_has_no_fields_and_compares_by_class():
    assert I8042State() == I8042State()
    assert I8042State() != Slot(0, 0, 0, "other")
    assert repr(I8042State()) == "I8042State()"
