"""The PCI topology's snapshot records (machine/schema.py ``DevicesState.pci``),
apart from the virtio functions (each a virtio slot's ``VirtioPciState``):
light, so the schema imports them on every start."""

from __future__ import annotations

from stratopy.pci.config import ConfigSpaceState
from stratopy.record import StateRecord


class RootPortState(StateRecord):
    """One pcie-root-port: where it sits, what it is, its registers (bus
    numbers, windows, slot control and status, link status, MSI) and the
    slot events already signalled."""

    __slots__ = ("id", "addr", "port", "chassis", "config", "asserted")
    id: str
    addr: int                    # devfn on pcie.0
    port: int
    chassis: int
    config: ConfigSpaceState
    asserted: int


class PciState(StateRecord):
    """The PCI topology beside the virtio functions. The INTx line counts
    are not in it: each function re-drives its restored level."""

    __slots__ = ("config_address", "host_bridge", "root_ports")
    config_address: int          # the 0xCF8 latch
    host_bridge: ConfigSpaceState
    root_ports: list[RootPortState]
