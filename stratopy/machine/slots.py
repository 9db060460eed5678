"""The virtio-mmio slot layout of the microvm, as pure data (no KVM).

StratoVirt's layout (machine/src/micro_common/mod.rs,
``create_replaceable_devices``): slots 0-3 are the replaceable virtio-blk
slots, 4-5 the replaceable virtio-net slots, other devices follow from slot 6.
The six reserved slots always hold a real virtio device (a block device
with no backend reads as capacity 0, a net device with no tap has its link
down), so the guest driver probes them at boot and a backend can be bound
later by QMP ``device_add`` (hot-replace).

Command-line blk/net devices fill their kind's reserved slots in command-line
order; those beyond the reserved slots get ordinary slots (in order, before
the other devices). A restore from a template passes ``placement`` (device
id -> slot index, read from the template) so that each device goes back to
the slot the guest knows it at, wherever its -device sits on the command
line; devices not in ``placement`` fill the remaining slots in order.
"""

from __future__ import annotations

from stratopy import config as cfgmod
from stratopy.arch.x86_64 import layout
from stratopy.errors import ConfigError
from stratopy.record import Record

BLK = "blk"
NET = "net"
OTHER = "other"

#: slot kind -> (first slot index, number of slots)
RESERVED = {BLK: (0, layout.BLK_SLOTS), NET: (layout.BLK_SLOTS, layout.NET_SLOTS)}
RESERVED_COUNT = layout.BLK_SLOTS + layout.NET_SLOTS
KIND_OF_DRIVER = {cfgmod.BLK: BLK, cfgmod.NET: NET}


class Slot(Record):
    """One virtio-mmio transport slot: where it is and what sits in it.

    (Written out, not a dataclass: stratopy.record.)"""

    __slots__ = ("index", "base", "irq", "kind", "config", "device", "transport", "notify_fds",
                 "backend", "hot", "net_readable")

    def __init__(self, index: int, base: int, irq: int, kind: str,
                 config: cfgmod.DeviceConfig | None = None, device: object = None,
                 transport: object = None, notify_fds: tuple = (), backend: object = None,
                 hot: bool = False, net_readable: object = None):
        self.index = index
        self.base = base
        self.irq = irq
        self.kind = kind                  # "blk" | "net" (reserved, replaceable) | "other"
        self.config = config              # None: a reserved slot with no backend
        self.device = device              # the VirtioDevice
        self.transport = transport        # VirtioMmioTransport
        self.notify_fds = notify_fds
        self.backend = backend            # block file / tap / chardev / rng source
        self.hot = hot                    # config bound by QMP device_add (not the command line)
        self.net_readable = net_readable  # net slots: the tap reader callback (machine wiring)

    @property
    def replaceable(self) -> bool:
        return self.kind in RESERVED

    @property
    def number(self) -> int:
        """The slot's number within its kind (device_add ``addr``)."""
        return self.index - RESERVED[self.kind][0] if self.replaceable else self.index


def plan_slots(config: cfgmod.MachineConfig,
               placement: dict[str, int] | None = None) -> list[Slot]:
    """The slots a machine with ``config`` has (devices not created yet)."""
    transport = config.transport_devices()
    reserved: dict[int, cfgmod.DeviceConfig] = {}
    extra: list[cfgmod.DeviceConfig] = []
    for kind in (BLK, NET):
        first, count = RESERVED[kind]
        mine = [d for d in transport if KIND_OF_DRIVER.get(d.driver) == kind]
        rest = []
        for d in mine:
            want = (placement or {}).get(d.id)
            if (isinstance(want, int) and first <= want < first + count
                    and want not in reserved):
                reserved[want] = d
            else:
                rest.append(d)
        free = [i for i in range(first, first + count) if i not in reserved]
        for d in rest:
            if free:
                reserved[free.pop(0)] = d
            else:
                extra.append(d)
    # extra blk/net devices, in command-line order, then the other devices
    extra_ids = {id(d) for d in extra}
    extra = [d for d in transport if id(d) in extra_ids]
    other = [d for d in transport if d.driver not in KIND_OF_DRIVER]
    slots: list[Slot] = []
    for kind in (BLK, NET):
        first, count = RESERVED[kind]
        for idx in range(first, first + count):
            base, irq = layout.virtio_slot(idx)
            slots.append(Slot(idx, base, irq, kind, reserved.get(idx)))
    idx = RESERVED_COUNT
    for d in extra + other:
        base, irq = layout.virtio_slot(idx)
        if irq > layout.VIRTIO_IRQ_MAX:     # the last pin is the ACPI GED's
            raise ConfigError("-device", f"too many devices: no IRQ left for {d.id}")
        slots.append(Slot(idx, base, irq, OTHER, d))
        idx += 1
    return slots
