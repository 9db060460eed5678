"""Issue 14, host side: the guest inits export the glibc tunable to every
process, Debian's static busybox honours it (checked with gdb on the host
CPU), and vecstate -- the register check built into the rootfs -- reports
what it should, including corruption (injected with gdb)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stratopy import guest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "guest"
BUSYBOX = Path("/bin/busybox")
GDB = shutil.which("gdb")
TUNABLE = guest.GLIBC_TUNABLES_VECTOR_SAFE


# -- the init scripts ---------------------------------------------------------------

def _tunable_prologue(script: Path) -> str:
    """The script up to the end of its GLIBC_TUNABLES block (it must come
    before any other command, so that PID 1 itself re-executes with it)."""
    text = script.read_text()
    end = text.index("\nesac\n") + len("\nesac\n")
    head = text[:end]
    commands = [ln for ln in head.splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands[0] == f"VECTOR_SAFE={TUNABLE}", commands[:2]
    return head


@pytest.mark.parametrize("name", ["init", "initrd-init"])
@pytest.mark.parametrize("inherited, expected", [
    (None, TUNABLE),
    ("glibc.malloc.check=3", f"glibc.malloc.check=3:{TUNABLE}"),
    (TUNABLE, TUNABLE),                                    # no second re-exec
])
def test_init_reexecutes_itself_with_the_tunable(tmp_path, name, inherited, expected):
    if not BUSYBOX.exists():
        pytest.skip("needs busybox-static")
    script = tmp_path / name
    # the prologue, then what the rest of the script would see
    script.write_text(_tunable_prologue(TOOLS / name)
                      + 'echo "runs=$$ $GLIBC_TUNABLES"\n')
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if inherited is not None:
        env["GLIBC_TUNABLES"] = inherited
    r = subprocess.run([str(BUSYBOX), "sh", str(script)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].split(" ", 1)[1] == expected, r.stdout


def test_the_tunable_names_only_glibc_hwcaps():
    name, _, value = TUNABLE.partition("=")
    assert name == "glibc.cpu.hwcaps"
    assert set(value.split(",")) >= {"-AVX", "-AVX2", "-AVX512F", "-AVX_Fast_Unaligned_Load"}


# -- busybox-static honours it --------------------------------------------------------

_GDB_IFUNC_TARGETS = r"""
set pagination off
set confirm off
catch syscall write
run
python
import subprocess
rel = subprocess.run(["readelf", "-rW", "{exe}"], capture_output=True, text=True).stdout
slots = [int(l.split()[0], 16) for l in rel.splitlines() if "IRELATIV" in l]
inf = gdb.selected_inferior()
arch = gdb.selected_frame().architecture()
vector = 0
for s in slots:
    target = int.from_bytes(bytes(inf.read_memory(s, 8)), "little")
    # up to the first ret: an AVX variant has run a VEX/EVEX instruction
    # (at the latest its vzeroupper), an SSE2 variant has none
    for insn in arch.disassemble(target, count=400):
        op = insn["asm"].split()[0] if insn["asm"].split() else ""
        if op.startswith("v") or op.startswith("k"):
            vector += 1
            break
        if op.startswith("ret"):
            break
print(f"IFUNC slots={{len(slots)}} avx={{vector}}")
end
kill
"""


def _busybox_avx_ifuncs(tmp_path: Path, tunables: str | None) -> tuple[int, int]:
    """(ifunc slots, slots whose chosen function uses AVX instructions) of
    /bin/busybox once its static glibc has resolved them at start-up."""
    cmds = tmp_path / "ifuncs.gdb"
    cmds.write_text(_GDB_IFUNC_TARGETS.format(exe=BUSYBOX))
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    r = subprocess.run([GDB, "-q", "-batch", "-nx", "-x", str(cmds), "--args",
                        str(BUSYBOX), "echo", "hi"], env=env, capture_output=True,
                       text=True, timeout=120)
    m = re.search(r"IFUNC slots=(\d+) avx=(\d+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr[-2000:]
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(not (GDB and BUSYBOX.exists() and shutil.which("readelf")),
                    reason="needs gdb, readelf and busybox-static")
def test_static_busybox_uses_no_avx_string_function_with_the_tunable(tmp_path):
    slots, avx = _busybox_avx_ifuncs(tmp_path, None)
    if avx == 0:
        pytest.skip("this host CPU gives glibc no AVX string functions to avoid")
    assert slots > 20
    # the first tunable left memcpy/memmove on AVX ("_avx_unaligned_erms"):
    partial = TUNABLE.replace(",-AVX_Fast_Unaligned_Load", "")
    assert _busybox_avx_ifuncs(tmp_path, partial)[1] > 0
    assert _busybox_avx_ifuncs(tmp_path, TUNABLE) == (slots, 0)


# -- vecstate ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def vecstate(tmp_path_factory) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("needs gcc")
    exe = tmp_path_factory.mktemp("vecstate") / "vecstate"
    subprocess.run(["gcc", *guest.VECSTATE_CFLAGS, "-o", str(exe),
                    str(guest.vecstate_source_path())], check=True)
    assert guest._elf_is_static(exe)
    return exe


def _report(out: str) -> dict[str, str]:
    line, = [ln for ln in out.splitlines() if ln.startswith("vecstate ")]
    return dict(f.split("=", 1) for f in line.split()[1:])


def test_vecstate_pair_on_the_host_keeps_every_register(vecstate):
    """Two at once on one CPU, on this (non-PVM) Linux: every class intact."""
    r = subprocess.run(["taskset", "-c", "0", "sh", "-c",
                        f"{vecstate} 1 & {vecstate} 1; b=$?; wait $!; echo rc=$?,$b"],
                       capture_output=True, text=True, timeout=60)
    assert "rc=0,0" in r.stdout, r.stdout
    for line in r.stdout.splitlines()[:2]:
        rep = _report(line)
        assert int(rep["yields"]) > 0 and rep["foreign"] == "0", line
        assert all(v in ("0", "na") for k, v in rep.items()
                   if k in ("gpr", "xmm", "ymm_upper", "zmm_upper", "zmm16_31", "kmask")), line


@pytest.mark.parametrize("argv", [["x"], ["-y"], ["1", "2"], [""], ["-x", "1", "2"]])
def test_vecstate_refuses_bad_arguments(vecstate, argv):
    r = subprocess.run([str(vecstate), *argv], capture_output=True, text=True, timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (3, "", "usage: vecstate [-x] [SECONDS]\n")


# After the first sched_yield returns, gdb changes one register, or (gdb
# cannot write the AVX state here: "Couldn't write extended state status")
# what vecstate loaded into one: vecstate must report that class, and only
# it, and exit 1 (general/XMM registers) or 2 (AVX state).
_GDB_CORRUPT = """
set pagination off
set confirm off
catch syscall sched_yield
run
continue
{assign}
delete
continue
"""


@pytest.mark.skipif(not GDB, reason="needs gdb")
@pytest.mark.parametrize("assign, cls, status, need", [
    ("set $r13 = 42", "gpr", 1, "sse"),
    ("set {long}((char *)&vs_fill_gpr + 8 * 10) = 42", "gpr", 1, "sse"),           # r15
    ("set {long}((char *)&vs_fill_vec + 8 * (7 * 8 + 1)) = 42", "xmm", 1, "sse"),     # xmm7 bits 64-127
    ("set {long}((char *)&vs_fill_vec + 8 * (9 * 8 + 3)) = 42", "ymm_upper", 2, "avx"),
    ("set {long}((char *)&vs_fill_vec + 8 * (3 * 8 + 6)) = 42", "zmm_upper", 2, "avx512"),
    ("set {long}((char *)&vs_fill_vec + 8 * (20 * 8)) = 42", "zmm16_31", 2, "avx512"),
    ("set {long}((char *)&vs_fill_k + 8 * 5) = 42", "kmask", 2, "avx512"),
])
def test_vecstate_reports_a_register_changed_behind_its_back(vecstate, tmp_path,
                                                             assign, cls, status, need):
    level = _report(subprocess.run([str(vecstate), "0"], capture_output=True,
                                   text=True, timeout=10).stdout)["level"]
    order = ["sse", "avx", "avx512"]
    if order.index(level) < order.index(need):
        pytest.skip(f"this host runs vecstate at level {level}")
    cmds = tmp_path / "corrupt.gdb"
    cmds.write_text(_GDB_CORRUPT.format(assign=assign))
    r = subprocess.run([GDB, "-q", "-batch", "-nx", "-x", str(cmds), "--args",
                        str(vecstate), "0"], capture_output=True, text=True, timeout=60)
    rep = _report(r.stdout)
    assert rep["yields"] == "1" and rep[cls] == "1", r.stdout
    others = {k: v for k, v in rep.items()
              if k in ("gpr", "xmm", "ymm_upper", "zmm_upper", "zmm16_31", "kmask") and k != cls}
    assert all(v in ("0", "na") for v in others.values()), r.stdout
    assert rep["foreign"] == "0"                     # its own pattern, not a sibling's
    assert f"exited with code 0{status}" in r.stdout, r.stdout[-1500:]


def test_rootfs_key_tracks_vecstate_and_compiler():
    k = guest.rootfs_cache_key("bb", b"init", b"initrd", vecstate=b"a", compiler_id="gcc 12")
    assert k != guest.rootfs_cache_key("bb", b"init", b"initrd", vecstate=b"b",
                                       compiler_id="gcc 12")
    assert k != guest.rootfs_cache_key("bb", b"init", b"initrd", vecstate=b"a",
                                       compiler_id="gcc 13")
