"""Kernel ABI for /dev/kvm on x86_64: struct layouts, constants, ioctl numbers.

The one namespace for KVM's layouts: ``from stratopy.kvm import uapi;
uapi.X``. The definitions live in three files of one header section each
(kept under ~600 lines): :mod:`stratopy.kvm.uapi_asm` (``<asm/kvm.h>``),
:mod:`stratopy.kvm.uapi_linux` (``<linux/kvm.h>`` structs and constants),
:mod:`stratopy.kvm.uapi_ioctls` (ioctl numbers, ``IOCTL_NAMES``, the
flexible-array factories); this module gathers them. Other drivers' layouts
(vhost: stratopy.devices.virtio.vhost_uapi) are not KVM's and live apart.  Names are exactly those of
``<linux/kvm.h>`` / ``<asm/kvm.h>`` (Linux 6.x uapi).  Every size, offset and
ioctl number here is pinned against the real header by
``tests/unit/test_kvm_uapi.py`` (and re-checked live with ``kvm_abi.c`` when a
compiler is available).

Nested anonymous C structs get their own classes named ``<outer>_<member>``
(e.g. ``kvm_vcpu_events_exception``, ``kvm_run_io``); anonymous unions are
exposed through ``_anonymous_`` so C-style access (``run.io.port``,
``run.system_event.data``, ``level.irq``) works.

Variable-length structs (C flexible array members).  The plain class is the
*header* only; its sizeof is what the kernel puts in the ioctl number
(``sizeof(struct kvm_msrs) == 8``).  To get a buffer with room for ``n``
entries use the factories (cached per ``n``, the only code in this module):

    kvm_msrs_n(n)          nmsrs, pad, entries[n] of kvm_msr_entry
    kvm_msr_list_n(n)      nmsrs, indices[n] of u32
    kvm_cpuid2_n(n)        nent, padding, entries[n] of kvm_cpuid_entry2
    kvm_irq_routing_n(n)   nr, flags, entries[n] of kvm_irq_routing_entry

and pass ``ctypes.byref(kvm_msrs_n(n)(nmsrs=n))`` with the header's ioctl.

XSAVE: ``kvm_xsave`` is the legacy fixed 4096-byte area (KVM_GET/SET_XSAVE).
With KVM_CAP_XSAVE2, ``KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`` *on the VM fd*
returns the real size (>= 4096); allocate that many bytes yourself, e.g.
``buf = (ctypes.c_uint32 * (size // 4))()`` and call
``ioctl(vcpu, KVM_GET_XSAVE2, ctypes.byref(buf))``; KVM_SET_XSAVE then reads
that many bytes from the same kind of buffer.  (The ioctl number still encodes
sizeof(struct kvm_xsave) == 4096.)
"""


from __future__ import annotations

from stratopy.kvm.uapi_asm import *  # noqa: F401,F403
from stratopy.kvm.uapi_linux import *  # noqa: F401,F403
from stratopy.kvm.uapi_ioctls import *  # noqa: F401,F403
