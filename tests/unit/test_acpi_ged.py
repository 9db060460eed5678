"""The GED event register and the VMGenID value (stratopy/acpi/ged.py):
a pure state machine, tested without KVM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from stratopy.acpi import ged
from stratopy.errors import TemplateError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make():
    edges = []
    return ged.GedDevice(lambda: edges.append(1)), edges


def test_an_event_raises_the_interrupt_and_the_read_clears_it():
    dev, edges = make()
    assert dev.read(0, 4) == bytes(4)
    dev.raise_event(ged.EVENT_VMGENID)
    assert edges == [1]
    dev.raise_event(ged.EVENT_POWER_BUTTON)
    assert edges == [1, 1]
    assert dev.read(0, 4) == (ged.EVENT_VMGENID | ged.EVENT_POWER_BUTTON).to_bytes(4, "little")
    assert dev.read(0, 4) == bytes(4)         # read-to-clear: each event is seen once


def test_narrow_reads_clear_only_the_bytes_they_cover():
    dev, _ = make()
    dev.raise_event(ged.EVENT_VMGENID | ged.EVENT_POWER_BUTTON)
    assert dev.read(1, 1) == b"\x00"
    assert dev.pending == ged.EVENT_VMGENID | ged.EVENT_POWER_BUTTON
    assert dev.read(0, 1) == b"\x03"
    assert dev.pending == 0


def test_reads_outside_the_register_and_writes_change_nothing():
    dev, _ = make()
    dev.raise_event(ged.EVENT_VMGENID)
    assert dev.read(8, 4) == bytes(4)
    dev.write(0, b"\xff\xff\xff\xff")
    assert dev.pending == ged.EVENT_VMGENID
    assert dev.read(0, 8) == b"\x01" + bytes(7)


def test_s5_written_with_slp_en_powers_off():
    calls = []
    dev = ged.GedDevice(lambda: None, poweroff=lambda: calls.append("off"))
    dev.write(ged.SLEEP_STATUS_OFFSET, b"\x80")            # Linux clears WAK_STS first
    dev.write(ged.SLEEP_CONTROL_OFFSET, bytes([5 << 2]))  # SLP_TYP without SLP_EN
    dev.write(ged.SLEEP_CONTROL_OFFSET, bytes([3 << 2 | ged.SLEEP_ENABLE]))  # S3: not ours
    dev.write(0, bytes([5 << 2 | ged.SLEEP_ENABLE]))       # the event register
    assert calls == []
    dev.write(ged.SLEEP_CONTROL_OFFSET, bytes([5 << 2 | ged.SLEEP_ENABLE]))
    assert calls == ["off"]
    assert dev.read(ged.SLEEP_STATUS_OFFSET, 1) == b"\x00"
    # without a poweroff callback the write is ignored
    ged.GedDevice(lambda: None).write(ged.SLEEP_CONTROL_OFFSET, bytes([5 << 2 | 0x20]))


@pytest.mark.parametrize("bad", [0, 1 << 2, 1 << 31])
def test_unknown_events_are_refused(bad):
    dev, edges = make()
    with pytest.raises(ValueError, match="GED event bits"):
        dev.raise_event(bad)
    assert edges == [] and dev.pending == 0


def test_state_round_trip_keeps_events_not_yet_read():
    dev, _ = make()
    dev.raise_event(ged.EVENT_POWER_BUTTON)
    other, edges = make()
    other.restore(dev.state())
    assert edges == []                         # restoring is not a new event
    assert other.read(0, 4) == ged.EVENT_POWER_BUTTON.to_bytes(4, "little")


@pytest.mark.parametrize("bad", [ged.GedState(pending=1 << 5), ged.GedState(pending=-1),
                                 ged.GedState(pending="1"), ged.GedState(pending=True), {"pending": 1}])
def test_restore_refuses_bad_state(bad):
    dev, _ = make()
    with pytest.raises(TemplateError):
        dev.restore(bad)
    assert dev.pending == 0


def test_generation_ids_are_random_and_printed_like_qemu():
    a, b = ged.new_generation_id(), ged.new_generation_id()
    assert len(a) == 16 and a != b
    # guest memory holds the GUID little-endian (Microsoft's layout):
    # the text is what uuid reads from those bytes as bytes_le
    assert ged.generation_id_string(a) == str(uuid.UUID(bytes_le=a))
    fixed = bytes(range(16))
    assert ged.generation_id_string(fixed) == "03020100-0504-0706-0809-0a0b0c0d0e0f"
    with pytest.raises(ValueError):
        ged.generation_id_string(bytes(15))


def test_the_warm_start_half_imports_nothing_heavy():
    probe = ("import json, sys; before = set(sys.modules); import stratopy.acpi.ged; "
             "print(json.dumps(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True)
    added = set(json.loads(out.stdout))
    assert not added & {"stratopy.acpi.aml", "stratopy.acpi.aml_resources",
                        "stratopy.acpi.tables", "stratopy.acpi.devices", "uuid", "struct"}
