"""-machine q35: the standard x86 VM (PCIe, virtio-pci, ACPI), booted
directly (no firmware), built on the microvm's vCPU, memory, event-loop and
legacy-device code (``MicroVm``) with its own buses and tables:

* RAM split around the 32-bit PCI hole (q35_layout), e820 with ECAM reserved;
* ``pcie.0``: the Q35 host bridge at 00.0, reached through 0xCF8/0xCFC and
  the ECAM window at 0xB0000000 (pci/bus.py); each ``-device
  virtio-*-pci`` a VirtioPciFunction at its ``addr``; ``pcie-root-port``
  bridges with their one device behind them;
* BARs are placed by the guest (Linux assigns unassigned resources inside
  the _CRS windows, as it does without firmware): the device manager's
  PCI part (machine/pci_devices.py) follows every move onto the MMIO/PIO
  bus, and moves the queue doorbells' ioeventfds with BAR 4;
* MSI/MSI-X through KVM_SIGNAL_MSI (kvm/uapi_irq.py), INTx on GSIs 16-19
  (level, shared: ``pci_devices.IntxRouter``);
* 8250 serial, i8042 (reset), CMOS RTC at 0x70; ACPI: RSDP, XSDT, FADT,
  MADT, MCFG, DSDT (acpi/q35.py) with the GED power button, so QMP
  system_powerdown shuts the guest down.

Hotplug: QMP device_add / device_del of virtio-blk-pci / virtio-net-pci
into a pcie-root-port (q35_hotplug.py). Templates: ``migrate file:DIR`` /
``-incoming file:DIR`` as on the microvm (builder.py); the PCI state is
the device manager's (machine/pci_devices.py, ``DevicesState.pci`` and a
``VirtioPciState`` per function), restored with its BARs re-mapped.
"""

from __future__ import annotations

import struct

from stratopy.arch.x86_64 import q35_layout as q35
from stratopy.config import MachineConfig
from stratopy.kvm import backend as kvm_backend
from stratopy.machine import slots as slotmod
from stratopy.machine.microvm import MicroVm



class Q35Vm(MicroVm):
    """-machine q35 on the generic Machine: the microvm's arch set-up
    (setup_vm), GED and power button; its own RAM layout, slot plan (every
    transport device a virtio-pci function at its ``addr``), PCI buses and
    cold-boot load. Built by stratopy/builder.py (both recipes)."""

    machine_type = "q35"

    @property
    def rtc(self):
        return self.devices.rtc

    # the PCI side is the device manager's (machine/pci_devices.py)
    @property
    def pci(self):
        """pci.bus.PciRoot (None before the devices are created)."""
        return self.devices.pci.root if self.devices.pci is not None else None

    @property
    def root_ports(self) -> dict:
        return self.devices.pci.root_ports if self.devices.pci is not None else {}

    @property
    def pci_functions(self) -> dict:
        """slot index -> VirtioPciFunction."""
        return self.devices.pci.functions if self.devices.pci is not None else {}

    # --- building steps (stratopy.builder calls them) --------------------------------
    @classmethod
    def ram_layout_of(cls, config: MachineConfig) -> list[tuple[int, int]]:
        return q35.ram_layout(config.mem_size)

    @staticmethod
    def plan_slots(config: MachineConfig, placement: dict[str, int] | None = None) -> list:
        """One slot per transport device, in command-line order: its place
        is its PCI address (``DeviceConfig.pci``), not a slot base."""
        return [slotmod.Slot(index, 0, 0, slotmod.OTHER, d)
                for index, d in enumerate(config.transport_devices())]

    def create_devices(self, slots: list) -> None:
        """8250 + i8042 and the CMOS RTC at 0x70 (the DSDT's PNP0B00), the
        GED (power button, VMGenID), then the PCI buses and every function
        (cold boot and warm start alike)."""
        self.devices.add_legacy_devices(reset=self._guest_reset)
        self.devices.add_rtc(with_ports=True)
        self._setup_ged()
        self.devices.add_pci(q35, slots)

    # --- hotplug (QMP device_add / device_del; machine/q35_hotplug.py) -------------
    def hot_plug_pci(self, config, backend) -> None:
        """Plug a virtio-blk/net-pci function holding the opened ``backend``
        into its (empty) root port; the port interrupts the guest."""
        from stratopy import config as cfgmod
        from stratopy.machine import devices as devfactory

        if config.driver == cfgmod.BLK:
            from stratopy.devices.virtio.block import BlockDevice
            device = BlockDevice(backend, serial=config.serial or "")
        else:
            from stratopy.devices.virtio.net import NetDevice
            device = NetDevice(backend, mac=devfactory.mac_bytes(config.mac))
        index = max((s.index for s in self.slots), default=-1) + 1
        slot = slotmod.Slot(index, 0, 0, slotmod.OTHER, config, hot=True)
        with self.loop.device_lock:
            self.devices.pci.plug(slot, (device, backend), hot=True)
            self.slots.append(slot)

    def request_hot_unplug(self, slot, done) -> None:
        """QMP device_del: ask the guest to let go of ``slot``'s function
        (attention button). When it has (power indicator off), the function
        is taken out, torn down on the device thread, and ``done()`` runs
        there (DEVICE_DELETED)."""
        port = self.root_ports[slot.config.pci[0]]

        def removed(func) -> None:           # vCPU thread, device lock held
            self.loop.call_soon(lambda: (self.hot_unplug_pci(slot, surprise=False), done()))
        with self.loop.device_lock:
            port.on_removed = removed
            port.request_unplug()

    def hot_unplug_pci(self, slot, surprise: bool = True) -> None:
        self.devices.pci.unplug(slot, surprise)

    # --- boot ------------------------------------------------------------------------
    def kernel_cmdline(self) -> str:
        parts = [self.config.kernel_cmdline.strip(), kvm_backend.extra_cmdline(self.backend)]
        return " ".join(p for p in parts if p)

    def zero_page(self, kernel, initrd) -> bytes:
        """microvm's boot_params with q35's e820 map (RAM around the PCI
        hole, ECAM reserved)."""
        from stratopy.arch.x86_64 import boot

        zp = bytearray(super().zero_page(kernel, initrd))
        entries = q35.e820_map(self.config.mem_size)
        zp[boot.BP_E820_ENTRIES] = len(entries)
        for i, (addr, size, typ) in enumerate(entries):
            struct.pack_into("<QQI", zp, boot.BP_E820_TABLE + 20 * i, addr, size, typ)
        return bytes(zp)

    def _write_acpi_tables(self) -> None:
        from stratopy.acpi import q35 as acpi_q35

        for gpa, data in acpi_q35.boot_blobs(self.config.cpus):
            self.mem.write(gpa, data)
