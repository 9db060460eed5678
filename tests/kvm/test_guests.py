"""Fast KVM tests: stratopy boots the tiny freestanding guests of tests/guests.

Each guest is a few hundred instructions of ring-0 code that reports on the
serial port and ends the VM with an i8042 reset (port 0x64 <- 0xFE), so each
test runs in about a second even where guest kernel code is emulated (PVM).
Every VM is a ``python -m stratopy`` subprocess (tests.harness.Vm); every wait
has a timeout and the ``start_vm`` fixture kills and reaps every VM.

What each test proves is in its docstring.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time

import pytest

pytestmark = pytest.mark.kvm

TIMEOUT = 30.0      # every wait is bounded by this (seconds)

MiB = 1 << 20
COUNTER_ADDR = 0x300000
GOLDEN = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1
HEX = r"0x([0-9a-f]{16})"


def base_args(kernel: str, mem: str = "64", append: str | None = None) -> list[str]:
    args = ["-kernel", kernel, "-m", mem, "-serial", "stdio"]
    if append is not None:
        args += ["-append", append]
    return args


def exited_cleanly(vm) -> None:
    rc = vm.wait_exit(TIMEOUT)
    assert rc == 0, f"stratopy exited {rc}; stderr: {vm.stderr[-2000:]}"


# --- serial_hello ------------------------------------------------------------------
def test_serial_hello_echo(guests, start_vm):
    """ELF loading at the physical address, the 64-bit entry contract, 8250
    output and polled input, and the i8042 reset as a clean exit (0)."""
    vm = start_vm(base_args(guests["serial_hello"]))
    vm.wait_for(r"HELLO FROM GUEST\r?\n", TIMEOUT)
    vm.send("stratopy says hi 42\n")
    vm.wait_for(r"ECHO:stratopy says hi 42\r?\n", TIMEOUT)
    vm.wait_for(r"EXIT", TIMEOUT)
    exited_cleanly(vm)


# --- triple_fault --------------------------------------------------------------------
def test_triple_fault_ends_the_vm(guests, start_vm):
    """A triple fault (KVM_EXIT_SHUTDOWN) ends the VM with a SHUTDOWN event
    and exit 0, instead of hanging or rebooting the guest. Started with -S so
    the QMP client is connected before the guest runs."""
    vm = start_vm(base_args(guests["triple_fault"]) + ["-S"], qmp=True)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("query-status")["return"]["status"] == "paused"
        assert q.cmd("cont") == {"return": {}}
        vm.wait_for(r"TRIPLE FAULT NOW", TIMEOUT)
        ev = q.wait_event("SHUTDOWN", TIMEOUT)
        assert ev["data"]["guest"] is True, ev
    finally:
        q.close()
    exited_cleanly(vm)
    assert "STILL ALIVE" not in vm.output
    assert vm.output.count("TRIPLE FAULT NOW") == 1, "the guest was restarted"


# --- timer_irq ---------------------------------------------------------------------
@pytest.mark.parametrize("append,mode,source", [
    ("", None, "lapic"),                    # x2APIC MSRs when CPUID offers x2APIC
    ("apic=xapic", "xapic", "lapic"),       # xAPIC MMIO at 0xfee00000
    ("timer=pit", None, "pit"),             # in-kernel PIT -> IOAPIC -> LAPIC
])
def test_timer_interrupts(guests, start_vm, append, mode, source):
    """The in-kernel irqchip delivers periodic interrupts to a `sti; hlt`
    loop: LAPIC timer (x2APIC and xAPIC programming) and the PIT through the
    IOAPIC. Ten interrupts, then TICKS=10 and a clean exit."""
    vm = start_vm(base_args(guests["timer_irq"], append=append))
    m = vm.wait_for(r"APIC MODE=(\w+)\r?\n", TIMEOUT)
    if mode:
        assert m.group(1) == mode
    vm.wait_for(rf"SOURCE={source}", TIMEOUT)
    vm.wait_for(r"TICKS=10\r?\n", TIMEOUT)
    exited_cleanly(vm)
    assert "EXCEPTION" not in vm.output and "UNEXPECTED-IRQ" not in vm.output, vm.output


# --- virtio_blk ----------------------------------------------------------------------
SECTOR = 512
WRITE_PATTERN = bytes((i & 0xFF) ^ 0x5A for i in range(SECTOR))


def make_image(path: str, size: int = MiB) -> bytes:
    data = bytes(hashlib.sha256(str(i).encode()).digest()[i % 32] for i in range(SECTOR))
    data += bytes((i * 7 + 3) & 0xFF for i in range(size - SECTOR))
    with open(path, "wb") as f:
        f.write(data)
    return data


def blk_args(kernel: str, img: str, readonly: bool) -> list[str]:
    # acpi=off: this guest has no ACPI and finds its transport in the
    # virtio_mmio.device= entry the monitor adds only for such guests
    return base_args(kernel, append="acpi=off") + [
        "-drive", f"file={img},id=d0,readonly={'on' if readonly else 'off'}",
        "-device", "virtio-blk-device,drive=d0,id=d0"]


def test_virtio_blk_read_write_flush(guests, start_vm, tmp_path):
    """virtio-mmio v2 transport at slot 0 announced on the command line,
    feature negotiation (VERSION_1), a polled split virtqueue: sector 0 reads
    what the file holds, the write of sector 1 reaches the file, flush and
    read-back succeed, nothing else in the file changes."""
    img = str(tmp_path / "disk.img")
    before = make_image(img)
    vm = start_vm(blk_args(guests["virtio_blk"], img, readonly=False))
    vm.wait_for(r"MMIO=0x00000000f0100000", TIMEOUT)  # from virtio_mmio.device=512@0xf0100000:5
    vm.wait_for(r"VIRTIO OK", TIMEOUT)
    vm.wait_for(rf"CAPACITY={MiB // SECTOR}\r?\n", TIMEOUT)
    m = vm.wait_for(r"REQ read0 STATUS=(\d+)\r?\nSECTOR0=([0-9a-f]{32})", TIMEOUT)
    assert m.group(1) == "0"
    assert bytes.fromhex(m.group(2)) == before[:16]
    assert vm.wait_for(r"REQ write1 STATUS=(\d+)\r?\n", TIMEOUT).group(1) == "0"
    assert vm.wait_for(r"REQ flush STATUS=(\d+)\r?\n", TIMEOUT).group(1) == "0"
    assert vm.wait_for(r"REQ read1 STATUS=(\d+)\r?\n", TIMEOUT).group(1) == "0"
    vm.wait_for(r"READBACK MATCH=1", TIMEOUT)
    vm.wait_for(r"DONE", TIMEOUT)
    exited_cleanly(vm)
    with open(img, "rb") as f:
        after = f.read()
    assert len(after) == len(before)
    assert after[SECTOR:2 * SECTOR] == WRITE_PATTERN
    assert after[:SECTOR] == before[:SECTOR]
    assert after[2 * SECTOR:] == before[2 * SECTOR:]


def test_virtio_blk_readonly_drive(guests, start_vm, tmp_path):
    """readonly=on: the device offers VIRTIO_BLK_F_RO, a guest write gets a
    non-zero status (VIRTIO_BLK_S_IOERR) and the file is left untouched."""
    img = str(tmp_path / "ro.img")
    before = make_image(img)
    digest = hashlib.sha256(before).hexdigest()
    mtime = os.stat(img).st_mtime_ns
    vm = start_vm(blk_args(guests["virtio_blk"], img, readonly=True))
    vm.wait_for(r"VIRTIO OK", TIMEOUT)
    vm.wait_for(r"DEVICE SAYS RO", TIMEOUT)
    m = vm.wait_for(r"REQ read0 STATUS=(\d+)\r?\nSECTOR0=([0-9a-f]{32})", TIMEOUT)
    assert m.group(1) == "0" and bytes.fromhex(m.group(2)) == before[:16]
    status = int(vm.wait_for(r"REQ write1 STATUS=(\d+)\r?\n", TIMEOUT).group(1))
    assert status != 0
    assert status == 1, "expected VIRTIO_BLK_S_IOERR"
    vm.wait_for(r"READBACK MATCH=0", TIMEOUT)
    vm.wait_for(r"DONE", TIMEOUT)
    exited_cleanly(vm)
    with open(img, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    assert os.stat(img).st_mtime_ns == mtime


# --- memcheck -----------------------------------------------------------------------
def expected_sum(pattern: int, pages: int) -> int:
    s = 0
    for p in range(pages):
        s = ((s << 1) | (s >> 63)) & M64
        s ^= ((p * GOLDEN) & M64) ^ pattern
    return s


def check_line(vm, timeout=TIMEOUT, since=None):
    m = vm.wait_for(rf"CHECK ok=(\d) sum={HEX} passes=(\d+)\r?\n", timeout, since=since)
    return int(m.group(1)), int(m.group(2), 16), int(m.group(3))


@pytest.mark.parametrize("mem_mib", [64, 128])
def test_memcheck_e820_and_fill(guests, start_vm, mem_mib):
    """boot_params carries the e820 map SPEC §2 lays out for -m, and the guest
    RAM holds what the guest wrote (full verify + checksum computed here)."""
    pattern = 0x0123456789ABCDEF ^ mem_mib
    vm = start_vm(base_args(guests["memcheck"], mem=str(mem_mib),
                            append=f"pattern={pattern:#x} mib=4"))
    m = vm.wait_for(rf"RAM=(\d+) TOP={HEX}\r?\n", TIMEOUT)
    assert int(m.group(2), 16) == mem_mib * MiB
    assert int(m.group(1)) == 0x9FC00 + mem_mib * MiB - MiB
    e820 = re.findall(rf"E820 {HEX} {HEX} (\d+)", vm.output)
    entries = [(int(a, 16), int(s, 16), int(t)) for a, s, t in e820]
    assert entries[0] == (0, 0x9FC00, 1)
    assert (0x100000, mem_mib * MiB - 0x100000, 1) in entries
    vm.wait_for(r"FILLED", TIMEOUT)
    ok, s, _ = check_line(vm)
    assert ok == 1 and s == expected_sum(pattern, 4 * 256)
    vm.send("q")
    vm.wait_for(r"EXIT", TIMEOUT)
    exited_cleanly(vm)


def test_memcheck_pause_resume(guests, start_vm):
    """stop/cont on a guest idling in `hlt` with a periodic LAPIC timer: while
    paused it does not answer; after cont the timer and the serial still work
    and the memory still verifies with the same checksum."""
    pattern = 0xFEEDFACECAFEBEEF
    vm = start_vm(base_args(guests["memcheck"], append=f"pattern={pattern:#x} mib=4"), qmp=True)
    ok, s1, passes1 = check_line(vm)
    assert ok == 1 and s1 == expected_sum(pattern, 1024)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("stop") == {"return": {}}
        q.wait_event("STOP", TIMEOUT)
        assert q.cmd("query-status")["return"]["status"] == "paused"
        mark = vm.mark()
        vm.send("x")
        time.sleep(1.5)
        assert "CHECK" not in vm.output[mark:], "a paused guest answered"
        assert q.cmd("cont") == {"return": {}}
        q.wait_event("RESUME", TIMEOUT)
        ok, s2, passes2 = check_line(vm, since=mark)
        assert ok == 1 and s2 == s1 and passes2 > passes1
    finally:
        q.close()
    vm.send("q")
    exited_cleanly(vm)


def take_template(vm, path: str) -> None:
    q = vm.qmp(TIMEOUT)
    try:
        r = q.cmd("migrate", uri=f"file:{path}")
        assert r == {"return": {}}, r
        deadline = time.monotonic() + TIMEOUT
        while True:
            st = q.cmd("query-migrate")["return"]["status"]
            if st == "completed":
                break
            assert st in ("setup", "active"), st
            assert time.monotonic() < deadline, "migrate did not complete"
            time.sleep(0.05)
        assert q.cmd("query-status")["return"]["status"] == "paused"
    finally:
        q.close()


def read_guest_u64(template_dir: str, gpa: int) -> int:
    """Read guest RAM from a template's memory file (after the 4 KiB header
    page, RAM below 3 GiB is at file offset 4096 + guest-physical address)."""
    with open(os.path.join(template_dir, "memory"), "rb") as f:
        f.seek(4096 + gpa)
        return struct.unpack("<Q", f.read(8))[0]


def test_memcheck_survives_template_restore(guests, start_vm, tmp_path):
    """Snapshot a filled, idling guest (migrate file:DIR), kill it, restore a
    new VM from DIR: the clone resumes (no second boot banner), the LAPIC
    timer wakes it, and its RAM verifies with the same checksum."""
    pattern = 0x1122334455667788
    pages = 8 * 256
    args = base_args(guests["memcheck"], append=f"pattern={pattern:#x} mib=8 every=30")
    tpl = str(tmp_path / "tpl")
    vm = start_vm(args, qmp=True)
    ok, s1, passes1 = check_line(vm)
    assert ok == 1 and s1 == expected_sum(pattern, pages)
    take_template(vm, tpl)
    assert os.path.getsize(os.path.join(tpl, "memory")) == 4096 + 64 * MiB
    assert read_guest_u64(tpl, 0x1000000) == pattern           # page 0
    assert read_guest_u64(tpl, 0x1000000 + 4096 * 5 + 8) == ((5 * GOLDEN) & M64) ^ pattern
    vm.kill()

    clone = start_vm(args + ["-incoming", f"file:{tpl}"], qmp=True)
    clone.send("x")
    ok, s2, passes2 = check_line(clone)
    assert ok == 1 and s2 == s1 and passes2 > passes1
    assert "MEMCHECK" not in clone.output and "FILLED" not in clone.output, "the clone rebooted"
    q = clone.qmp(TIMEOUT)
    try:
        assert q.cmd("query-migrate")["return"]["status"] == "completed"
        assert q.cmd("query-status")["return"]["status"] == "running"
    finally:
        q.close()
    clone.send("q")
    clone.wait_for(r"EXIT", TIMEOUT)
    exited_cleanly(clone)


def test_memcheck_ram_above_4g_and_its_template(guests, start_vm, tmp_path):
    """-m above 3 GiB: RAM resumes at 4 GiB after the MMIO gap (e820), the
    guest fills and verifies 16 MiB there, the template's memory file holds
    it right after the 3 GiB below the gap, and a clone verifies it again."""
    mem_mib = 3 * 1024 + 512
    pattern = 0x0F1E2D3C4B5A6978
    pages = 16 * 256
    args = base_args(guests["memcheck"], mem=str(mem_mib),
                     append=f"pattern={pattern:#x} base=0x100000000 mib=16 every=30")
    vm = start_vm(args, qmp=True)
    m = vm.wait_for(rf"RAM=(\d+) TOP={HEX}\r?\n", TIMEOUT)
    assert int(m.group(2), 16) == 4 * 1024 * MiB + 512 * MiB
    assert int(m.group(1)) == 0x9FC00 + mem_mib * MiB - MiB
    e820 = [(int(a, 16), int(z, 16), int(t))
            for a, z, t in re.findall(rf"E820 {HEX} {HEX} (\d+)", vm.output)]
    assert (0x100000, 3 * 1024 * MiB - 0x100000, 1) in e820
    assert (0x100000000, 512 * MiB, 1) in e820
    ok, s1, _ = check_line(vm)
    assert ok == 1 and s1 == expected_sum(pattern, pages)
    tpl = str(tmp_path / "tpl")
    take_template(vm, tpl)
    assert os.path.getsize(os.path.join(tpl, "memory")) == 4096 + mem_mib * MiB
    high = 3 * 1024 * MiB                     # RAM offset of guest-physical 4 GiB
    assert read_guest_u64(tpl, high) == pattern
    assert read_guest_u64(tpl, high + 4096 * 7 + 16) == ((7 * GOLDEN) & M64) ^ pattern
    vm.kill()

    clone = start_vm(args + ["-incoming", f"file:{tpl}"], qmp=True)
    clone.send("x")
    ok, s2, _ = check_line(clone)
    assert ok == 1 and s2 == s1
    assert "FILLED" not in clone.output, "the clone rebooted"
    clone.send("q")
    clone.wait_for(r"EXIT", TIMEOUT)
    exited_cleanly(clone)


# --- counter ---------------------------------------------------------------------------
COUNTER_APPEND = "poll=12"


def read_count(vm) -> int:
    mark = vm.mark()
    vm.send("c")
    return int(vm.wait_for(rf"COUNT={HEX}", TIMEOUT, since=mark).group(1), 16)


def test_counter_stop_cont(guests, start_vm):
    """`stop` really stops the vCPU: a byte sent while paused gets no answer;
    after `cont` the guest answers and its counter has moved on."""
    vm = start_vm(base_args(guests["counter"], append=COUNTER_APPEND), qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    c1 = read_count(vm)
    c2 = read_count(vm)
    assert c2 > c1 > 0
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("stop") == {"return": {}}
        q.wait_event("STOP", TIMEOUT)
        r = q.cmd("stop")
        assert "error" in r and r["error"]["class"] == "GenericError", r
        mark = vm.mark()
        vm.send("c")
        time.sleep(1.0)
        assert "COUNT=" not in vm.output[mark:], "a paused guest answered"
        assert q.cmd("cont") == {"return": {}}
        q.wait_event("RESUME", TIMEOUT)
        c3 = int(vm.wait_for(rf"COUNT={HEX}", TIMEOUT, since=mark).group(1), 16)
        assert c3 > c2
    finally:
        q.close()
    vm.send("q")
    vm.wait_for(r"FINAL COUNT", TIMEOUT)
    exited_cleanly(vm)


def test_counter_frozen_while_paused_and_resumes_from_template(guests, start_vm, tmp_path):
    """Two templates of the same paused VM, 1 s apart, hold the same counter
    value in guest memory (nothing ran in between); after `cont` the counter
    moves on; a VM restored from the template resumes counting from there
    (no second boot)."""
    args = base_args(guests["counter"], append=COUNTER_APPEND)
    vm = start_vm(args, qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    c1 = read_count(vm)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("stop") == {"return": {}}
        q.wait_event("STOP", TIMEOUT)
    finally:
        q.close()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    take_template(vm, a)
    v1 = read_guest_u64(a, COUNTER_ADDR)
    time.sleep(1.0)
    take_template(vm, b)
    v2 = read_guest_u64(b, COUNTER_ADDR)
    assert v1 == v2, f"the counter moved while paused: {v1:#x} -> {v2:#x}"
    assert v1 >= c1
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("cont") == {"return": {}}
        q.wait_event("RESUME", TIMEOUT)
    finally:
        q.close()
    assert read_count(vm) > v1
    vm.kill()

    clone = start_vm(args + ["-incoming", f"file:{a}"], qmp=True)
    c = read_count(clone)
    assert c > v1
    assert "READY" not in clone.output, "the clone rebooted"
    clone.send("q")
    clone.wait_for(r"FINAL COUNT", TIMEOUT)
    exited_cleanly(clone)
