"""How guest RAM is backed, seen from outside the running monitor (issue 12).

Each test boots the freestanding ``counter`` guest (it keeps writing guest
RAM) with one memory option and reads the monitor's /proc/PID/smaps: the
guest RAM mapping is the one VMA of exactly the guest's size (40 MiB, a size
no other mapping of the monitor has). What the kernel reports there is the
proof: ``dd`` in VmFlags (MADV_DONTDUMP), ``sh`` (MAP_SHARED), the backing
file's name (``/memfd:...``, ``DIR/stratopy_backmem_... (deleted)``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time

import pytest

from tests import harness

pytestmark = pytest.mark.kvm

TIMEOUT = 30.0
GUEST_MIB = 40
COUNTER_APPEND = "poll=16"


def vmas(pid: int) -> list[dict]:
    """Every smaps entry: {'size', 'perms', 'name', 'flags'}."""
    found = []
    cur: dict | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                start, end = (int(x, 16) for x in head[0].split("-"))
                cur = {"size": end - start, "perms": head[1],
                       "name": " ".join(head[5:]), "flags": []}
                found.append(cur)
            elif head[0] == "VmFlags:" and cur is not None:
                cur["flags"] = head[1:]
            elif head[0] == "Rss:" and cur is not None:
                cur["rss"] = int(head[1]) << 10
    return found


def guest_ram_vma(pid: int, mib: int = GUEST_MIB) -> dict:
    """The smaps entry of the guest RAM mapping, when it is a VMA of its own
    (a file mapping, or anonymous memory whose flags differ from its
    neighbours', e.g. ``dd``)."""
    ram = [v for v in vmas(pid) if v["size"] == mib << 20]
    assert len(ram) == 1, f"expected one {mib} MiB mapping, found {ram}"
    return ram[0]


def boot(start_vm, guests, *extra: str):
    vm = start_vm(["-kernel", guests["counter"], "-m", str(GUEST_MIB),
                   "-append", COUNTER_APPEND, *extra], qmp=False)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    return vm


@pytest.mark.parametrize("dump,excluded", [("off", True), ("on", False), (None, False)])
def test_dump_guest_core(guests, start_vm, dump, excluded):
    """dump-guest-core=off marks guest RAM MADV_DONTDUMP (VmFlags 'dd');
    on, and the default (StratoVirt's: on), leave it in the core dump."""
    machine = "microvm" if dump is None else f"type=microvm,dump-guest-core={dump}"
    vm = boot(start_vm, guests, "-machine", machine)
    if excluded:
        vma = guest_ram_vma(vm.proc.pid)
        assert "dd" in vma["flags"] and vma["perms"] == "rw-p", vma
    else:
        # anonymous RAM with default flags may merge with a neighbouring
        # anonymous mapping: a VMA of at least the guest's size holds it,
        # and no VMA that large is excluded from core dumps
        big = [v for v in vmas(vm.proc.pid) if v["size"] >= GUEST_MIB << 20]
        assert any(v["perms"] == "rw-p" and not v["name"] for v in big), big
        assert not [v for v in big if "dd" in v["flags"]], big


def test_dump_guest_core_off_after_incoming(guests, start_vm, tmp_path):
    """A warm start maps the template's memory file: with dump-guest-core=off
    that mapping is excluded from core dumps too."""
    tdir = str(tmp_path / "tpl")
    vm = start_vm(["-kernel", guests["counter"], "-m", str(GUEST_MIB),
                   "-append", COUNTER_APPEND], qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("stop") == {"return": {}}
        assert q.cmd("migrate", uri=f"file:{tdir}") == {"return": {}}
        for _ in range(int(TIMEOUT * 10)):
            st = q.cmd("query-migrate")["return"].get("status")
            if st in ("completed", "failed"):
                break
            time.sleep(0.1)
        assert st == "completed", st
    finally:
        q.close()
    vm.kill()
    clone = start_vm(["-kernel", guests["counter"], "-m", str(GUEST_MIB),
                      "-append", COUNTER_APPEND, "-machine", "microvm,dump-guest-core=off",
                      "-incoming", f"file:{tdir}"], qmp=True)
    q = clone.qmp(TIMEOUT)
    try:
        vma = guest_ram_vma(clone.proc.pid)
        assert "dd" in vma["flags"], vma
        assert vma["name"].endswith("/memory"), vma
    finally:
        q.close()


def test_mem_share_is_a_shared_memfd(guests, start_vm):
    """mem-share=on: guest RAM is a memfd mapped MAP_SHARED (VmFlags 'sh')."""
    vm = boot(start_vm, guests, "-machine", "microvm,mem-share=on")
    vma = guest_ram_vma(vm.proc.pid)
    assert vma["name"].startswith("/memfd:stratopy_guest_ram"), vma
    assert "sh" in vma["flags"] and vma["perms"] == "rw-s", vma


@pytest.mark.parametrize("prealloc", [False, True])
def test_mem_path_directory(guests, start_vm, tmp_path, prealloc):
    """-mem-path DIR: guest RAM is a file created in DIR, unlinked at once
    (nothing is left in DIR) and mapped shared; -mem-prealloc allocates all
    of it at start (the file's blocks cover the guest size)."""
    extra = ["-mem-path", str(tmp_path)] + (["-mem-prealloc"] if prealloc else [])
    vm = boot(start_vm, guests, *extra)
    vma = guest_ram_vma(vm.proc.pid)
    assert vma["name"].startswith(f"{tmp_path}/stratopy_backmem_"), vma
    assert vma["name"].endswith("(deleted)") and vma["perms"] == "rw-s", vma
    assert os.listdir(tmp_path) == []
    # the open file through /proc/PID/map_files: its allocated size
    start = next(line.split()[0] for line in open(f"/proc/{vm.proc.pid}/maps")
                 if vma["name"] in line)
    st = os.stat(f"/proc/{vm.proc.pid}/map_files/{start}")
    assert st.st_size == GUEST_MIB << 20
    if prealloc:
        assert st.st_blocks * 512 >= GUEST_MIB << 20, st
    else:
        assert st.st_blocks * 512 < GUEST_MIB << 20, st


def test_mem_path_vm_is_refused_as_a_template(guests, start_vm, tmp_path):
    """As in StratoVirt: migrate of a VM with a memory backend file is
    refused with one error, and the VM runs on."""
    vm = start_vm(["-kernel", guests["counter"], "-m", str(GUEST_MIB), "-append",
                   COUNTER_APPEND, "-mem-path", str(tmp_path)], qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q = vm.qmp(TIMEOUT)
    try:
        q.cmd("stop")
        r = q.cmd("migrate", uri=f"file:{tmp_path}/tpl")
        assert "error" in r and "-mem-path" in r["error"]["desc"], r
        assert q.cmd("query-status")["return"]["status"] == "paused"
    finally:
        q.close()


@pytest.mark.parametrize("prealloc", [False, True])
def test_mem_prealloc_anonymous(guests, start_vm, prealloc):
    """-mem-prealloc without -mem-path: all of guest RAM is resident before
    the guest runs (MAP_POPULATE); without it only what the guest touched."""
    vm = boot(start_vm, guests, *(["-mem-prealloc"] if prealloc else []))
    big = [v for v in vmas(vm.proc.pid) if v["size"] >= GUEST_MIB << 20 and v["perms"] == "rw-p"]
    resident = max(v["rss"] for v in big)
    if prealloc:
        assert resident >= GUEST_MIB << 20, big
    else:
        assert resident < (GUEST_MIB << 20) // 2, big


@contextlib.contextmanager
def hugetlbfs(pages: int):
    """A hugetlbfs mount with ``pages`` more 2 MiB pages reserved in the pool,
    or None when this host cannot give them (not root, no hugetlbfs)."""
    nr = "/proc/sys/vm/nr_hugepages"
    mnt = tempfile.mkdtemp(prefix="stratopy-huge-")
    old = None
    mounted = False
    try:
        try:
            old = int(open(nr).read())
            with open(nr, "w") as f:
                f.write(str(old + pages))
            got = int(open(nr).read())
            r = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", mnt],
                               capture_output=True, timeout=30)
            mounted = r.returncode == 0
        except OSError:
            got = old or 0
        yield (mnt, got - (old or 0)) if mounted else (None, 0)
    finally:
        if mounted:
            subprocess.run(["umount", mnt], capture_output=True, timeout=30)
        if old is not None:
            with contextlib.suppress(OSError), open(nr, "w") as f:
                f.write(str(old))
        os.rmdir(mnt)


def test_mem_path_hugetlbfs(guests, start_vm):
    """On hugetlbfs the guest takes huge pages (HugePages_Free drops by the
    guest's size); -m not a multiple of the huge page size is refused in one
    line; with too few huge pages -mem-prealloc is refused in one line
    instead of a SIGBUS later. Where the host cannot provide huge pages at
    all, the refusal path is still checked."""
    with hugetlbfs(GUEST_MIB // 2) as (mnt, pages):
        if mnt is None:
            pytest.skip("no hugetlbfs mount possible here (not root?)")
        harness.refused(["-kernel", guests["counter"], "-m", "41", "-mem-path", mnt],
                        "-mem-path", "not a multiple of 2M")
        if pages < GUEST_MIB // 2:
            # the pool is too small: the one-line error path
            harness.refused(["-kernel", guests["counter"], "-m", str(GUEST_MIB), "-mem-path",
                             mnt, "-mem-prealloc"], "huge pages")
            pytest.skip(f"the host gave {pages} of {GUEST_MIB // 2} huge pages; "
                        "only the refusal was checked")
        vm = boot(start_vm, guests, "-mem-path", mnt, "-mem-prealloc")
        vma = guest_ram_vma(vm.proc.pid)
        assert "ht" in vma["flags"] and vma["perms"] == "rw-s", vma
        # all the pages are taken now: a second VM of the same size cannot start
        harness.refused(["-kernel", guests["counter"], "-m", str(GUEST_MIB), "-mem-path",
                         mnt, "-mem-prealloc"], "huge pages")
        vm.kill()
