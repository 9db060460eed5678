"""The command-line facts a template records and a restore must match.

SPEC §4: vCPU count, memory size, the number, type and order of devices,
virtio-net ``mac``, virtio-blk ``serial`` (and what follows from the drive:
read-only flag and capacity, since the guest negotiated features and sized
its disk on them). A drive may be the same file or a copy of it, so its path
is recorded for information only.
"""

from __future__ import annotations

import os

from stratopy import config as cfgmod
from stratopy.errors import TemplateError


def _device_facts(d: cfgmod.DeviceConfig) -> dict:
    f: dict = {"driver": d.driver, "id": d.id}
    if d.driver == cfgmod.BLK:
        f["serial"] = d.serial or ""
        f["readonly"] = bool(d.drive.readonly)
        try:
            f["capacity"] = os.stat(d.drive.file).st_size
        except OSError:
            f["capacity"] = -1
    elif d.driver == cfgmod.NET:
        f["mac"] = d.mac or ""
    return f


def machine_facts(config: cfgmod.MachineConfig) -> dict:
    return {
        "machine": config.machine_type,
        "cpus": config.cpus,
        "mem_size": config.mem_size,
        "devices": [_device_facts(d) for d in config.devices],
    }


def compare(template: dict, current: dict) -> None:
    """Raise TemplateError naming the first attribute that differs."""
    if not isinstance(template, dict):
        raise TemplateError("machine facts missing from the state file")
    for key, attr in (("machine", "machine type"), ("cpus", "vCPU count (-smp)"),
                      ("mem_size", "memory size (-m)")):
        if template.get(key) != current[key]:
            raise TemplateError("", attribute=attr, expected=template.get(key),
                                found=current[key])
    tdevs = template.get("devices")
    cdevs = current["devices"]
    if not isinstance(tdevs, list):
        raise TemplateError("device list missing from the state file")
    if len(tdevs) != len(cdevs):
        raise TemplateError("", attribute="number of devices",
                            expected=[d.get("id") if isinstance(d, dict) else d for d in tdevs],
                            found=[d["id"] for d in cdevs])
    for i, (t, c) in enumerate(zip(tdevs, cdevs)):
        if not isinstance(t, dict):
            raise TemplateError(f"device {i} is malformed in the state file")
        for key in ("driver", "id", "mac", "serial", "readonly", "capacity"):
            if key in c and t.get(key) != c[key]:
                name = {"driver": "type", "capacity": "disk size"}.get(key, key)
                raise TemplateError("", attribute=f"device {i} ({c['id']}) {name}",
                                    expected=t.get(key), found=c[key])
