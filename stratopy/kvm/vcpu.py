"""A KVM vCPU fd: its kvm_run mapping, KVM_RUN, and its register state.

State accessors return/accept raw struct bytes so a snapshot stores exactly
what KVM gave and nothing is lost in translation; the snapshot module knows
the order in which they must be applied (see machine/vcpu_state.py).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from stratopy.errors import KvmError
from stratopy.kvm import uapi
from stratopy.kvm.exits import Interrupted, decode_exit
from stratopy.kvm.ioctl import ioctl, _libc_ioctl, _get_errno
from stratopy.logs import get_logger

log = get_logger(__name__)

_INTERRUPTED = Interrupted()


class Vcpu:
    """Owns a vCPU fd and its kvm_run mmap."""

    def __init__(self, vm, index: int, fd: int):
        self.vm = vm
        self.index = index
        self.fd = fd
        # The fd is handed over: if its kvm_run cannot be mapped, no Vcpu
        # exists for anyone to close() it, so close it here.
        try:
            size = vm.kvm.vcpu_mmap_size()
            self.run_mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException as e:
            os.close(fd)
            self.fd = -1
            if isinstance(e, OSError):
                raise KvmError(f"mmap of vCPU {index}'s kvm_run", e.errno or 0) from None
            raise
        self.run = uapi.kvm_run.from_buffer(self.run_mm)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.run = None
        try:
            self.run_mm.close()
        except BufferError:
            pass
        os.close(self.fd)
        self.fd = -1

    # --- running ------------------------------------------------------------
    def run_once(self):
        """One KVM_RUN; returns a typed exit (Interrupted on EINTR)."""
        ret = _libc_ioctl(self.fd, uapi.KVM_RUN, 0)
        if ret < 0:
            err = _get_errno()
            if err == errno.EINTR or err == errno.EAGAIN:
                self.run.immediate_exit = 0
                return _INTERRUPTED
            raise KvmError("KVM_RUN", err, f"vCPU {self.index}")
        return decode_exit(self.run, self.run_mm)

    def complete_in(self, data: bytes) -> None:
        """Give the guest the bytes of a pending IN or MMIO read."""
        run = self.run
        if run.exit_reason == uapi.KVM_EXIT_IO:
            off = run.io.data_offset
            self.run_mm[off:off + len(data)] = data
        else:
            ctypes.memmove(ctypes.addressof(run.mmio.data), data, min(len(data), 8))

    def kick_prepare(self) -> None:
        """Make the next (or current, with a signal) KVM_RUN return at once."""
        if self.run is not None:
            self.run.immediate_exit = 1

    # --- generic struct get/set -----------------------------------------------
    def _get(self, request: int, struct_type) -> bytes:
        s = struct_type()
        ioctl(self.fd, request, ctypes.byref(s))
        return bytes(s)

    def _set(self, request: int, struct_type, raw: bytes) -> None:
        if len(raw) != ctypes.sizeof(struct_type):
            raise KvmError(f"set {struct_type.__name__}", 0,
                           f"{len(raw)} bytes, expected {ctypes.sizeof(struct_type)}")
        s = struct_type.from_buffer_copy(raw)
        ioctl(self.fd, request, ctypes.byref(s))

    def get_regs(self) -> "uapi.kvm_regs":
        r = uapi.kvm_regs()
        ioctl(self.fd, uapi.KVM_GET_REGS, ctypes.byref(r))
        return r

    def set_regs(self, regs: "uapi.kvm_regs") -> None:
        ioctl(self.fd, uapi.KVM_SET_REGS, ctypes.byref(regs))

    def get_sregs(self) -> "uapi.kvm_sregs":
        s = uapi.kvm_sregs()
        ioctl(self.fd, uapi.KVM_GET_SREGS, ctypes.byref(s))
        return s

    def set_sregs(self, sregs: "uapi.kvm_sregs") -> None:
        ioctl(self.fd, uapi.KVM_SET_SREGS, ctypes.byref(sregs))

    def set_fpu(self, fpu: "uapi.kvm_fpu") -> None:
        ioctl(self.fd, uapi.KVM_SET_FPU, ctypes.byref(fpu))

    def get_lapic(self) -> "uapi.kvm_lapic_state":
        s = uapi.kvm_lapic_state()
        ioctl(self.fd, uapi.KVM_GET_LAPIC, ctypes.byref(s))
        return s

    def set_lapic(self, lapic: "uapi.kvm_lapic_state") -> None:
        ioctl(self.fd, uapi.KVM_SET_LAPIC, ctypes.byref(lapic))

    def set_cpuid(self, cpuid) -> None:
        ioctl(self.fd, uapi.KVM_SET_CPUID2, ctypes.byref(cpuid))

    # --- MSRs -------------------------------------------------------------------
    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """Read MSRs; ones the backend refuses are skipped (debug log, no error)."""
        out: list[tuple[int, int]] = []
        pending = list(indices)
        while pending:
            n = len(pending)
            msrs = uapi.kvm_msrs_n(n)()
            msrs.nmsrs = n
            for i, idx in enumerate(pending):
                msrs.entries[i].index = idx
            got = ioctl(self.fd, uapi.KVM_GET_MSRS, ctypes.byref(msrs))
            out.extend((msrs.entries[i].index, msrs.entries[i].data) for i in range(got))
            if got < n:
                log.debug("vCPU %d: MSR %#x not readable here, skipped", self.index, pending[got])
                pending = pending[got + 1:]
            else:
                break
        return out

    def set_msrs(self, entries: list[tuple[int, int]]) -> int:
        """Write MSRs; ones the backend refuses are skipped (debug log). Returns count set."""
        done = 0
        pending = list(entries)
        while pending:
            n = len(pending)
            msrs = uapi.kvm_msrs_n(n)()
            msrs.nmsrs = n
            for i, (idx, val) in enumerate(pending):
                msrs.entries[i].index = idx
                msrs.entries[i].data = val
            got = ioctl(self.fd, uapi.KVM_SET_MSRS, ctypes.byref(msrs))
            done += got
            if got < n:
                log.debug("vCPU %d: MSR %#x not writable here, skipped", self.index, pending[got][0])
                pending = pending[got + 1:]
            else:
                break
        return done

    def translate(self, gva: int) -> int | None:
        """Guest-virtual to guest-physical through the vCPU's page tables."""
        tr = uapi.kvm_translation(linear_address=gva)
        try:
            ioctl(self.fd, uapi.KVM_TRANSLATE, ctypes.byref(tr))
        except KvmError:
            return None
        return tr.physical_address if tr.valid else None
