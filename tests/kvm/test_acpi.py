"""ACPI on the microvm with a freestanding guest (the counter): the tables
and the VMGenID GUID are in guest RAM from cold boot (read here from a
template's memory file), every warm start gets a new generation ID
(QMP query-vm-generation-id), and system_powerdown of a guest that does not
listen to the GED (no ACPI, pin masked) still ends the VM at once. The
Linux side (the guest reseeding, the power button) is tests/e2e/test_6_acpi.py.
"""

from __future__ import annotations

import struct

import pytest

from stratopy.acpi import ged
from stratopy.arch.x86_64 import layout
from stratopy.migration import memfile
from tests.harness import generation_id
from tests.kvm.test_guests import take_template
from tests.kvm.test_lifecycle import TIMEOUT

pytestmark = pytest.mark.kvm


def _args(guests) -> list[str]:
    return ["-kernel", guests["counter"], "-m", "64", "-serial", "stdio", "-append", "poll=12"]


def _guest_ram(tpl, gpa: int, size: int) -> bytes:
    """Guest-physical bytes from a template's memory file (one RAM region:
    64 MiB, stored after the header page)."""
    with open(tpl / "memory", "rb") as f:
        f.seek(memfile.HEADER_SIZE + gpa)
        return f.read(size)


def test_tables_in_template_and_a_new_generation_id_per_warm_start(guests, start_vm, tmp_path):
    tpl = tmp_path / "tpl"
    vm = start_vm(_args(guests), qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    g0 = generation_id(vm)
    take_template(vm, str(tpl))
    vm.kill()

    # the RSDP where Linux scans for it, checksummed, pointing at an XSDT in
    # the table window; the GUID page holds what QMP reported
    rsdp = _guest_ram(tpl, layout.ACPI_RSDP_ADDR, 36)
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    assert layout.ACPI_RSDP_ADDR < xsdt_addr < layout.ACPI_TABLES_END
    head = _guest_ram(tpl, xsdt_addr, 36)
    assert head[:4] == b"XSDT"
    xsdt = _guest_ram(tpl, xsdt_addr, struct.unpack_from("<I", head, 4)[0])
    assert sum(xsdt) % 256 == 0
    signatures = {_guest_ram(tpl, a, 4) for a in struct.unpack_from(
        f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)}
    assert signatures == {b"FACP", b"APIC"}
    guid = _guest_ram(tpl, layout.VMGENID_GUID_ADDR, ged.GUID_SIZE)
    assert ged.generation_id_string(guid) == g0

    clones = [start_vm(_args(guests) + ["-incoming", f"file:{tpl}"], qmp=True) for _ in range(2)]
    ids = [generation_id(c) for c in clones]
    assert len({g0, *ids}) == 3, (g0, ids)

    # the counter never unmasks the GED pin: system_powerdown ends it at once
    q = clones[0].qmp(TIMEOUT)
    try:
        assert q.cmd("system_powerdown") == {"return": {}}
        ev = q.wait_event("SHUTDOWN", TIMEOUT)
        assert ev["data"] == {"guest": False, "reason": "host-qmp-system-powerdown"}
    finally:
        q.close()
    assert clones[0].wait_exit(TIMEOUT) == 0
