"""Warm start: rebuild the machine from a template directory.

Everything untrusted is parsed and validated BEFORE any vCPU exists: the
state file header/checksum and host match, the command-line facts, the
memory file's pairing (template_dir.open_template: both files opened once,
under the template's shared lock), every component state for shape
(codec) and for meaning (sanity.py, against this host's MSR list and CPUID).
Only then are the vCPUs created -- with the template's CPUID, not this
host's -- memory mapped copy-on-write from the checked memory file, and the
state applied in KVM's order.

The memory file's chunk digests are checked in full before the guest runs
with ``-incoming file:DIR,verify=full``; by default (``verify=lazy``) a
low-priority thread checks them while the guest runs and stops the VM with
one error line (SHUTDOWN ``host-error``, exit 1) if a chunk is damaged, so a
damaged template never runs silently and restore time does not grow with
guest size.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from stratopy.arch.x86_64 import cpu, layout
from stratopy.errors import TemplateError
from stratopy.machine import vcpu_state
from stratopy.migration import facts, memfile, sanity, template_dir
from stratopy.migration.codec import from_plain

log = logging.getLogger(__name__)


def _get(tree: dict, key: str, kind: type):
    if not isinstance(tree, dict) or key not in tree or not isinstance(tree[key], kind):
        raise TemplateError(f"state file: '{key}' is missing or malformed")
    return tree[key]


class PreparedTemplate:
    """A template opened, parsed and validated against a command line, with
    no KVM object yet: what ``apply_template`` restores into a VM. The
    template server (stratopy.tplserver) prepares it once and every pool
    member forked from it applies it; ``opened`` keeps the template's fds."""

    def __init__(self, opened, plan, ram, cpuids, vcpus, vm_state, serial_state, ged_state,
                 rtc_state,
                 slots):
        self.opened, self.plan, self.ram = opened, plan, ram
        self.cpuids, self.vcpus, self.vm_state = cpuids, vcpus, vm_state
        self.serial_state, self.ged_state, self.slots = serial_state, ged_state, slots
        self.rtc_state = rtc_state


def restore_machine(machine, incoming) -> None:
    t0 = time.monotonic()
    prepared = prepare_template(machine.config, incoming)
    try:
        apply_template(machine, prepared, incoming.verify)
    except BaseException:
        prepared.opened.close()
        raise
    machine.timings["restore"] = time.monotonic() - t0
    log.info("restored from %s in %.3f s", incoming.path, machine.timings["restore"])


def prepare_template(config, incoming) -> PreparedTemplate:
    """Open ``incoming.path`` and parse and validate every component against
    ``config`` (TemplateError naming what is wrong); nothing is created."""
    from stratopy.acpi.ged import GedState
    from stratopy.devices.serial import SerialState
    from stratopy.devices.virtio.mmio import MmioState
    from stratopy.machine import slots as slotmod

    ram = layout.ram_layout(config.mem_size)
    plan_box: list = []

    def check_facts(meta: dict) -> None:
        # Each blk/net device goes back to the reserved slot the template had
        # it in (a device hot-replaced before the snapshot is on this command
        # line, anywhere); then the command line must match the template.
        template_facts = meta.get("machine")
        plan = slotmod.plan_slots(config, facts.placement(template_facts))
        facts.compare(template_facts, facts.slot_facts(config, plan))
        plan_box.append(plan)

    opened = template_dir.open_template(incoming.path, ram, check_facts)
    try:
        return _parse(config, opened, plan_box[-1], ram, SerialState, MmioState, GedState)
    except BaseException:
        opened.close()
        raise


def _parse(config, opened, plan, ram, SerialState, MmioState, GedState) -> PreparedTemplate:
    meta, components = opened.meta, opened.components
    ncpu = config.cpus
    cpuids = cpu.cpuids_from_plain(meta.get("cpuid"), ncpu)
    vcpu_list = _get(components, "vcpus", list)
    if len(vcpu_list) != ncpu:
        raise TemplateError(f"state file holds {len(vcpu_list)} vCPUs, expected {ncpu}")
    vcpus = [from_plain(vcpu_state.VcpuState, v, f"vcpus[{i}]")
             for i, v in enumerate(vcpu_list)]
    for i, v in enumerate(vcpus):
        v.validate(ncpu)
        if v.index != i:
            raise TemplateError(f"vCPU {i} is stored as vCPU {v.index}")
        sanity.check_vcpu(v, ram)
    vm_state = from_plain(vcpu_state.VmArchState, _get(components, "vm", dict), "vm")
    vm_state.validate()
    sanity.check_vm(vm_state)
    serial_state = from_plain(SerialState, _get(components, "serial", dict), "serial")
    ged_state = from_plain(GedState, _get(components, "ged", dict), "ged")
    # A template taken before the CMOS RTC existed has none: its guest never
    # probed one, and the RTC starts in its reset state.
    rtc_state = None
    if "rtc" in components:
        from stratopy.devices.rtc import RtcState
        rtc_state = from_plain(RtcState, _get(components, "rtc", dict), "rtc")
        rtc_state.validate()
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
        mmio_state = from_plain(MmioState, _get(saved, "transport", dict),
                                f"slots[{slot.index}].transport")
        sanity.check_queues(mmio_state, f"slots[{slot.index}].transport")
        parsed_slots.append((mmio_state, saved.get("device")))
    return PreparedTemplate(opened, plan, ram, cpuids, vcpus, vm_state, serial_state,
                            ged_state, rtc_state, parsed_slots)


def apply_template(machine, prepared: PreparedTemplate, verify: str) -> None:
    """Create ``machine``'s VM and vCPUs and apply ``prepared``. ``verify``:
    ``full`` (check the memory digests first), ``lazy`` (a thread checks them
    while the guest runs; it then owns the template's fds) or ``done`` (the
    caller checked them: the template server, once for all its clones)."""
    opened, ram = prepared.opened, prepared.ram
    vcpus = prepared.vcpus
    machine._create_vm()
    # This host must offer every CPU feature the template's guest saw, and
    # every MSR it holds must be one this KVM knows.
    cpu.check_cpuid_supported(prepared.cpuids, machine.kvm.supported_cpuid())
    host_msrs = set(machine.kvm.msr_index_list())
    for v in vcpus:
        sanity.check_msr_indices(v, host_msrs)
    if verify == "full":
        t_v = time.monotonic()
        memfile.verify_chunks(opened.memory_fd, opened.memory_path, opened.record, ram)
        machine.timings["verify_memory"] = time.monotonic() - t_v
    t_mem = time.monotonic()
    machine.mem = memfile.map_memory(opened.memory_fd, ram, mapped=machine.config.incoming.mapped)
    machine.timings["map_memory"] = time.monotonic() - t_mem
    machine._map_memory()
    machine._create_vcpus(prepared.cpuids)    # the template's CPUID, before any vCPU state
    # VM-wide state (irqchips, PIT, clock) before the vCPUs, as Firecracker does.
    vcpu_state.restore_vm(machine.vm, prepared.vm_state, machine.config.incoming.clock)
    for vcpu, st in zip(machine.vcpus, vcpus):
        vcpu_state.restore_vcpu(vcpu, st)
    machine._setup_legacy_devices()
    machine.serial.restore(prepared.serial_state)
    if prepared.rtc_state is not None:
        machine.rtc.restore(prepared.rtc_state)
    machine._setup_ged()
    machine.ged.restore(prepared.ged_state)        # validates the event bits
    plan = prepared.plan
    machine.slots = plan
    for slot, (mmio_state, dev_plain) in zip(plan, prepared.slots):
        machine._plug(slot)
        dev = slot.device
        dev_state_cls = type(dev.state())
        if dev_plain is not None and dev_state_cls is not type(None):
            dev.restore(from_plain(dev_state_cls, dev_plain, f"slots[{slot.index}].device"))
        slot.transport.restore(mmio_state)
        # A notification still unread in an ioeventfd at snapshot time was
        # not saved: look at every queue once, as if the guest had kicked.
        slot.transport.notify_all()
        machine.mmio.insert(slot.base, layout.VIRTIO_MMIO_SIZE, slot.transport)
    if verify == "full":
        opened.close()
    elif verify == "lazy":
        start_lazy_verify(machine, opened, ram)
    # The incoming migration is complete once the state is applied.
    machine.migration.start()
    machine.migration.activate()
    machine.migration.complete()


def start_lazy_verify(machine, opened, ram) -> threading.Thread:
    """Check the memory file's chunk digests beside the running guest, at
    the lowest CPU priority; on damage stop the VM: one error line, SHUTDOWN
    (host-error), exit code 1. The thread owns ``opened.memory_fd``."""
    def run() -> None:
        # Start after the first KVM_RUN: the warm start itself is not slowed
        # (the GIL and both host CPUs go to building and starting the VM).
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not (
                machine.runners and machine.runners[0].first_run_at is not None):
            time.sleep(0.005)
        try:
            # who=0: on Linux the nice value is per thread and 0 is the calling
            # thread (the seccomp policy allows exactly this form)
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        except OSError:
            pass
        t = time.monotonic()
        try:
            nbytes = memfile.verify_chunks(opened.memory_fd, opened.memory_path,
                                           opened.record, ram)
            log.info("template memory verified: %d MiB read in %.3f s",
                     nbytes >> 20, time.monotonic() - t)
        except TemplateError as e:
            machine.failure = e      # the CLI reports it once (stderr and the -D log)
            machine.request_shutdown("host-error", guest=False, code=1)
        finally:
            opened.close()
    th = threading.Thread(target=run, name="template-verify", daemon=True)
    th.start()
    return th
