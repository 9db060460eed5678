"""Which KVM implementation serves /dev/kvm, and what the guest must be told.

On hardware KVM (kvm_intel / kvm_amd) CPUID set through KVM_SET_CPUID2 is
what the guest sees. On a ``kvm_pvm`` host running an ordinary guest, guest
kernel code goes through KVM's instruction emulator, CPUID is not
intercepted (the guest sees the host's real bits) and the emulator lacks a
few instructions. The only way to keep the guest away from them is the
kernel command line, so on PVM the monitor appends ``PVM_CMDLINE`` itself,
the same way it appends ``virtio_mmio.device=`` (users' command lines boot
unchanged). See docs/architecture.md and shared pvm-guest notes.
"""

from __future__ import annotations

import enum
import os

# Each entry: (kernel parameter, why). Confirmed by experiment on kvm_pvm
# with Linux 6.1; harmless to keep even if a kernel ignores one.
PVM_CMDLINE_TABLE: tuple[tuple[str, str], ...] = (
    # noxsave: task switches then save only FXSAVE state (x87, XMM0-15), yet
    # guest user code runs with the host's XCR0, so YMM upper halves, ZMM and
    # k masks are shared by all guest processes. Exposed: any program that
    # picks AVX at run time -- glibc, Go's runtime, OpenSSL, hand-written
    # SIMD -- where the guest's CPUID reports OSXSAVE=1; where it reports 0
    # (CPUID faulting, as here) only code that skips that check. Workaround
    # in users' images: GLIBC_TUNABLES (stratopy.guest's images export
    # guest.GLIBC_TUNABLES_VECTOR_SAFE), GODEBUG=cpu.avx=off,cpu.avx2=off,
    # OPENSSL_ia32cap. docs/architecture.md ("noxsave and the AVX state").
    ("noxsave", "XSAVE/XRSTOR: 'emulation failure' on XRSTOR in the kernel; "
                "leaves guest processes' AVX state unsaved (see above)"),
    ("clearcpuid=popcnt,rdrand,rdseed,smap,erms,fsrm",
     "POPCNT, RDRAND, RDSEED, SMAP (clac/stac), ERMS/FSRM (rep movsb paths) "
     "are not emulated"),
    ("rcupdate.rcu_cpu_stall_suppress=1",
     "a restored clone sees the host's TSC jump forward (PVM does not offset "
     "it), RCU reports a stall and sends NMI-backtrace IPIs through KVM's PV "
     "hypercall, which the emulator faults on from an interrupt (guest panic)"),
)


class Backend(enum.Enum):
    HARDWARE = "hardware"   # kvm_intel / kvm_amd
    PVM = "pvm"             # kvm_pvm running a non-PVM guest


def detect(sys_module: str = "/sys/module") -> Backend:
    """PVM when kvm_pvm is loaded and no hardware backend is.

    ``STRATOPY_KVM_BACKEND=pvm|hardware`` overrides the probe.
    """
    forced = os.environ.get("STRATOPY_KVM_BACKEND")
    if forced:
        return Backend(forced)
    def loaded(name: str) -> bool:
        return os.path.isdir(os.path.join(sys_module, name))
    if loaded("kvm_pvm") and not (loaded("kvm_intel") or loaded("kvm_amd")):
        return Backend.PVM
    return Backend.HARDWARE


def extra_cmdline(backend: Backend) -> str:
    """Kernel parameters the monitor must append for this backend."""
    if backend is Backend.PVM:
        return " ".join(p for p, _ in PVM_CMDLINE_TABLE)
    return ""
