"""The x86_64 microvm: StratoVirt's microvm on the generic Machine.

What is microvm's own: its RAM layout, the virtio-mmio slot plan
(slots.py: StratoVirt's reserved blk/net slots), the platform (8250, i8042,
the ACPI GED with VMGenID and the power button), the kernel command line
(virtio_mmio.device= for a guest with acpi=off) and the cold-boot load
(kernel, MP table, ACPI tables, page tables). How it is built, for a boot
or from a template, is stratopy/builder.py; running, pausing, the vCPUs
and the devices' wiring are Machine's (base.py) and DeviceManager's.
"""

from __future__ import annotations

from stratopy.arch.x86_64 import cpu, layout
from stratopy.config import MachineConfig
from stratopy.errors import ConfigError, KvmError
from stratopy.kvm import backend as kvm_backend
from stratopy.kvm import uapi
from stratopy.logs import get_logger
from stratopy.machine import slots as slotmod
from stratopy.machine.base import Machine, VmState

log = get_logger(__name__)

__all__ = ["MicroVm", "VmState", "Slot"]

# Slot and the slot layout live in slots.py (pure data, shared with the
# template facts); re-exported here for the machine's users.
Slot = slotmod.Slot


class MicroVm(Machine):
    """A running (or about to run) microvm. The main thread runs ``run()``."""

    machine_type = "microvm"

    def __init__(self, config: MachineConfig):
        # a subclass (machine/q35.py's Q35Vm) has its own machine_type
        if config.machine_type != self.machine_type:
            raise ConfigError("-machine", f"{config.machine_type} needs its own machine class "
                                          f"(this is {self.machine_type})")
        super().__init__(config)

    @property
    def ged(self):
        """acpi.ged.GedDevice (VMGenID, power button); the device manager's."""
        return self.devices.acpi

    # ------------------------------------------------------------------
    # building steps (stratopy.builder calls them)
    # ------------------------------------------------------------------
    @classmethod
    def ram_layout_of(cls, config: MachineConfig) -> list[tuple[int, int]]:
        return layout.ram_layout(config.mem_size)

    def setup_vm(self) -> None:
        # TSS and identity map must be placed before any vCPU exists (VMX needs
        # them for real-mode emulation); both sit in the hole below 4 GiB.
        self.vm.set_tss_addr(layout.TSS_ADDR)
        try:
            self.vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        except KvmError as e:
            log.debug("KVM_SET_IDENTITY_MAP_ADDR refused (%s); continuing", e)
        # The in-kernel irqchip must exist before the vCPUs, so that each vCPU
        # gets an in-kernel LAPIC.
        self.vm.create_irqchip()
        self.vm.create_pit2()

    @staticmethod
    def plan_slots(config: MachineConfig, placement: dict[str, int] | None = None) -> list[Slot]:
        """StratoVirt's layout: 4 blk slots, 2 net slots (always present,
        replaceable), then the rest in order; see slots.plan_slots."""
        return slotmod.plan_slots(config, placement)

    def create_devices(self, slots: list[Slot]) -> None:
        """8250 + i8042, the GED, then every virtio-mmio slot (cold boot and
        warm start alike; a warm start restores their state afterwards)."""
        self.devices.add_legacy_devices(reset=self._guest_reset)
        # The CMOS RTC's ports only for a guest with ACPI, which finds it in
        # the DSDT without an IRQ. With acpi=off Linux registers it with IRQ
        # 8, which is virtio-mmio slot 3's: rtc-cmos then takes it unshared
        # (a kernel whose virtio_mmio is a module) and that slot's device
        # fails, or fails itself. Without the ports its probe stops first.
        self.devices.add_rtc(with_ports=not self.guest_acpi_off())
        self._setup_ged()
        self.devices.add_virtio_slots(slots)

    def kernel_cmdline(self) -> str:
        parts = [self.config.kernel_cmdline.strip()]
        extra = kvm_backend.extra_cmdline(self.backend)
        if extra:
            parts.append(extra)
        # The DSDT describes the slots; a guest using ACPI must not also get
        # them here (docs/acpi.md, "The tables"). Only acpi=off keeps them.
        if self.guest_acpi_off():
            for slot in self.slots:
                parts.append(f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE}@{slot.base:#x}:{slot.irq}")
        return " ".join(p for p in parts if p)

    def load_guest(self) -> int:
        # Cold boot only: a warm start never loads a kernel.
        from stratopy.arch.x86_64 import boot, mptable

        mem = self.mem
        kernel = boot.load_kernel(mem, self.config.kernel)
        initrd = None
        if self.config.initrd:
            below_4g = self.ram_layout()[0][1]
            initrd = boot.load_initrd(mem, self.config.initrd, kernel.end, below_4g,
                                      kernel.initrd_addr_max)
        boot.write_cmdline(mem, self.kernel_cmdline(), kernel.cmdline_max)
        mem.write(layout.ZERO_PAGE_ADDR, self.zero_page(kernel, initrd))
        addr, table = mptable.build(self.config.cpus)
        mem.write(addr, table)
        self._write_acpi_tables()
        mem.write(layout.GDT_ADDR, cpu.gdt_bytes())
        mem.write(layout.IDT_ADDR, bytes(8))
        for gpa, data in cpu.page_tables():
            mem.write(gpa, data)
        return kernel.entry

    def zero_page(self, kernel, initrd) -> bytes:
        """The boot_params page (its e820 map is boot.py's, for microvm's RAM)."""
        from stratopy.arch.x86_64 import boot

        return boot.build_zero_page(kernel, self.config.mem_size, initrd)

    def warm_started(self) -> None:
        # Every warm start (a template server's clones too) is a new machine:
        # a new generation ID before its first KVM_RUN, irqchip restored.
        self.renew_generation_id()

    # --- a template server's clone (stratopy.tplserver.member) -----------------
    def attach_clone_parts(self, serial_chardev, drives: dict, taps: dict | None = None,
                           consoles: dict | None = None) -> None:
        """Give a pool member, restored without per-VM parts, its own: the
        serial chardev (opened; None: no serial output); per drive id, an
        opened FileBackend of the template's size (the guest's view of the
        disk does not change: no config interrupt); per netdev id an opened
        Tap and per virtconsole chardev id an opened Chardev, for the
        devices built without them (``deferred_backends``; the net device
        keeps its restored MAC and link, the console its state). Before
        start(), which wires the chardevs' input."""
        if serial_chardev is not None:
            self.devices.serial_chardev = serial_chardev
            self.chardevs.append(serial_chardev)
            self.serial.set_output(serial_chardev.write)
        self.devices.adopt_backends(taps or {}, consoles or {})
        self.devices.adopt_drives(drives)

    # ------------------------------------------------------------------
    # ACPI: GED, VMGenID, power button (docs/acpi.md)
    # ------------------------------------------------------------------
    def guest_acpi_off(self) -> bool:
        """The kernel command line turns ACPI off (Kata, StratoVirt): the
        guest then finds its devices on the command line, as before ACPI."""
        return "acpi=off" in self.config.kernel_cmdline.split()

    def _write_acpi_tables(self) -> None:
        """Cold boot: RSDP/XSDT/FADT/MADT/DSDT and a fresh VMGenID GUID in
        the reserved BIOS area (invisible to a guest booted with acpi=off)."""
        from stratopy.arch.x86_64 import acpi

        for gpa, data in acpi.boot_blobs(self.config.cpus, self.slots):
            self.mem.write(gpa, data)

    def _setup_ged(self) -> None:
        """The GED page on the MMIO bus, its interrupt on the reserved pin
        ``layout.GED_IRQ``; a guest poweroff through its sleep register ends
        the VM (exit 0). Cold boot and warm start alike."""
        from stratopy.acpi import ged

        device = ged.GedDevice(irq=self.irq_line(layout.GED_IRQ),
                               poweroff=self._guest_poweroff)
        self.devices.add_acpi_device(device, layout.GED_MMIO_ADDR, ged.MMIO_SIZE)

    def _guest_poweroff(self) -> None:
        self.request_shutdown("guest-shutdown", guest=True, code=0)

    def renew_generation_id(self) -> str:
        """Warm start: write a new random VMGenID GUID into guest memory and
        raise the GED's VMGenID event, so that the guest's vmgenid driver
        reseeds its RNG as soon as it runs. Call after the irqchip state is
        restored and before the first KVM_RUN (the edge waits in the IOAPIC/
        LAPIC). Returns the new ID as text."""
        from stratopy.acpi import ged

        guid = ged.new_generation_id()
        with self.loop.device_lock:
            self.mem.write(layout.VMGENID_GUID_ADDR, guid)
            self.ged.raise_event(ged.EVENT_VMGENID)
        return ged.generation_id_string(guid)

    def generation_id(self) -> str:
        """The VMGenID GUID the guest sees now (QMP query-vm-generation-id)."""
        from stratopy.acpi import ged

        return ged.generation_id_string(self.mem.read(layout.VMGENID_GUID_ADDR, ged.GUID_SIZE))

    def guest_uses_acpi_events(self) -> bool:
        """The guest's GED driver took the GED interrupt: Linux's evged
        unmasks the pin when it binds, a guest with acpi=off (or without
        ACPI) leaves it masked."""
        chip = uapi.kvm_irqchip.from_buffer_copy(self.vm.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC))
        return not chip.chip.ioapic.redirtbl[layout.GED_IRQ].fields.mask

    def request_powerdown(self) -> None:
        """QMP system_powerdown: press the ACPI power button when the guest
        listens to the GED (it then shuts itself down and powers off through
        the sleep register); otherwise end the VM at once, as StratoVirt's
        microvm does."""
        from stratopy.acpi import ged

        if self.state in (VmState.RUNNING, VmState.PAUSED) and self.guest_uses_acpi_events():
            with self.loop.device_lock:
                self.ged.raise_event(ged.EVENT_POWER_BUTTON)
            return
        self.request_shutdown("host-qmp-system-powerdown", guest=False, code=0)
