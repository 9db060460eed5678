"""Reading a template: a directory -> a validated snapshot object.

Everything untrusted is parsed and validated here, BEFORE any KVM object
exists: the state file header/checksum and host match, the command-line
facts, the memory file's pairing (template_dir.open_template: both files
opened once, under the template's shared lock), and the whole machine state
(machine/schema.py ``MachineState``) for shape (codec, field paths in every
error) and for meaning (sanity.py). Nothing here touches a machine: the
builder (stratopy/builder.py) builds one from what this returns.

The memory file's chunk digests are checked in full before the guest runs
with ``-incoming file:DIR,verify=full``; by default (``verify=lazy``) a
low-priority thread checks them while the guest runs and stops the VM with
one error line (SHUTDOWN ``host-error``, exit 1) if a chunk is damaged, so a
damaged template never runs silently and restore time does not grow with
guest size.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from stratopy.arch.x86_64 import cpu
from stratopy.errors import TemplateError
from stratopy.logs import get_logger
from stratopy.migration import facts, memfile, sanity, template_dir
from stratopy.migration.codec import from_plain
from stratopy.record import Record

log = get_logger(__name__)


class TemplateRead(Record):
    """A template opened and validated: ``opened`` (its fds, meta and memory
    record), ``state`` (the decoded MachineState), ``cpuids`` (each vCPU's
    kvm_cpuid2, from the state) and ``placement`` (device id -> the slot the
    template had it in)."""

    __slots__ = ("opened", "state", "cpuids", "placement")

    def __init__(self, opened, state, cpuids: list, placement: dict):
        self.opened, self.state = opened, state
        self.cpuids, self.placement = cpuids, placement


def read_template(path: str, config, ram: list[tuple[int, int]],
                  facts_of: Callable[[dict[str, int]], dict]) -> TemplateRead:
    """Open the template in ``path`` and validate it against ``config``:
    ``facts_of(placement)`` gives the command line's facts with its devices
    placed as the template had them (facts.py). TemplateError naming what is
    wrong; on success the caller owns ``opened`` (close it)."""
    placement_box: list = []

    def check_facts(meta: dict) -> None:
        # Each blk/net device goes back to the reserved slot the template had
        # it in (a device hot-replaced before the snapshot is on this command
        # line, anywhere); then the command line must match the template.
        template_facts = meta.get("machine")
        placement = facts.placement(template_facts)
        facts.compare(template_facts, facts_of(placement))
        placement_box.append(placement)

    opened = template_dir.open_template(path, ram, check_facts)
    try:
        state, cpuids = decode_machine_state(opened.components, config, ram)
    except BaseException:
        opened.close()
        raise
    return TemplateRead(opened, state, cpuids, placement_box[-1])


def decode_machine_state(components: dict, config, ram) -> tuple:
    """``components`` -> (MachineState, [kvm_cpuid2 per vCPU]), checked for
    shape (codec: field paths) and meaning (sanity.py) against ``config``."""
    from stratopy.machine.schema import MachineState

    state = from_plain(MachineState, components)
    if state.machine_type != config.machine_type:
        raise TemplateError("", attribute="machine type", expected=state.machine_type,
                            found=config.machine_type)
    ncpu = config.cpus
    if len(state.vcpus) != ncpu:
        raise TemplateError(f"state file holds {len(state.vcpus)} vCPUs, expected {ncpu}")
    cpuids = []
    for i, v in enumerate(state.vcpus):
        v.validate(ncpu)
        if v.index != i:
            raise TemplateError(f"vCPU {i} is stored as vCPU {v.index}")
        sanity.check_vcpu(v, ram)
        cpuids.append(cpu.cpuid_from_plain(v.cpuid, f"vcpus[{i}].cpuid"))
    state.vm.validate()
    sanity.check_vm(state.vm)
    for i, slot in enumerate(state.devices.virtio):
        if slot.transport_type == "virtio-mmio":
            sanity.check_queues(slot.transport, f"devices.virtio[{i}].transport")
        elif slot.transport_type == "virtio-pci":
            sanity.check_queues(slot.transport.common, f"devices.virtio[{i}].transport.common")
    return state, cpuids


def check_host(state, cpuids: list, kvm) -> None:
    """This host must offer every CPU feature the template's guest saw, and
    every MSR it holds must be one this KVM knows (``state``: MachineState)."""
    cpu.check_cpuid_supported(cpuids, kvm.supported_cpuid())
    host_msrs = set(kvm.msr_index_list())
    for v in state.vcpus:
        sanity.check_msr_indices(v, host_msrs)


# How long the check waits for the guest to start before it starts anyway.
START_FALLBACK_S = 5.0


def start_lazy_verify(opened, ram, started: threading.Event,
                      damaged: Callable[[TemplateError], None]) -> threading.Thread:
    """Check the memory file's chunk digests beside the running guest, at
    the lowest CPU priority, once ``started`` is set (the builder sets it
    when the VM runs) or START_FALLBACK_S passed; on damage call
    ``damaged(error)`` (the builder stops the VM: one error line, SHUTDOWN
    host-error, exit code 1). The thread owns ``opened.memory_fd``.

    Why it cannot starve the guest: it is at nice 19 before it does
    anything (a waker at nice 0 would compete with the vCPU and device
    threads for the GIL and the CPUs exactly when the guest starts its
    first I/O); each chunk is one preadv into one reused buffer and one
    sha256 of it, both with the GIL released, so between chunks the thread
    holds the GIL only for a few bytecodes, and takes it 3 times per 2 MiB
    of data (a smaller piece would take it more often: each time, a nice-19
    thread that gets the GIL may be preempted holding it)."""
    def run() -> None:
        try:
            # who=0: on Linux the nice value is per thread and 0 is the calling
            # thread (the seccomp policy allows exactly this form)
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        except OSError:
            pass
        # Start once the VM runs: the warm start itself is not slowed (the
        # GIL and both host CPUs go to building and starting the VM).
        started.wait(START_FALLBACK_S)
        t = time.monotonic()
        try:
            nbytes = memfile.verify_chunks(opened.memory_fd, opened.memory_path,
                                           opened.record, ram)
            log.info("template memory verified: %d MiB read in %.3f s",
                     nbytes >> 20, time.monotonic() - t)
        except TemplateError as e:
            damaged(e)
        finally:
            opened.close()
    th = threading.Thread(target=run, name="template-verify", daemon=True)
    th.start()
    return th
