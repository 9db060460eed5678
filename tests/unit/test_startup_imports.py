"""Start-up cost (issue #4): what a warm start imports before its first KVM_RUN.

``python -m stratopy ... -incoming file:DIR`` spends most of its time before
the first KVM_RUN in interpreter start-up and imports (docs/performance.md).
START_PATH is what that path imports: the CLI, the builder, the machine and
its device manager, the snapshot schema, the restore, the
devices every machine has (the reserved block and net slots), the QMP
listeners. What is only needed later -- a QMP command, writing a template, a
cold boot, -daemonize/-name -- must stay out of it, and so must a few
standard modules that cost start-up time for nothing.

Each check runs in a fresh interpreter started with -S, as bin/stratopy
starts it (site's .pth hooks may import anything), and only counts the
modules the stratopy imports added.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

START_PATH = (
    "stratopy.cli",
    "stratopy.cli_parse",
    "stratopy.builder",
    "stratopy.machine.microvm",
    "stratopy.machine.device_manager",
    "stratopy.machine.schema",
    "stratopy.migration.restore",
    "stratopy.machine.devices",
    "stratopy.devices.virtio.block",
    "stratopy.devices.virtio.net",
    "stratopy.chardev",
    "stratopy.machine.control",
    "stratopy.qmp.server",
)

NOT_AT_START = {
    "stratopy.qmp.commands": "the QMP command table: loaded by the first command",
    "stratopy.migration.snapshot": "writing a template (QMP migrate)",
    "stratopy.arch.x86_64.boot": "loading a kernel: cold boot only",
    "stratopy.arch.x86_64.mptable": "cold boot only",
    "stratopy.arch.x86_64.acpi": "ACPI tables: cold boot only",
    "stratopy.acpi.tables": "ACPI tables: cold boot only",
    "stratopy.acpi.aml": "AML: cold boot only",
    "stratopy.daemon": "-daemonize and -name only",
    "ctypes.util": "find_library('c') runs ldconfig in a subprocess",
    "platform": "os.uname() gives the architecture",
    "ipaddress": "-qmp tcp:HOST:PORT only",
    "secrets": "template writing only",
    "glob": "template writing only",
    "concurrent.futures": "EventLoop.call: QMP requests only",
}

# `logging` (18 M instructions) comes with the first record emitted
# (stratopy.logs), and a start without -D emits none: every module on the
# start path, the migration ones included, takes its logger from there.

_PROBE = """
import json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def imported_by(*modules: str) -> set[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-S", "-c", _PROBE, *modules], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout))


def test_warm_start_path_does_not_import_what_runs_later():
    loaded = imported_by(*START_PATH)
    assert set(START_PATH) <= loaded
    unexpected = {m: why for m, why in NOT_AT_START.items() if m in loaded}
    assert not unexpected, f"imported before the first KVM_RUN: {unexpected}"


def test_start_path_does_not_import_logging():
    loaded = imported_by(*START_PATH)
    assert "stratopy.machine.microvm" in loaded and "stratopy.qmp.server" in loaded
    assert "logging" not in loaded, "imported at start: logging (use stratopy.logs)"


def test_config_does_not_generate_dataclasses():
    """config.py's classes are written out (42 M instructions generated)."""
    assert "dataclasses" not in imported_by("stratopy.config", "stratopy.cli_parse")


# The dataclasses a warm start still creates (each costs 2-4 M instructions
# of generated code, docs/performance.md). The state classes are read by
# migration/codec.py through dataclasses.fields and type hints; the QMP ones
# belong to the QMP work. Anything else on the start path is written out
# (stratopy.record, config.py, kvm/exits.py).
DATACLASSES_AT_START = {
    "stratopy.devices.serial.SerialState", "stratopy.devices.virtio.block.BlockState",
    "stratopy.devices.virtio.mmio.MmioState", "stratopy.devices.virtio.net.NetState",
    "stratopy.devices.virtio.queue.QueueState", "stratopy.machine.vcpu_state.VcpuState",
    "stratopy.machine.vcpu_state.VmArchState", "stratopy.migration.memfile.MemoryImage",
    "stratopy.qmp.protocol.Request", "stratopy.qmp.protocol.ProtocolError",
    "stratopy.qmp.listen.UnixListener", "stratopy.qmp.listen.TcpListener",
    "stratopy.acpi.ged.GedState", "stratopy.devices.rtc.RtcState",
}

_DATACLASS_PROBE = """
import dataclasses, json, sys
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(
    f"{name}.{attr}" for name, mod in list(sys.modules.items()) if name.startswith("stratopy")
    for attr, v in vars(mod).items()
    if isinstance(v, type) and v.__module__ == name and dataclasses.is_dataclass(v))))
"""


def test_start_path_creates_no_new_dataclasses():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-S", "-c", _DATACLASS_PROBE, *START_PATH],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    extra = set(json.loads(r.stdout)) - DATACLASSES_AT_START
    assert not extra, f"dataclasses created at start (write them out: stratopy.record): {extra}"


def test_cli_alone_imports_no_machine_qmp_or_migration():
    """`import stratopy.cli` (what `stratopy --help` and argument errors
    pay for) stays small: parsing needs no KVM, QMP or template code."""
    loaded = imported_by("stratopy.cli")
    heavy = {m for m in loaded
             if m.startswith(("stratopy.machine", "stratopy.qmp", "stratopy.migration",
                              "stratopy.kvm", "stratopy.devices"))}
    assert not heavy, heavy

