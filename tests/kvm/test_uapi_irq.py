"""MSI into KVM's in-kernel LAPIC, both ways the q35 can use (kvm/uapi_irq.py):
KVM_SIGNAL_MSI, and a GSI routed to an MSI (KVM_SET_GSI_ROUTING) raised
through an irqfd. On this host (kvm_pvm) too: the vector lands in the
LAPIC's IRR."""

from __future__ import annotations

import os
import struct
import time

import pytest

from stratopy.kvm import uapi_irq
from stratopy.kvm.system import Kvm

pytestmark = pytest.mark.kvm

APIC_SVR, APIC_IRR = 0xF0, 0x200


@pytest.fixture
def vcpu():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    v = vm.create_vcpu(0)
    lapic = v.get_lapic()
    struct.pack_into("<I", lapic, APIC_SVR, 0x1FF)       # software-enable the LAPIC
    v.set_lapic(lapic)
    yield vm, v
    vm.close()
    kvm.close()


def irr(v, vector: int) -> bool:
    regs = bytes(v.get_lapic())
    word = struct.unpack_from("<I", regs, APIC_IRR + 0x10 * (vector // 32))[0]
    return bool(word >> (vector % 32) & 1)


def test_signal_msi_reaches_the_lapic(vcpu):
    vm, v = vcpu
    assert not irr(v, 0x41)
    uapi_irq.MsiSender(vm.fd).send(3, 0xFEE00000, 0x41)    # dest APIC 0, fixed, vector 0x41
    assert irr(v, 0x41)


def test_gsi_route_and_irqfd_reach_the_lapic(vcpu):
    vm, v = vcpu
    router = uapi_irq.GsiRouter(vm.fd)
    gsi = router.allocate()
    assert gsi == 24
    router.set_msi(gsi, 0xFEE00000, 0x52)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        router.irqfd(efd, gsi)
        assert not irr(v, 0x52)
        os.eventfd_write(efd, 1)
        deadline = time.monotonic() + 5
        while not irr(v, 0x52):
            assert time.monotonic() < deadline, "irqfd MSI never reached the LAPIC"
            time.sleep(0.01)
        router.irqfd(efd, gsi, deassign=True)
    finally:
        os.close(efd)
    # the default IOAPIC routes survive a table with MSI routes in it
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)


def test_routing_table_keeps_the_irqchip_routes():
    t = uapi_irq.routing_table({30: (0xFEE01000, 0x33)})
    assert t.nr == len(uapi_irq.default_routes()) + 1
    e = t.entries[t.nr - 1]
    assert (e.gsi, e.type, e.u.msi.address_lo, e.u.msi.data) == (30, 2, 0xFEE01000, 0x33)
    pins = {(x.gsi, x.u.irqchip.irqchip) for x in t.entries[:t.nr - 1]}
    assert (2, 2) in pins and (2, 0) not in pins and (16, 2) in pins and (0, 0) in pins
