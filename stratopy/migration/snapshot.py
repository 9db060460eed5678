"""Taking a template: compose every component's state and write it atomically.

Runs on the device thread (QMP ``migrate``). Sequence:
  1. refuse what cannot be templated (status failed, VM untouched);
  2. setup: pause the vCPUs if running (STOP event);
  3. active: collect vCPU, VM and device state (vCPUs parked, so the state
     is consistent), write ``memory`` then ``state`` (state last: it is the
     commit point, see template_dir.py);
  4. completed: the VM stays paused. On failure: failed, temporary files
     removed, and a VM that was running is resumed (exactly as it was).
"""

from __future__ import annotations

import logging
import os
import time

from stratopy import config as cfgmod
from stratopy.errors import MigrationError, StratoError
from stratopy.kvm import uapi
from stratopy.machine import vcpu_state
from stratopy.arch.x86_64 import cpu
from stratopy.migration import facts, format as fmt, template_dir
from stratopy.migration.codec import to_plain

log = logging.getLogger(__name__)


def unsupported_reason(config: cfgmod.MachineConfig) -> str | None:
    """Why this configuration cannot be templated (SPEC §4), or None."""
    if config.mem_share:
        return "mem-share=on is not supported by snapshots"
    if config.mem_path:
        return "a memory backend file (-mem-path) is not supported by snapshots"
    if config.mem_prealloc:
        return "hugepage/preallocated memory is not supported by snapshots"
    for nd in config.netdevs:
        if nd.vhost:
            return f"vhost-net (netdev {nd.id}) is not supported by snapshots"
    for d in config.devices:
        if d.driver == cfgmod.BALLOON:
            # a template's memory must be what the guest sees: a balloon
            # has handed pages back to the host behind its RAM
            return f"virtio-balloon-device ({d.id}) is not supported by snapshots"
    return None


def parse_uri(uri: str) -> str:
    if not uri.startswith("file:") or len(uri) <= 5:
        raise MigrationError(f"unsupported migration uri '{uri}' (only file:DIR)")
    return uri[5:]


def collect(machine) -> tuple[dict, dict]:
    """(machine facts, component tree) of a paused machine."""
    kvm = machine.kvm
    has_xsave = bool(kvm.check_extension(uapi.KVM_CAP_XSAVE))
    has_xcrs = bool(kvm.check_extension(uapi.KVM_CAP_XCRS))
    msr_indices = kvm.msr_index_list()
    vcpus = [to_plain(vcpu_state.save_vcpu(v, msr_indices, has_xsave, has_xcrs))
             for v in machine.vcpus]
    slots = []
    for slot in machine.slots:
        entry = {"index": slot.index, "kind": slot.kind,
                 "driver": slot.config.driver if slot.config else "",
                 "id": slot.config.id if slot.config else ""}
        if slot.device is not None:
            entry["transport"] = to_plain(slot.transport.state())
            dev_state = slot.device.state()
            entry["device"] = to_plain(dev_state) if dev_state is not None else None
        slots.append(entry)
    components = {
        "vcpus": vcpus,
        "vm": to_plain(vcpu_state.save_vm(machine.vm)),
        "serial": to_plain(machine.serial.state()),
        "ged": to_plain(machine.ged.state()),
        "rtc": to_plain(machine.rtc.state()),
        "slots": slots,
    }
    # what the slots hold now: hot-replaced devices in, deleted ones out
    return facts.live_facts(machine), components


def take_template(machine, uri: str) -> None:
    """The body of QMP ``migrate``; raises MigrationError on failure."""
    from stratopy.machine.microvm import VmState

    mig = machine.migration
    directory = parse_uri(uri)
    created: list[str] = []
    mig.start()                                      # -> setup
    was_running = machine.state is VmState.RUNNING
    paused_here = False
    t0 = time.monotonic()
    try:
        reason = unsupported_reason(machine.config)
        if reason:
            raise MigrationError(reason)
        if machine.state not in (VmState.RUNNING, VmState.PAUSED):
            raise MigrationError(f"the VM is {machine.state.value}")
        created = template_dir.make_private_dir(directory)      # 0700 whatever the umask
        if was_running:
            machine.pause()                          # STOP event
            paused_here = True
        mig.activate()                               # -> active
        machine_facts, components = collect(machine)
        meta = fmt.host_meta(kvm_api_version=machine.kvm.api_version)
        meta["machine"] = machine_facts
        meta["cpuid"] = [cpu.cpuid_to_plain(c) for c in machine.vcpu_cpuids]
        template_dir.save_template(directory, machine.mem, meta, components)
    except (StratoError, OSError) as e:
        msg = str(e) if isinstance(e, StratoError) else \
            f"writing the template to {directory} failed: {e.strerror or e}"
        mig.fail(msg)
        for d in reversed(created):
            try:
                os.rmdir(d)   # only what we made, and only if it stayed empty
            except OSError:
                break
        if paused_here:
            machine.resume()
        raise MigrationError(msg) from None
    machine.timings["snapshot"] = time.monotonic() - t0
    mig.complete()
    log.info("template written to %s in %.3f s", directory, machine.timings["snapshot"])
