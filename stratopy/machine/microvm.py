"""The x86_64 microvm: builds a VM from a MachineConfig, cold or from a template.

Data flows one way: config -> build (KVM objects, memory, devices) -> run.
``build_for_boot`` loads a kernel; ``build_from_template`` rebuilds the same
component tree and applies the saved state instead. The snapshot walks the
same tree (see migration/snapshot.py).
"""

from __future__ import annotations

import enum
import os
import threading
import time
from typing import Callable

from stratopy import config as cfgmod
from stratopy.arch.x86_64 import cpu, layout
from stratopy.config import MachineConfig
from stratopy.devices.bus import Bus
from stratopy.devices.i8042 import I8042Device
from stratopy.devices.serial import Serial
from stratopy.devices.virtio.device import VIRTIO_ID_NET
from stratopy.devices.virtio.mmio import VirtioMmioTransport
from stratopy.errors import ConfigError, GuestError, KvmError, StratoError
from stratopy.kvm import backend as kvm_backend
from stratopy.kvm import exits, uapi
from stratopy.kvm.system import Kvm
from stratopy.logs import get_logger
from stratopy.machine import slots as slotmod
from stratopy.machine.eventloop import EventLoop
from stratopy.machine.vcpu_thread import VcpuRunner, install_kick_handler
from stratopy.memory import GuestMemory
from stratopy.migration.status import MigrationState

log = get_logger(__name__)


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"


# Slot and the slot layout live in slots.py (pure data, shared with the
# template facts); re-exported here for the machine's users.
Slot = slotmod.Slot


class MicroVm:
    """A running (or about to run) microvm. The main thread runs ``run()``."""

    MACHINE_TYPE = "microvm"      # machine/q35.py's Q35Vm builds on this class

    def __init__(self, config: MachineConfig):
        if config.machine_type != self.MACHINE_TYPE:
            raise ConfigError("-machine", f"{config.machine_type} needs its own machine class "
                                          f"(this is {self.MACHINE_TYPE})")
        self.config = config
        self.state = VmState.CREATED
        self.loop = EventLoop()
        self.pio = Bus()
        self.mmio = Bus()
        self.kvm: Kvm | None = None
        self.vm = None
        self.mem: GuestMemory | None = None
        self.vcpus: list = []
        self.vcpu_cpuids: list = []     # the CPUID each vCPU was given
        self.runners: list[VcpuRunner] = []
        self.slots: list[Slot] = []
        self.serial: Serial | None = None
        self.ged = None                 # acpi.ged.GedDevice (VMGenID, power button)
        self.serial_chardev = None
        self.chardevs: list = []
        self.backend = kvm_backend.detect()
        self.exit_code = 0
        self.shutdown_reason: str | None = None
        self.failure: GuestError | None = None     # why the guest could not continue
        self.event_sink: Callable[[str, dict], None] = lambda name, data: None
        self.migration = MigrationState()
        self._shutdown_once = threading.Lock()
        self._eventfds: list[int] = []
        self.timings: dict[str, float] = {}
        self._torn_down = False

    # ------------------------------------------------------------------
    # building
    # ------------------------------------------------------------------
    def _create_vm(self) -> None:
        self.kvm = Kvm()
        cpus = self.config.cpus
        max_vcpus = self.kvm.max_vcpus()
        if cpus > max_vcpus:
            raise ConfigError("-smp", f"{cpus} vCPUs requested, this KVM allows {max_vcpus}")
        self.vm = self.kvm.create_vm()
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

    def _map_memory(self) -> None:
        for slot, region in enumerate(self.mem.regions):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)

    def _create_vcpus(self, cpuids: list | None = None) -> None:
        """``cpuids``: a template's CPUID per vCPU (restore), else this host's."""
        supported = self.kvm.supported_cpuid()
        n = self.config.cpus
        brand = cpu.host_brand_string() if cpuids is None else b""
        for i in range(n):
            vcpu = self.vm.create_vcpu(i)
            # CPUID first: KVM validates later MSR/XSAVE writes against it.
            if cpuids is None:
                cpuid = type(supported).from_buffer_copy(supported)
                cpu.filter_cpuid(cpuid.entries[:cpuid.nent], i, n)
                cpu.fill_brand_string(cpuid.entries[:cpuid.nent], brand)
            else:
                cpuid = cpuids[i]
            vcpu.set_cpuid(cpuid)
            self.vcpus.append(vcpu)
            self.vcpu_cpuids.append(cpuid)      # saved in a template

    def _setup_boot_vcpus(self, entry: int) -> None:
        for vcpu in self.vcpus:
            sregs = vcpu.get_sregs()
            cpu.boot_sregs(sregs)
            vcpu.set_sregs(sregs)
            vcpu.set_regs(cpu.boot_regs(entry))
            vcpu.set_fpu(cpu.boot_fpu())
            vcpu.set_msrs(list(cpu.BOOT_MSRS))
            # LAPIC after SREGS: SET_SREGS (apic_base) resets the LAPIC.
            lapic = vcpu.get_lapic()
            cpu.set_lint(lapic)
            vcpu.set_lapic(lapic)
            if vcpu.index != 0:
                # APs wait for INIT/SIPI from the BSP.
                mp = uapi.kvm_mp_state(mp_state=uapi.KVM_MP_STATE_UNINITIALIZED)
                vcpu._set(uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state, bytes(mp))

    def _irq_callable(self, gsi: int) -> Callable[[], None]:
        """An edge on IOAPIC pin ``gsi``, raised synchronously with KVM_IRQ_LINE.

        Not an irqfd: for an IOAPIC pin KVM injects an irqfd from a kernel
        worker, which on a busy host waits for a CPU for milliseconds per
        interrupt (measured: a serial echo round trip several times slower
        than QEMU, which uses KVM_IRQ_LINE too). The two structs are built
        once: this runs on vCPU threads for every interrupt.
        """
        return self.vm.irq_pulse(gsi)

    def _setup_legacy_devices(self) -> None:
        from stratopy.chardev import Chardev

        serial_irq = self._irq_callable(layout.SERIAL_IRQ)
        out: Callable[[bytes], None] = lambda data: None
        if self.config.serial is not None:
            self.serial_chardev = Chardev(self.config.serial)
            self.serial_chardev.open()
            self.chardevs.append(self.serial_chardev)
            out = self.serial_chardev.write
        self.serial = Serial(irq=serial_irq, out=out)
        self.pio.insert(layout.SERIAL_PORT, 8, self.serial)
        self.pio.insert(layout.I8042_DATA_PORT, 5, I8042Device(reset=self._guest_reset))

    def _slot_plan(self, placement: dict[str, int] | None = None) -> list[Slot]:
        """StratoVirt's layout: 4 blk slots, 2 net slots (always present,
        replaceable), then the rest in order; see slots.plan_slots."""
        return slotmod.plan_slots(self.config, placement)

    def _make_device(self, slot: Slot):
        """The VirtioDevice and its backend for a slot's DeviceConfig."""
        from stratopy.machine import devices as devfactory
        return devfactory.make_device(self, slot)

    def _setup_virtio(self) -> None:
        self.slots = self._slot_plan()
        for slot in self.slots:
            # Every slot holds a device, the reserved ones too (a block device
            # of capacity 0 / a net device with no tap until device_add).
            self._plug(slot)
            self.mmio.insert(slot.base, layout.VIRTIO_MMIO_SIZE, slot.transport)

    def _plug(self, slot: Slot) -> None:
        device, backend = self._make_device(slot)
        slot.device, slot.backend = device, backend
        slot.transport = VirtioMmioTransport(device, self.mem, self._irq_callable(slot.irq))
        fds = []
        # One ioeventfd per queue on QueueNotify (datamatch = queue index): the
        # guest's notify write is absorbed by KVM and wakes the device thread.
        for q in range(len(device.queue_sizes)):
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._eventfds.append(efd)
            self.vm.register_ioeventfd(efd, slot.base + 0x50, 4, datamatch=q)
            self.loop.add_reader(efd, self._notify_cb(efd, slot, q))
            fds.append(efd)
        slot.notify_fds = tuple(fds)
        if hasattr(device, "requeue"):
            # A device that served a bounded batch runs again through its
            # queue's ioeventfd: behind the other fds already ready.
            device.requeue = lambda q, fds=slot.notify_fds: os.eventfd_write(fds[q], 1)
        if device.device_type == VIRTIO_ID_NET:
            self._wire_net(slot)

    @staticmethod
    def _notify_cb(efd: int, slot: Slot, q: int) -> Callable[[], None]:
        def cb() -> None:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                return
            slot.transport.notify(q)
        return cb

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

    def _load_guest(self) -> int:
        # Cold boot only: a warm start never loads a kernel.
        from stratopy.arch.x86_64 import boot, mptable

        mem = self.mem
        kernel = boot.load_kernel(mem, self.config.kernel)
        initrd = None
        if self.config.initrd:
            below_4g = layout.ram_layout(self.config.mem_size)[0][1]
            initrd = boot.load_initrd(mem, self.config.initrd, kernel.end, below_4g,
                                      kernel.initrd_addr_max)
        boot.write_cmdline(mem, self.kernel_cmdline(), kernel.cmdline_max)
        mem.write(layout.ZERO_PAGE_ADDR, boot.build_zero_page(kernel, self.config.mem_size, initrd))
        addr, table = mptable.build(self.config.cpus)
        mem.write(addr, table)
        self._write_acpi_tables()
        mem.write(layout.GDT_ADDR, cpu.gdt_bytes())
        mem.write(layout.IDT_ADDR, bytes(8))
        for gpa, data in cpu.page_tables():
            mem.write(gpa, data)
        return kernel.entry

    def build_for_boot(self) -> None:
        t0 = time.monotonic()
        self._create_vm()
        c = self.config
        self.mem = GuestMemory.for_boot(layout.ram_layout(c.mem_size), mem_path=c.mem_path,
                                        share=c.mem_share, prealloc=c.mem_prealloc,
                                        dump_guest_core=c.dump_guest_core)
        self._map_memory()
        self._create_vcpus()
        self._setup_legacy_devices()
        self._setup_ged()
        self._setup_virtio()
        entry = self._load_guest()
        self._setup_boot_vcpus(entry)
        self.timings["build"] = time.monotonic() - t0

    def build_from_template(self, prepared=None) -> None:
        """``prepared``: a template already opened and validated
        (restore.prepare_template; the template server's pool members),
        else the one ``-incoming`` names."""
        from stratopy.migration import restore

        t0 = time.monotonic()
        if prepared is None:
            restore.restore_machine(self, self.config.incoming)
        else:
            restore.apply_template(self, prepared, "done")
        # Every warm start (a template server's clones too) is a new machine:
        # a new generation ID before its first KVM_RUN, irqchip restored.
        self.renew_generation_id()
        if not self.config.dump_guest_core:
            # the template's RAM is guest memory too (StratoVirt marks every
            # host mapping of guest RAM, whatever backs it)
            self.mem.exclude_from_core_dump()
        self.timings["build"] = time.monotonic() - t0

    # --- a template server's clone (stratopy.tplserver.member) -----------------
    def attach_clone_parts(self, serial_chardev, drives: dict) -> None:
        """Give a pool member, restored without per-VM parts, its own: the
        serial chardev (opened; None: no serial output) and, per drive id,
        an opened FileBackend of the template's size (the guest's view of
        the disk does not change: no config interrupt). Before start()."""
        if serial_chardev is not None:
            self.serial_chardev = serial_chardev
            self.chardevs.append(serial_chardev)
            self.serial.set_output(serial_chardev.write)
        for slot in self.slots:
            cfg = slot.config
            if cfg is None or cfg.drive is None or cfg.drive.id not in drives:
                continue
            old = slot.backend
            slot.device.adopt_backend(drives[cfg.drive.id])
            slot.backend = drives[cfg.drive.id]
            if old is not None:
                old.close()

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

        self.ged = ged.GedDevice(irq=self._irq_callable(layout.GED_IRQ),
                                 poweroff=self._guest_poweroff)
        self.mmio.insert(layout.GED_MMIO_ADDR, ged.MMIO_SIZE, self.ged)

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

    # ------------------------------------------------------------------
    # running
    # ------------------------------------------------------------------
    def start(self) -> None:
        install_kick_handler()
        for ch in self.chardevs:
            ch.attach(self.loop, self._chardev_input(ch))
        for vcpu in self.vcpus:
            r = VcpuRunner(vcpu, self.pio, self.mmio, self.loop.device_lock, self._vcpu_stopped)
            self.runners.append(r)
        paused = self.config.start_paused and self.config.incoming is None
        for r in self.runners:
            r.start(paused=paused)
        self.state = VmState.PAUSED if paused else VmState.RUNNING

    def _chardev_input(self, ch) -> Callable[[bytes], None]:
        """Input from a chardev to the device it feeds, loss-free and bounded
        (chardev.ConsoleInput: the chardev is not read while the device
        cannot take more)."""
        from stratopy.chardev import ConsoleInput

        sink: Callable[[bytes], int] | None = None
        if ch is self.serial_chardev:
            sink = self.serial.enqueue_input
        else:
            for slot in self.slots:
                if slot.backend is ch and hasattr(slot.device, "enqueue_input"):
                    sink = slot.device.enqueue_input
        if sink is None:
            return lambda data: None
        return ConsoleInput(ch, self.loop, sink).feed

    def _wire_net(self, slot: Slot) -> None:
        """Tap -> device RX on the device thread; stop polling the tap while
        the guest has no receive buffer (never busy-spin), re-arm on rx_ready.
        The tap is ``slot.backend`` at each call: hot-replace swaps it (None:
        nothing to poll)."""
        dev, loop = slot.device, self.loop

        def readable() -> None:
            dev.on_backend_readable()
            if dev.rx_blocked and slot.backend is not None:
                loop.remove_reader(slot.backend.fileno())

        def rearm() -> None:
            # Posted with call_soon, so it runs without device_lock: take it,
            # as every other device callback on this thread does (a vCPU may
            # be resetting the device through its registers right now).
            with loop.device_lock:
                if slot.backend is None:
                    return
                loop.add_reader(slot.backend.fileno(), readable)
                readable()
        slot.net_readable = readable
        dev.rx_ready = lambda: loop.call_soon(rearm)
        if slot.backend is not None:
            loop.add_reader(slot.backend.fileno(), readable)

    # --- hot-replace (QMP device_add / device_del; device thread) -------------
    def hot_bind(self, slot: Slot, config: cfgmod.DeviceConfig, backend) -> None:
        """Bind an opened ``backend`` (drive or tap) into the free replaceable
        ``slot`` as device ``config``; the guest is notified (block: capacity
        change; net: link up). vCPUs may be running: device state changes
        under device_lock, as their register accesses do."""
        from stratopy.machine import devices as devfactory

        with self.loop.device_lock:
            if slot.kind == slotmod.BLK:
                slot.device.replace_backend(backend, serial=config.serial or "")
            else:
                slot.device.replace_backend(backend, mac=devfactory.mac_bytes(config.mac))
            slot.config, slot.backend, slot.hot = config, backend, True
            if slot.kind == slotmod.NET:
                self.loop.add_reader(backend.fileno(), slot.net_readable)

    def hot_unbind(self, slot: Slot) -> None:
        """Take the backend out of replaceable ``slot`` and close it: the
        slot is empty again (block: capacity 0, requests fail; net: link
        down, no tap)."""
        with self.loop.device_lock:
            old = slot.backend
            if slot.kind == slotmod.NET and old is not None:
                self.loop.remove_reader(old.fileno())
            slot.device.replace_backend(None)
            slot.config, slot.backend, slot.hot = None, None, False
        close = getattr(old, "close", None)
        if close is not None:
            try:
                close()
            except OSError:
                log.debug("closing a hot-replaced backend failed", exc_info=True)

    def run(self) -> int:
        """Run the device loop on this thread until the VM ends; return the exit code."""
        try:
            self.loop.run()
        finally:
            self.teardown()
        return self.exit_code

    def _vcpu_stopped(self, action: str, ex) -> None:
        """Called on a vCPU thread when the guest ended or failed."""
        if action == exits.SHUTDOWN:
            reason = "guest-reset" if isinstance(ex, exits.Shutdown) else "guest-shutdown"
            self.request_shutdown(reason, guest=True, code=0)
            return
        # FATAL: one line with vCPU, RIP and the instruction bytes there.
        vcpu = None
        for r in self.runners:
            if r.thread is threading.current_thread():
                vcpu = r.vcpu
        # Kept for the CLI, which reports it once (stderr, and the -D log).
        self.failure = self._describe_failure(vcpu, ex)
        self.request_shutdown("internal-error", guest=False, code=1)

    def _describe_failure(self, vcpu, ex) -> GuestError:
        if isinstance(ex, exits.InternalError):
            what = exits.SUBERROR_NAMES.get(ex.suberror, f"internal error {ex.suberror}")
        elif isinstance(ex, exits.FailEntry):
            what = f"failed VM entry (hardware reason {ex.reason:#x})"
        elif isinstance(ex, exits.Unknown):
            what = f"unhandled exit reason {ex.reason}"
        else:
            what = f"vCPU error: {ex}"
        rip, insn = None, b""
        if vcpu is not None:
            try:
                regs = vcpu.get_regs()
                rip = regs.rip
                gpa = vcpu.translate(rip)
                if gpa is not None and self.mem.check(gpa, 15):
                    insn = self.mem.read(gpa, 15)
            except StratoError:
                pass
        return GuestError(what, vcpu.index if vcpu else None, rip, insn)

    def _guest_reset(self) -> None:
        """i8042 reset (``reboot=k``): the end of a microvm."""
        self.request_shutdown("guest-reset", guest=True, code=0)

    def request_shutdown(self, reason: str, guest: bool, code: int = 0) -> None:
        """End the VM (thread-safe, idempotent): SHUTDOWN event, then stop the loop."""
        if not self._shutdown_once.acquire(blocking=False):
            return
        self.shutdown_reason = reason
        self.exit_code = code

        def finish() -> None:
            self.state = VmState.SHUTDOWN
            self.event_sink("SHUTDOWN", {"guest": guest, "reason": reason})
            self.loop.stop()
        self.loop.call_soon(finish)

    # --- pause / resume (loop thread) -----------------------------------------
    def pause_vcpus(self) -> None:
        for r in self.runners:
            r.pause_requested = True
        for r in self.runners:
            if not r.pause():
                # Leave the VM exactly as it was: running.
                self.resume_vcpus()
                raise StratoError(f"vCPU {r.vcpu.index} did not pause in time")

    def resume_vcpus(self) -> None:
        for r in self.runners:
            r.resume()

    def pause(self) -> None:
        self.pause_vcpus()
        self.state = VmState.PAUSED
        self.event_sink("STOP", {})

    def resume(self) -> None:
        self.resume_vcpus()
        self.state = VmState.RUNNING
        self.event_sink("RESUME", {})

    def teardown(self) -> None:
        """Stop vCPUs, close every fd and mapping. Idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        for r in self.runners:
            r.stop()
        for ch in self.chardevs:
            try:
                ch.close()
            except Exception:
                log.debug("closing chardev failed", exc_info=True)
        for slot in self.slots:
            close = getattr(slot.backend, "close", None)
            if close:
                try:
                    close()
                except Exception:
                    pass
        for efd in self._eventfds:
            try:
                os.close(efd)
            except OSError:
                pass
        self._eventfds = []
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()
        if self.mem is not None:
            self.mem.close()
        self.loop.close()
