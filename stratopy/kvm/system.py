"""/dev/kvm: the system fd, top of the Kvm -> Vm -> Vcpu hierarchy."""

from __future__ import annotations

import ctypes
import os

from stratopy.errors import KvmError
from stratopy.kvm import uapi
from stratopy.kvm.ioctl import ioctl

MAX_CPUID_ENTRIES = 256
MAX_MSR_INDICES = 1024


class Kvm:
    """Owns the /dev/kvm fd. Use as a context manager or call close()."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"open {path}", e.errno) from None
        try:
            version = ioctl(self.fd, uapi.KVM_GET_API_VERSION)
            if version != uapi.KVM_API_VERSION:
                raise KvmError("KVM_GET_API_VERSION", 0,
                               f"API version {version}, stratopy needs {uapi.KVM_API_VERSION}")
        except BaseException:
            # No Kvm object is returned to close it: the fd is ours to close.
            os.close(self.fd)
            self.fd = -1
            raise
        self.api_version = version
        self._cpuid = None
        self._msr_indices: list[int] | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE)

    def max_vcpus(self) -> int:
        return self.check_extension(uapi.KVM_CAP_MAX_VCPUS) or \
            self.check_extension(uapi.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 struct (cached; copy before editing)."""
        if self._cpuid is None:
            cpuid = uapi.kvm_cpuid2_n(MAX_CPUID_ENTRIES)()
            cpuid.nent = MAX_CPUID_ENTRIES
            ioctl(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, ctypes.byref(cpuid))
            self._cpuid = cpuid
        return self._cpuid

    def msr_index_list(self) -> list[int]:
        """Every MSR KVM_GET_MSR_INDEX_LIST says a vCPU has (what a snapshot saves)."""
        if self._msr_indices is None:
            lst = uapi.kvm_msr_list_n(MAX_MSR_INDICES)()
            lst.nmsrs = MAX_MSR_INDICES
            ioctl(self.fd, uapi.KVM_GET_MSR_INDEX_LIST, ctypes.byref(lst))
            self._msr_indices = list(lst.indices[:lst.nmsrs])
        return self._msr_indices

    def create_vm(self):
        from stratopy.kvm.vm import Vm

        return Vm(self, ioctl(self.fd, uapi.KVM_CREATE_VM, 0))
