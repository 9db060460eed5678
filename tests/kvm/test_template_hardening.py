"""Templates against crashes, damage, forgeries and odd files (issue 9), with
the freestanding memcheck/counter guests: every restore here is real.

What each test proves is in its docstring. Every wait is bounded; the
``start_vm`` fixture kills and reaps every VM.
"""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from stratopy.migration import format as fmt
from tests import harness
from tests.kvm.test_guests import (TIMEOUT, base_args, check_line, expected_sum,
                                   exited_cleanly, take_template)

pytestmark = pytest.mark.kvm

PAGES = 8 * 256                          # memcheck mib=8
DATA_GPA = 0x1000000                     # memcheck fills from 16 MiB


def memcheck_args(guests, pattern: int) -> list[str]:
    return base_args(guests["memcheck"], append=f"pattern={pattern:#x} mib=8 every=30")


def make_template(guests, start_vm, tpl: str, pattern: int, env=None) -> None:
    vm = start_vm(memcheck_args(guests, pattern), qmp=True, env=env)
    ok, s, _ = check_line(vm)
    assert ok == 1 and s == expected_sum(pattern, PAGES)
    take_template(vm, tpl)
    vm.kill()


def restored_sum(guests, start_vm, tpl: str, pattern: int, extra: str = "") -> int:
    """Restore a clone from ``tpl`` and return the checksum its RAM verifies to."""
    clone = start_vm(memcheck_args(guests, pattern) + ["-incoming", f"file:{tpl}{extra}"],
                     qmp=True)
    clone.send("x")
    ok, s, _ = check_line(clone)
    assert ok == 1, clone.output[-500:]
    assert "FILLED" not in clone.output, "the clone rebooted"
    clone.send("q")
    clone.wait_for(r"EXIT", TIMEOUT)
    exited_cleanly(clone)
    return s


@pytest.mark.parametrize("step, survivor", [("memory-written", "old"),
                                            ("state-written", "old"),
                                            ("committed", "new")])
def test_sigkilled_retemplate_keeps_a_usable_template(guests, start_vm, tmp_path, step,
                                                      survivor):
    """A monitor SIGKILLed while re-templating DIR leaves a template that
    restores: the old one up to the commit, the new one from it on. The next
    `migrate` into DIR removes the RAM-sized leftovers."""
    old, new = 0x1111111111111111, 0x2222222222222222
    tpl = str(tmp_path / "tpl")
    make_template(guests, start_vm, tpl, old)
    vm = start_vm(memcheck_args(guests, new), qmp=True,
                  env={"STRATOPY_TEMPLATE_CRASH_AT": step})
    check_line(vm)
    q = vm.qmp(TIMEOUT)
    try:
        try:
            q.cmd("migrate", uri=f"file:{tpl}")
        except (OSError, EOFError, ConnectionError, AssertionError):
            pass                          # the monitor died under the command
    finally:
        q.close()
    assert vm.wait_exit(TIMEOUT) == -9
    want = old if survivor == "old" else new
    assert restored_sum(guests, start_vm, tpl, want) == expected_sum(want, PAGES)
    make_template(guests, start_vm, tpl, new)
    assert sorted(os.listdir(tpl)) == ["memory", "state"]


def _flip_data_byte(tpl: str) -> None:
    path = os.path.join(tpl, "memory")
    with open(path, "r+b") as f:
        f.seek(4096 + DATA_GPA + 4096 * 9 + 3)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))


def test_flipped_byte_never_runs_silently(guests, start_vm, tmp_path):
    """A byte flipped in a written page of `memory`: verify=full refuses it
    before the guest runs; the default (lazy) check stops the running clone
    with one error line naming the chunk and exit code 1."""
    pattern = 0x3333333333333333
    tpl = str(tmp_path / "tpl")
    make_template(guests, start_vm, tpl, pattern)
    _flip_data_byte(tpl)
    harness.refused(memcheck_args(guests, pattern) + ["-incoming", f"file:{tpl},verify=full"],
                    "memory file damaged", "guest address 0x1000000")
    clone = start_vm(memcheck_args(guests, pattern) + ["-incoming", f"file:{tpl}"], qmp=False)
    assert clone.wait_exit(TIMEOUT) == 1
    lines = clone.stderr.strip().splitlines()
    assert len(lines) == 1 and "memory file damaged" in lines[0], clone.stderr
    assert "guest address 0x1000000" in lines[0]


def test_verify_full_accepts_a_good_template(guests, start_vm, tmp_path):
    pattern = 0x4444444444444444
    tpl = str(tmp_path / "tpl")
    make_template(guests, start_vm, tpl, pattern)
    assert restored_sum(guests, start_vm, tpl, pattern, ",verify=full") == \
        expected_sum(pattern, PAGES)


def _forge(src: str, dst: str, edit) -> str:
    """A copy of template ``src`` whose state is edited by ``edit(meta,
    components)`` and re-hashed: a forgery with a valid checksum."""
    os.makedirs(dst)
    os.link(os.path.join(src, "memory"), os.path.join(dst, "memory"))
    meta, comps = fmt.read_state(os.path.join(src, "state"), None, None)
    edit(meta, comps)
    with open(os.path.join(dst, "state"), "wb") as f:
        f.write(fmt.encode_state(meta, comps))
    return dst


def _set_blob(comps, path, offset, data):
    import base64
    node = comps
    for k in path[:-1]:
        node = node[k]
    raw = bytearray(base64.b64decode(node[path[-1]]))
    raw[offset:offset + len(data)] = data
    node[path[-1]] = base64.b64encode(bytes(raw)).decode()


def _efer(meta, comps):
    import ctypes
    from stratopy.kvm import uapi
    _set_blob(comps, ["vcpus", 0, "sregs"], uapi.kvm_sregs.efer.offset,
              b"\xff" * ctypes.sizeof(ctypes.c_uint64))


def _msr(meta, comps):
    comps["vcpus"][0]["msr_indices"][0] = 0xDEADBEEF


def _msr_value(meta, comps):
    v = comps["vcpus"][0]
    i = v["msr_indices"].index(0x277)               # IA32_PAT: invalid memory types
    v["msr_values"][i] = (1 << 64) - 1


def _lapic(meta, comps):
    _set_blob(comps, ["vcpus", 0, "lapic"], 0, b"\xff" * 1024)


def _pit(meta, comps):
    _set_blob(comps, ["vm", "pit"], 0, b"\xff" * 64)


def _queue(meta, comps):
    comps["devices"]["virtio"][0]["transport"]["queues"][0]["size"] = 3


def _cpus(meta, comps):
    meta["machine"]["cpus"] = 1.0


def _rip(meta, comps):
    import struct
    from stratopy.kvm import uapi
    _set_blob(comps, ["vcpus", 0, "regs"], uapi.kvm_regs.rip.offset,
              struct.pack("<Q", 0x8000_0000_0000_0000))


@pytest.mark.parametrize("edit, needle", [
    (_efer, "vcpus[0].sregs.efer"), (_msr, "MSR 0xdeadbeef"),
    (_msr_value, "MSR 0x277 (IA32_PAT)"), (_lapic, "vcpus[0].lapic"),
    (_pit, "vm.pit"), (_queue, "devices.virtio[0].transport.queues[0].size"),
    (_cpus, "vCPU count"), (_rip, "vcpus[0].regs.rip"),
])
def test_rehashed_forgeries_are_refused(guests, start_vm, tmp_path, edit, needle):
    """A state with a valid checksum whose values make no sense is refused
    before the guest runs, naming the field."""
    pattern = 0x5555555555555555
    tpl = str(tmp_path / "tpl")
    make_template(guests, start_vm, tpl, pattern)
    forged = _forge(tpl, str(tmp_path / "forged"), edit)
    harness.refused(memcheck_args(guests, pattern) + ["-incoming", f"file:{forged}"], needle)


def test_template_cpuid_feature_missing_on_this_host_is_refused(guests, start_vm, tmp_path):
    """The template carries each vCPU's CPUID; a template whose guest saw a
    feature this host's KVM does not offer is refused, naming it."""
    from stratopy.arch.x86_64 import cpu
    pattern = 0x6666666666666666
    tpl = str(tmp_path / "tpl")
    make_template(guests, start_vm, tpl, pattern)
    _, comps = fmt.read_state(os.path.join(tpl, "state"), None, None)
    leaf7 = next(e for e in comps["vcpus"][0]["cpuid"] if e[0] == 7 and e[1] == 0)
    bit = next(b for b in range(32) if not leaf7[4] >> b & 1)        # EBX: absent here

    def add_feature(meta, comps):
        for e in comps["vcpus"][0]["cpuid"]:
            if e[0] == 7 and e[1] == 0:
                e[4] |= 1 << bit
    forged = _forge(tpl, str(tmp_path / "forged"), add_feature)
    name = cpu.FEATURE_NAMES[(7, "ebx")].get(bit, "feature")
    harness.refused(memcheck_args(guests, pattern) + ["-incoming", f"file:{forged}"],
                    "lacks a CPU feature", f"{name} (CPUID leaf 0x7.0 ebx bit {bit})")


@pytest.mark.parametrize("which", ["state", "memory"])
def test_fifo_in_the_template_is_refused_at_once(guests, start_vm, tmp_path, which):
    pattern = 0x7777777777777777
    tpl = str(tmp_path / "tpl")
    make_template(guests, start_vm, tpl, pattern)
    os.unlink(os.path.join(tpl, which))
    os.mkfifo(os.path.join(tpl, which))
    harness.refused(memcheck_args(guests, pattern) + ["-incoming", f"file:{tpl}"],
                    f"{which}", "is a FIFO", timeout=TIMEOUT)


def test_template_is_private_under_umask_000(guests, start_vm, tmp_path):
    old = os.umask(0)
    try:
        vm = start_vm(memcheck_args(guests, 1), qmp=True)
    finally:
        os.umask(old)
    check_line(vm)
    tpl = tmp_path / "new" / "tpl"
    take_template(vm, str(tpl))
    vm.kill()
    for d in (tmp_path / "new", tpl):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for name in ("state", "memory"):
        assert stat.S_IMODE(os.stat(tpl / name).st_mode) == 0o600
    shutil.rmtree(tmp_path / "new")


def test_restored_vcpus_get_the_templates_cpuid(guests, start_vm, tmp_path):
    """A clone's vCPUs get the CPUID saved in the template, not this host's:
    a template whose guest saw one feature fewer than this host offers
    restores (nothing is missing), and KVM_GET_CPUID2 on the restored vCPU
    shows the template's leaf, without the feature. Built in-process (no
    guest runs) so the vCPU can be asked."""
    import ctypes
    from stratopy.arch.x86_64 import cpu
    from stratopy.cli_parse import parse_args
    from stratopy.kvm import uapi
    from stratopy.kvm.ioctl import ioctl
    from stratopy import builder
    from stratopy.machine.microvm import MicroVm
    pattern = 0x8888888888888888
    tpl = str(tmp_path / "tpl")
    make_template(guests, start_vm, tpl, pattern)
    _, comps = fmt.read_state(os.path.join(tpl, "state"), None, None)
    leaf1 = next(e for e in comps["vcpus"][0]["cpuid"] if e[0] == 1 and e[1] == 0)
    mask = cpu.FEATURE_REGS[(1, 0)]["ecx"]
    bit = next(b for b in range(32) if leaf1[5] >> b & 1 and mask >> b & 1)
    assert bit != 31

    def drop_feature(meta, comps):
        for e in comps["vcpus"][0]["cpuid"]:
            if e[0] == 1 and e[1] == 0:
                e[5] &= ~(1 << bit)
    forged = _forge(tpl, str(tmp_path / "forged"), drop_feature)
    m = MicroVm(parse_args(memcheck_args(guests, pattern) + ["-incoming", f"file:{forged}"]))
    try:
        builder.build_from_template(m)
        got = uapi.kvm_cpuid2_n(cpu.MAX_CPUID_ENTRIES)()
        got.nent = cpu.MAX_CPUID_ENTRIES
        ioctl(m.vcpus[0].fd, uapi.KVM_GET_CPUID2, ctypes.byref(got))
        ecx = next(e.ecx for e in got.entries[:got.nent] if e.function == 1)
        assert not ecx >> bit & 1, f"the restored vCPU has this host's CPUID bit {bit}"
        host = next(e.ecx for e in m.kvm.supported_cpuid().entries[:m.kvm.supported_cpuid().nent]
                    if e.function == 1)
        assert host >> bit & 1
    finally:
        m.teardown()
