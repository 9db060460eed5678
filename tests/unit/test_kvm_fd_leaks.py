"""The KVM wrappers close the fd they were handed when their set-up fails.

No /dev/kvm needed: the failing step is made to fail for real (an ioctl on a
regular file is ENOTTY, a pipe cannot be mapped).
"""

from __future__ import annotations

import errno
import os

import pytest

from stratopy.errors import KvmError
from stratopy.kvm import system
from stratopy.kvm.system import Kvm
from stratopy.kvm.vcpu import Vcpu


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


def test_kvm_closes_its_fd_when_get_api_version_fails(tmp_path):
    not_kvm = tmp_path / "not-kvm"
    not_kvm.write_bytes(b"")
    before = open_fds()
    with pytest.raises(KvmError, match="KVM_GET_API_VERSION"):
        Kvm(str(not_kvm))                 # KVM_GET_API_VERSION: ENOTTY
    assert open_fds() == before


def test_kvm_closes_its_fd_on_a_wrong_api_version(tmp_path, monkeypatch):
    not_kvm = tmp_path / "not-kvm"
    not_kvm.write_bytes(b"")
    monkeypatch.setattr(system, "ioctl", lambda fd, req, *a: 11)
    before = open_fds()
    with pytest.raises(KvmError, match="API version 11"):
        Kvm(str(not_kvm))
    assert open_fds() == before


class _FakeKvm:
    def __init__(self, size_or_error):
        self.result = size_or_error

    def vcpu_mmap_size(self) -> int:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class _FakeVm:
    def __init__(self, kvm):
        self.kvm = kvm


def test_vcpu_closes_its_fd_when_kvm_run_cannot_be_mapped():
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(KvmError, match="kvm_run") as info:
        Vcpu(_FakeVm(_FakeKvm(4096)), 3, r)   # a shared writable mmap of a pipe's read end
    assert info.value.errno in (errno.EACCES, errno.ENODEV)
    assert_closed(r)


def test_vcpu_closes_its_fd_when_the_mmap_size_is_unknown():
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(KvmError, match="KVM_GET_VCPU_MMAP_SIZE"):
        Vcpu(_FakeVm(_FakeKvm(KvmError("KVM_GET_VCPU_MMAP_SIZE", errno.EINVAL))), 0, r)
    assert_closed(r)
