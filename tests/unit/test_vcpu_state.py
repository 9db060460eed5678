"""VcpuState / VmArchState validation (templates are untrusted) and codec round trips."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os

import pytest

from stratopy.errors import TemplateError
from stratopy.kvm import uapi
from stratopy.machine.vcpu_state import MAX_MSRS, VcpuState, VmArchState
from stratopy.migration.codec import from_plain, to_plain

SIZES = {
    "regs": uapi.kvm_regs,
    "sregs": uapi.kvm_sregs,
    "xsave": uapi.kvm_xsave,
    "fpu": uapi.kvm_fpu,
    "xcrs": uapi.kvm_xcrs,
    "debugregs": uapi.kvm_debugregs,
    "lapic": uapi.kvm_lapic_state,
    "vcpu_events": uapi.kvm_vcpu_events,
    "mp_state": uapi.kvm_mp_state,
}


def rand(struct_type) -> bytes:
    return os.urandom(ctypes.sizeof(struct_type))


def mp(state: int) -> bytes:
    return bytes(uapi.kvm_mp_state(state))


def good_vcpu(index=0, **over) -> VcpuState:
    kw = {
        "index": index, "mp_state": mp(uapi.KVM_MP_STATE_RUNNABLE),
        "regs": rand(uapi.kvm_regs), "sregs": rand(uapi.kvm_sregs),
        "xsave": rand(uapi.kvm_xsave), "fpu": b"", "xcrs": rand(uapi.kvm_xcrs),
        "debugregs": rand(uapi.kvm_debugregs), "lapic": rand(uapi.kvm_lapic_state),
        "msr_indices": [0x10, 0x174, 0xC0000080, 0xFFFFFFFF],
        "msr_values": [0, 1, (1 << 64) - 1, 0x1234],
        "vcpu_events": rand(uapi.kvm_vcpu_events),
    }
    kw.update(over)
    return VcpuState(**kw)


def irqchip(chip_id: int) -> bytes:
    c = uapi.kvm_irqchip()
    c.chip_id = chip_id
    raw = bytearray(bytes(c))
    raw[8:] = os.urandom(len(raw) - 8)
    return bytes(raw)


def good_vm(**over) -> VmArchState:
    kw = {"pic_master": irqchip(uapi.KVM_IRQCHIP_PIC_MASTER),
          "pic_slave": irqchip(uapi.KVM_IRQCHIP_PIC_SLAVE),
          "ioapic": irqchip(uapi.KVM_IRQCHIP_IOAPIC),
          "pit": rand(uapi.kvm_pit_state2), "clock": rand(uapi.kvm_clock_data)}
    kw.update(over)
    return VmArchState(**kw)


# ---------------------------------------------------------------------------
# VcpuState.validate

def test_valid_vcpu_states():
    good_vcpu().validate(1)
    good_vcpu(index=3).validate(4)
    # no XSAVE on the host: fpu carries the FPU state instead
    good_vcpu(xsave=b"", fpu=rand(uapi.kvm_fpu)).validate(1)
    # no XCRS
    good_vcpu(xcrs=b"").validate(1)
    # no MSRs at all
    good_vcpu(msr_indices=[], msr_values=[]).validate(1)
    for st in (uapi.KVM_MP_STATE_RUNNABLE, uapi.KVM_MP_STATE_UNINITIALIZED,
               uapi.KVM_MP_STATE_INIT_RECEIVED, uapi.KVM_MP_STATE_HALTED,
               uapi.KVM_MP_STATE_SIPI_RECEIVED):
        good_vcpu(mp_state=mp(st)).validate(1)


REQUIRED = ["mp_state", "regs", "sregs", "debugregs", "lapic", "vcpu_events"]


# an empty xsave/xcrs means "not supported by the host", so only the
# required fields are tested empty
@pytest.mark.parametrize("field,delta",
                         [(f, d) for f in REQUIRED + ["xsave", "xcrs"] for d in (-1, +1)]
                         + [(f, "empty") for f in REQUIRED])
def test_wrong_size_rejected_naming_the_field(field, delta):
    want = ctypes.sizeof(SIZES[field])
    raw = b"" if delta == "empty" else bytes(want + delta)
    st = good_vcpu(index=1, **{field: raw})
    with pytest.raises(TemplateError, match=rf"vcpus\[1\]\.{field}\b") as ei:
        st.validate(2)
    assert str(want) in str(ei.value)


@pytest.mark.parametrize("raw", [b"", bytes(10), lambda: rand(uapi.kvm_xsave)])
def test_fpu_size_checked_without_xsave(raw):
    raw = raw() if callable(raw) else raw
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.fpu"):
        good_vcpu(xsave=b"", fpu=raw).validate(1)


@pytest.mark.parametrize("indices,values", [
    ([1, 2, 3], [1, 2]),
    ([1], []),
    ([], [5]),
])
def test_msr_lists_must_match(indices, values):
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.msrs"):
        good_vcpu(msr_indices=indices, msr_values=values).validate(1)


def test_too_many_msrs():
    n = MAX_MSRS + 1
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.msrs"):
        good_vcpu(msr_indices=list(range(n)), msr_values=[0] * n).validate(1)
    good_vcpu(msr_indices=list(range(MAX_MSRS)), msr_values=[0] * MAX_MSRS).validate(1)


@pytest.mark.parametrize("index", [-1, 1 << 32, 1 << 40])
def test_msr_index_out_of_range(index):
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.msrs: index"):
        good_vcpu(msr_indices=[0x10, index], msr_values=[0, 0]).validate(1)


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_msr_value_out_of_range(value):
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.msrs: value"):
        good_vcpu(msr_indices=[0x10, 0x11], msr_values=[0, value]).validate(1)


@pytest.mark.parametrize("state", [uapi.KVM_MP_STATE_STOPPED, 42, 0xFFFFFFFF])
def test_unknown_mp_state(state):
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.mp_state.*unknown"):
        good_vcpu(mp_state=mp(state)).validate(1)


@pytest.mark.parametrize("index,num_cpus", [(1, 1), (4, 4), (-1, 4), (300, 254)])
def test_vcpu_index_out_of_range(index, num_cpus):
    with pytest.raises(TemplateError, match="index"):
        good_vcpu(index=index).validate(num_cpus)


# ---------------------------------------------------------------------------
# VmArchState.validate

def test_valid_vm_state():
    good_vm().validate()


@pytest.mark.parametrize("over,name", [
    ({"pic_master": irqchip(uapi.KVM_IRQCHIP_PIC_SLAVE)}, "vm.pic_master"),
    ({"pic_slave": irqchip(uapi.KVM_IRQCHIP_IOAPIC)}, "vm.pic_slave"),
    ({"ioapic": irqchip(uapi.KVM_IRQCHIP_PIC_MASTER)}, "vm.ioapic"),
    ({"ioapic": irqchip(7)}, "vm.ioapic"),
])
def test_vm_wrong_chip_id(over, name):
    with pytest.raises(TemplateError, match=rf"{name}: chip id"):
        good_vm(**over).validate()


@pytest.mark.parametrize("field,struct_type", [
    ("pic_master", uapi.kvm_irqchip), ("pic_slave", uapi.kvm_irqchip),
    ("ioapic", uapi.kvm_irqchip), ("pit", uapi.kvm_pit_state2),
    ("clock", uapi.kvm_clock_data),
])
@pytest.mark.parametrize("delta", [-1, 1, None])
def test_vm_wrong_size(field, struct_type, delta):
    want = ctypes.sizeof(struct_type)
    raw = b"" if delta is None else bytes(want + delta)
    with pytest.raises(TemplateError, match=rf"vm\.{field}\b"):
        good_vm(**{field: raw}).validate()


# ---------------------------------------------------------------------------
# codec round trips

def _roundtrip(obj):
    plain = to_plain(obj)
    text = json.dumps(plain)          # what really goes into the state file
    return from_plain(type(obj), json.loads(text))


@pytest.mark.parametrize("st", [
    good_vcpu(index=2),
    good_vcpu(xsave=b"", fpu=rand(uapi.kvm_fpu), xcrs=b"", msr_indices=[], msr_values=[]),
], ids=["xsave", "fpu"])
def test_vcpu_state_codec_round_trip(st):
    back = _roundtrip(st)
    assert back == st
    assert type(back) is VcpuState
    for f in dataclasses.fields(VcpuState):
        assert type(getattr(back, f.name)) is type(getattr(st, f.name)), f.name
    back.validate(3)


def test_vm_state_codec_round_trip():
    st = good_vm()
    back = _roundtrip(st)
    assert back == st and type(back) is VmArchState
    assert all(type(getattr(back, f.name)) is bytes for f in dataclasses.fields(VmArchState))
    back.validate()


def test_vcpu_state_decode_rejects_missing_field():
    plain = to_plain(good_vcpu())
    del plain["vcpu_events"]
    with pytest.raises(TemplateError, match="vcpu_events"):
        from_plain(VcpuState, plain, "vcpus[0]")
