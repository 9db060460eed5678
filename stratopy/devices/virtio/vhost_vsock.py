"""virtio-vsock whose data path is the kernel's vhost-vsock
(``-device vhost-vsock-device,id=,guest-cid=[,vhostfd=]``, what Kata starts).

The rx (0) and tx (1) queues are the kernel's: on activation (DRIVER_OK)
the device hands them over with the vhost ioctl sequence StratoVirt and QEMU
use (stratopy.devices.virtio.vhost.VhostVsock):

    VHOST_SET_FEATURES   the features the driver acked
    VHOST_SET_MEM_TABLE  every guest RAM region: gpa, size, userspace address
    per queue 0, 1:
      VHOST_SET_VRING_NUM   the size the driver chose
      VHOST_SET_VRING_ADDR  userspace addresses of desc, used, avail
      VHOST_SET_VRING_BASE  0, or the template's last_avail_idx
      VHOST_SET_VRING_KICK  the slot's ioeventfd of that queue (the guest's
                            QueueNotify write wakes the kernel, not us)
      VHOST_SET_VRING_CALL  the backend's call eventfd of that queue (the
                            monitor raises the interrupt: see vhost.py)
    VHOST_VSOCK_SET_GUEST_CID, VHOST_VSOCK_SET_RUNNING 1

The event queue (2) stays here: the only event, TRANSPORT_RESET, is sent as
the userspace device sends it (stratopy.devices.virtio.vsock).

Pause and templates. While the VM is paused the kernel must not write guest
RAM either (a paused VM's memory is what a template saves): ``pause`` stops
the kernel's data path (SET_RUNNING 0: connections stay, packets wait in the
kernel), ``resume`` starts it again. ``state()`` (taken while paused) reads
each kernel queue's last_avail_idx (VHOST_GET_VRING_BASE), as StratoVirt's
vhost-vsock does. A clone restores them (SET_VRING_BASE) on its own
vhost-vsock fd and cid; its connections did not come along, so the guest is
sent TRANSPORT_RESET (it drops its sockets and re-reads guest_cid), as
StratoVirt does on restore and as the userspace device here does. The
source VM keeps its connections (its data path was only stopped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from stratopy.devices.virtio.device import VirtioDevice
from stratopy.devices.virtio.vhost import KERNEL_QUEUES
from stratopy.devices.virtio.vsock import (
    EVENT_QUEUE, EVENT_QUEUE_SIZE, MAX_GUEST_CID, MIN_GUEST_CID, QUEUE_SIZE,
    VIRTIO_ID_VSOCK, VsockShared)
from stratopy.errors import DeviceError, TemplateError

#: device-specific feature bits the transport can offer (virtio-mmio: 0..23)
DEVICE_FEATURE_BITS = (1 << 24) - 1


@dataclass
class VhostVsockState:
    """A template's vhost-vsock: the kernel queues' positions and the
    negotiation (the cid stays the command line's: TRANSPORT_RESET makes
    the guest read it again)."""

    guest_cid: int = 0
    acked_features: int = 0
    last_avail_idx: list[int] = field(default_factory=lambda: [0, 0])


class VhostVsockDevice(VsockShared, VirtioDevice):
    device_type = VIRTIO_ID_VSOCK
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE)
    label = "vhost-vsock"
    #: the queues whose ioeventfds are the kernel's (the machine must not
    #: read them): it fills ``kick_fds`` and reads ``backend.call_fds``
    kernel_queues = KERNEL_QUEUES

    def __init__(self, guest_cid: int, backend) -> None:
        super().__init__()
        self._set_guest_cid(guest_cid)
        self.backend = backend
        # what the kernel offers, less what the transport cannot (VERSION_1
        # is always offered by the transport: the kernel must take it)
        self.avail_features = backend.features & DEVICE_FEATURE_BITS
        self.kick_fds: dict[int, int] = {}       # set by the machine
        self.bases = [0] * len(KERNEL_QUEUES)    # next activation's SET_VRING_BASE
        self.running = False                      # the kernel's data path is on
        self.paused = False                       # the VM is paused: keep it off
        self.reset_event_pending = False

    # --- lifecycle -------------------------------------------------------------
    def activate(self, mem, queues: list, signal_used) -> None:
        super().activate(mem, queues, signal_used)
        b = self.backend
        for q in KERNEL_QUEUES:
            if not queues[q].ready:
                # the kernel serves both or the device cannot work (StratoVirt:
                # check_queue_enabled); the transport marks it NEEDS_RESET
                raise DeviceError(f"queue {q} is not ready: the kernel serves rx and tx")
        b.set_features(self.acked_features)
        b.set_mem_table([(r.gpa, r.size, r.host_addr) for r in mem.regions])
        for i, q in enumerate(KERNEL_QUEUES):
            queue = queues[q]
            n = queue.size
            b.set_vring_num(q, n)
            b.set_vring_addr(q, self._hva(queue.desc_table, 16 * n),
                             self._hva(queue.used_ring, 6 + 8 * n),
                             self._hva(queue.avail_ring, 6 + 2 * n))
            b.set_vring_base(q, self.bases[i])
            b.set_vring_kick(q, self.kick_fds[q])
            b.set_vring_call(q, b.call_fds[i])
        b.set_guest_cid(self.guest_cid)
        if not self.paused:
            b.set_running(True)
            self.running = True
        self._send_reset_event()

    def _hva(self, gpa: int, length: int) -> int:
        """The userspace address of guest range [gpa, gpa+length): the
        kernel reads the rings there."""
        for r in self.mem.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.host_addr + (gpa - r.gpa)
        raise DeviceError(f"ring at {gpa:#x}+{length:#x} is not inside one RAM region")

    def reset(self) -> None:
        # the driver forgot the queues: the kernel stops using them
        self._stop()
        super().reset()
        self.bases = [0] * len(KERNEL_QUEUES)
        self.reset_event_pending = False

    def _stop(self) -> None:
        if self.running:
            self.running = False
            self.backend.set_running(False)

    def pause(self) -> None:
        """The VM pauses: the kernel stops touching guest RAM."""
        self.paused = True
        self._stop()

    def resume(self) -> None:
        self.paused = False
        if self.activated and not self.broken and not self.running:
            self.backend.set_running(True)
            self.running = True

    def process_queue(self, index: int) -> None:
        if index == EVENT_QUEUE:
            self._send_reset_event()
        elif index in self.kick_fds:
            # a kick the monitor saw (a restore looks at every queue once):
            # it is the kernel's
            os.eventfd_write(self.kick_fds[index], 1)

    # --- snapshot ----------------------------------------------------------------
    def state(self) -> VhostVsockState:
        """Taken on a paused VM: the kernel is stopped, its queue positions read."""
        if self.activated and not self.broken:
            self._stop()
            self.bases = [self.backend.get_vring_base(q) for q in KERNEL_QUEUES]
        return VhostVsockState(guest_cid=self.guest_cid, acked_features=self.acked_features,
                               last_avail_idx=list(self.bases))

    def restore(self, state: VhostVsockState) -> None:
        if not isinstance(state, VhostVsockState):
            raise TemplateError(f"vhost-vsock state has the wrong type {type(state).__name__}")
        cid = state.guest_cid
        if type(cid) is not int or not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
            raise TemplateError(f"vhost-vsock state field guest_cid out of range: {cid!r}")
        bases = state.last_avail_idx
        if not isinstance(bases, list) or len(bases) != len(KERNEL_QUEUES):
            raise TemplateError(f"vhost-vsock state field last_avail_idx is not a list of "
                                f"{len(KERNEL_QUEUES)}: {bases!r}")
        for i, v in enumerate(bases):
            if type(v) is not int or not 0 <= v <= 0xFFFF:
                raise TemplateError(f"vhost-vsock state field last_avail_idx[{i}] out of "
                                    f"range: {v!r}")
        self.acked_features = self._check_acked(state.acked_features, self.avail_features)
        self.bases = list(bases)
        self.reset_event_pending = True
