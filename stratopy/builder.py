"""The builder: two recipes that turn a configured Machine into a runnable VM.

Side by side, as Firecracker has them (src/vmm/src/builder.rs,
``build_microvm_for_boot`` / ``build_microvm_from_snapshot``)::

    build_for_boot(m)                     build_from_template(m, prepared)
    -----------------                     --------------------------------
    m.create_vm()                         m.create_vm()
                                          check the host (CPUID, MSRs)
                                          [verify=full: memory digests]
    m.set_memory(fresh RAM)               m.set_memory(template RAM, CoW)
    m.create_vcpus()  (host CPUID)        m.create_vcpus(template CPUID)
    m.create_devices(m.plan_slots())      m.create_devices(template placement)
    m.load_guest()                        m.restore_state(MachineState)
    m.setup_boot_vcpus(entry)             [verify=lazy: checker thread]
                                          m.warm_started()  (new VMGenID)

The machine type supplies each step (machine/base.py ``Machine``, and
``MicroVm``); the builder owns their order and the lifecycle check (a
Machine is built once, in state CREATED). A template is read and validated
first, with no KVM object (``prepare_template``: migration/restore.py); the
template server prepares once and applies in every pool member.
"""

from __future__ import annotations

import threading
import time

from stratopy.errors import ConfigError, LifecycleError, TemplateError
from stratopy.logs import get_logger
from stratopy.record import Record

log = get_logger(__name__)


def machine_class(machine_type: str):
    """The Machine subclass of a ``-machine`` type."""
    if machine_type == "microvm":
        from stratopy.machine.microvm import MicroVm
        return MicroVm
    if machine_type == "q35":
        from stratopy.machine.q35 import Q35Vm
        return Q35Vm
    raise ConfigError("-machine", f"{machine_type} is not supported (microvm or q35)")


def create_machine(config):
    """A configured, not yet built, machine of ``config.machine_type``."""
    return machine_class(config.machine_type)(config)


def _begin(machine) -> float:
    from stratopy.machine.base import VmState

    machine.require(VmState.CREATED)
    if machine.built or machine.vm is not None:
        raise LifecycleError("the VM is built already")
    return time.monotonic()


# ----------------------------------------------------------------------------
# recipe 1: cold boot

def build_for_boot(machine) -> None:
    """A fresh VM that boots ``-kernel``."""
    from stratopy.memory import GuestMemory

    t0 = _begin(machine)
    c = machine.config
    machine.create_vm()
    machine.set_memory(GuestMemory.for_boot(machine.ram_layout(), mem_path=c.mem_path,
                                            share=c.mem_share, prealloc=c.mem_prealloc,
                                            dump_guest_core=c.dump_guest_core))
    machine.create_vcpus()
    machine.create_devices(machine.plan_slots(c))
    entry = machine.load_guest()
    machine.setup_boot_vcpus(entry)
    machine.built = True
    machine.timings["build"] = time.monotonic() - t0


# ----------------------------------------------------------------------------
# recipe 2: warm start from a template

class PreparedTemplate(Record):
    """A template opened, parsed and validated against a command line, with
    no KVM object yet: what ``build_from_template`` restores into a VM. The
    template server (stratopy.tplserver) prepares it once and every pool
    member forked from it applies it; ``opened`` keeps the template's fds."""

    __slots__ = ("opened", "state", "cpuids", "slots", "ram")

    def __init__(self, opened, state, cpuids: list, slots: list, ram: list):
        self.opened = opened            # template_dir.OpenedTemplate
        self.state = state              # machine/schema.py MachineState
        self.cpuids = cpuids            # kvm_cpuid2 per vCPU
        self.slots = slots              # the virtio slots, planned as the template had them
        self.ram = ram                  # [(gpa, size)]

    def close(self) -> None:
        self.opened.close()


def prepare_template(config, incoming) -> PreparedTemplate:
    """Open ``incoming.path`` and parse and validate every component against
    ``config`` (TemplateError naming what is wrong); nothing is created."""
    from stratopy.machine.device_manager import DeviceManager
    from stratopy.migration import facts, restore

    cls = machine_class(config.machine_type)
    ram = cls.ram_layout_of(config)

    def facts_of(placement: dict[str, int]) -> dict:
        return facts.slot_facts(config, cls.plan_slots(config, placement))

    read = restore.read_template(incoming.path, config, ram, facts_of)
    try:
        slots = cls.plan_slots(config, read.placement)
        DeviceManager.check_slots(read.state.devices, slots)
    except BaseException:
        read.opened.close()
        raise
    return PreparedTemplate(read.opened, read.state, read.cpuids, slots, ram)


def build_from_template(machine, prepared: PreparedTemplate | None = None,
                        verify: str | None = None) -> None:
    """Build ``machine`` from a template: ``prepared`` (already validated:
    the template server's pool members; ``verify`` defaults to ``done``,
    the server checked the memory once for all) or, when None, the one
    ``-incoming`` names (``verify`` from it: ``full`` checks the memory
    digests first, ``lazy`` has a thread check them while the guest runs)."""
    t0 = _begin(machine)
    if prepared is None:
        incoming = machine.config.incoming
        prepared = prepare_template(machine.config, incoming)
        verify = verify or incoming.verify
        owned = True
    else:
        verify = verify or "done"
        owned = False
    try:
        _apply(machine, prepared, verify)
    except BaseException:
        if owned:
            prepared.close()
        raise
    if not machine.config.dump_guest_core:
        # the template's RAM is guest memory too (StratoVirt marks every
        # host mapping of guest RAM, whatever backs it)
        machine.mem.exclude_from_core_dump()
    machine.built = True
    machine.timings["build"] = time.monotonic() - t0
    if owned:
        machine.timings["restore"] = machine.timings["build"]
        log.info("restored from %s in %.3f s", machine.config.incoming.path,
                 machine.timings["restore"])


def _apply(machine, prepared: PreparedTemplate, verify: str) -> None:
    from stratopy.migration import memfile, restore

    opened, ram = prepared.opened, prepared.ram
    machine.create_vm()
    restore.check_host(prepared.state, prepared.cpuids, machine.kvm)
    if verify == "full":
        t_v = time.monotonic()
        memfile.verify_chunks(opened.memory_fd, opened.memory_path, opened.record, ram)
        machine.timings["verify_memory"] = time.monotonic() - t_v
    t_mem = time.monotonic()
    machine.set_memory(memfile.map_memory(opened.memory_fd, ram,
                                          mapped=machine.config.incoming.mapped))
    machine.timings["map_memory"] = time.monotonic() - t_mem
    machine.create_vcpus(prepared.cpuids)   # the template's CPUID, before any vCPU state
    machine.create_devices(prepared.slots)
    machine.restore_state(prepared.state)
    if verify == "full":
        opened.close()
    elif verify == "lazy":
        def damaged(e: TemplateError) -> None:
            machine.failure = e      # the CLI reports it once (stderr and the -D log)
            machine.request_shutdown("host-error", guest=False, code=1)
        started = threading.Event()
        # The device loop's first turn: machine.start() has released the
        # vCPUs (the warm start is over). A VM that never runs its loop ends
        # its process; the check's fallback covers anything else.
        machine.loop.call_soon(started.set)
        restore.start_lazy_verify(opened, ram, started, damaged)
    # The incoming migration is complete once the state is applied.
    machine.migration.start()
    machine.migration.activate()
    machine.migration.complete()
    machine.warm_started()
