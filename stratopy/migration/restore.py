"""Warm start: rebuild the machine from a template directory.

Everything untrusted is parsed and validated BEFORE any KVM object is
touched: the state file header/checksum, the host match, the command-line
facts, and every component state. Only then is the VM created, memory mapped
copy-on-write from ``DIR/memory``, and the state applied in KVM's order.
"""

from __future__ import annotations

import logging
import os
import time

from stratopy.arch.x86_64 import layout
from stratopy.errors import TemplateError
from stratopy.machine import vcpu_state
from stratopy.memory import GuestMemory
from stratopy.migration import facts, format as fmt, memfile
from stratopy.migration.codec import from_plain

log = logging.getLogger(__name__)


def _get(tree: dict, key: str, kind: type):
    if not isinstance(tree, dict) or key not in tree or not isinstance(tree[key], kind):
        raise TemplateError(f"state file: '{key}' is missing or malformed")
    return tree[key]


def restore_machine(machine, incoming) -> None:
    from stratopy.devices.serial import SerialState
    from stratopy.devices.virtio.mmio import MmioState

    t0 = time.monotonic()
    directory = incoming.path
    # Header, checksum, host arch/vendor, then the memory file's pairing.
    meta, components = fmt.read_state(os.path.join(directory, memfile.STATE_NAME))
    # Each blk/net device goes back to the reserved slot the template had it
    # in (a device hot-replaced before the snapshot is on this command line,
    # anywhere); then the command line must match the template's facts.
    template_facts = meta.get("machine")
    plan = machine._slot_plan(facts.placement(template_facts))
    facts.compare(template_facts, facts.slot_facts(machine.config, plan))
    if "memory" not in meta:
        raise TemplateError("state file: meta.memory missing")
    memory_path = os.path.join(directory, memfile.MEMORY_NAME)
    memfile.check_memory_file(memory_path, machine.config.mem_size, meta["memory"])

    # --- parse and validate every component before creating anything -------
    ncpu = machine.config.cpus
    vcpu_list = _get(components, "vcpus", list)
    if len(vcpu_list) != ncpu:
        raise TemplateError(f"state file holds {len(vcpu_list)} vCPUs, expected {ncpu}")
    vcpus = [from_plain(vcpu_state.VcpuState, v) for v in vcpu_list]
    for i, v in enumerate(vcpus):
        v.validate(ncpu)
        if v.index != i:
            raise TemplateError(f"vCPU {i} is stored as vCPU {v.index}")
    vm_state = from_plain(vcpu_state.VmArchState, _get(components, "vm", dict))
    vm_state.validate()
    serial_state = from_plain(SerialState, _get(components, "serial", dict))
    slot_list = _get(components, "slots", list)
    if len(slot_list) != len(plan):
        raise TemplateError(f"state file has {len(slot_list)} virtio-mmio slots, "
                            f"the command line makes {len(plan)}")
    parsed_slots = []
    for saved, slot in zip(slot_list, plan):
        if not isinstance(saved, dict):
            raise TemplateError("state file: malformed slot entry")
        driver = slot.config.driver if slot.config else ""
        if (saved.get("index") != slot.index or saved.get("driver") != driver
                or saved.get("kind") != slot.kind):
            raise TemplateError("", attribute=f"virtio-mmio slot {slot.index}",
                                expected=saved.get("driver") or f"empty {saved.get('kind')}",
                                found=driver or f"empty {slot.kind}")
        # every slot has a device, the empty reserved ones too (the guest
        # driver probed them): transport and device state for all
        mmio_state = from_plain(MmioState, _get(saved, "transport", dict))
        parsed_slots.append((mmio_state, saved.get("device")))

    # --- build -------------------------------------------------------------------
    machine._create_vm()
    t_mem = time.monotonic()
    machine.mem = GuestMemory.from_file(memory_path, layout.ram_layout(machine.config.mem_size),
                                        mapped=incoming.mapped)
    machine.timings["map_memory"] = time.monotonic() - t_mem
    machine._map_memory()
    machine._create_vcpus()                       # CPUID set here, before any vCPU state
    # VM-wide state (irqchips, PIT, clock) before the vCPUs, as Firecracker does.
    vcpu_state.restore_vm(machine.vm, vm_state)
    for vcpu, st in zip(machine.vcpus, vcpus):
        vcpu_state.restore_vcpu(vcpu, st)
    machine._setup_legacy_devices()
    machine.serial.restore(serial_state)
    machine.slots = plan
    for slot, (mmio_state, dev_plain) in zip(plan, parsed_slots):
        machine._plug(slot)
        dev = slot.device
        dev_state_cls = type(dev.state())
        if dev_plain is not None and dev_state_cls is not type(None):
            dev.restore(from_plain(dev_state_cls, dev_plain))
        slot.transport.restore(mmio_state)
        # A notification still unread in an ioeventfd at snapshot time was
        # not saved: look at every queue once, as if the guest had kicked.
        slot.transport.notify_all()
        machine.mmio.insert(slot.base, layout.VIRTIO_MMIO_SIZE, slot.transport)
    # The incoming migration is complete once the state is applied.
    machine.migration.start()
    machine.migration.activate()
    machine.migration.complete()
    machine.timings["restore"] = time.monotonic() - t0
    log.info("restored from %s in %.3f s", directory, machine.timings["restore"])
