"""What every machine type has: KVM VM, memory, vCPUs, devices, lifecycle.

``Machine`` holds the generic parts; a machine type (``MicroVm``; q35
later) subclasses it with its memory layout, its slot plan, its platform
devices and how a kernel is loaded. How the parts are put together, for a
cold boot or from a template, is the builder's (stratopy/builder.py): the
methods here are the steps it calls, each guarded by the lifecycle.

Lifecycle (``VmState``; ``Machine.transition`` refuses any other move)::

    CREATED --start--> RUNNING <--pause/resume--> PAUSED
       |                  |                          |
       +------------------+--------> SHUTDOWN <------+
"""

from __future__ import annotations

import enum
import threading
from typing import Callable

from stratopy.arch.x86_64 import cpu
from stratopy.config import MachineConfig
from stratopy.errors import GuestError, LifecycleError, StratoError
from stratopy.kvm import backend as kvm_backend
from stratopy.kvm import exits, uapi
from stratopy.kvm.system import Kvm
from stratopy.logs import get_logger
from stratopy.machine.device_manager import DeviceManager
from stratopy.machine.eventloop import EventLoop
from stratopy.machine.schema import MachineState
from stratopy.machine.vcpu_thread import VcpuRunner, install_kick_handler
from stratopy.memory import GuestMemory
from stratopy.migration.status import MigrationState

log = get_logger(__name__)


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"


#: state -> the states it may move to
TRANSITIONS = {
    VmState.CREATED: (VmState.RUNNING, VmState.PAUSED, VmState.SHUTDOWN),
    VmState.RUNNING: (VmState.PAUSED, VmState.SHUTDOWN),
    VmState.PAUSED: (VmState.RUNNING, VmState.SHUTDOWN),
    VmState.SHUTDOWN: (),
}


class Machine:
    """A VM of some machine type; the main thread runs ``run()``."""

    machine_type = ""

    def __init__(self, config: MachineConfig):
        self.config = config
        self.state = VmState.CREATED
        self.loop = EventLoop()
        self.devices = DeviceManager(self)
        self.kvm: Kvm | None = None
        self.vm = None
        self.mem: GuestMemory | None = None
        self.vcpus: list = []
        self.vcpu_cpuids: list = []     # the CPUID each vCPU was given
        self.runners: list[VcpuRunner] = []
        self.built = False              # the builder ran its recipe
        # netdev and chardev ids whose backends a template server's request
        # brings (attach_clone_parts): their devices are built without one
        self.deferred_backends: frozenset = frozenset()
        self.backend = kvm_backend.detect()
        self.exit_code = 0
        self.shutdown_reason: str | None = None
        self.failure: GuestError | None = None     # why the guest could not continue
        self.event_sink: Callable[[str, dict], None] = lambda name, data: None
        self.migration = MigrationState()
        self._shutdown_once = threading.Lock()
        self.timings: dict[str, float] = {}
        self._torn_down = False
        # (saved kvm_clock_data, clock= policy) of a restore, set again at
        # start(): see start()
        self._restored_clock: tuple[bytes, str] | None = None

    # --- what the device manager holds, under the names QMP and the CLI use ---
    @property
    def pio(self):
        return self.devices.pio

    @property
    def mmio(self):
        return self.devices.mmio

    @property
    def slots(self) -> list:
        return self.devices.slots

    @property
    def serial(self):
        return self.devices.serial

    @property
    def serial_chardev(self):
        return self.devices.serial_chardev

    @property
    def chardevs(self) -> list:
        return self.devices.chardevs

    def hot_bind(self, slot, config, backend) -> None:
        self.devices.hot_bind(slot, config, backend)

    def hot_unbind(self, slot) -> None:
        self.devices.hot_unbind(slot)

    # ------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------
    def transition(self, to: VmState) -> None:
        """Move to ``to``; LifecycleError for a move the lifecycle forbids."""
        if to is not self.state and to not in TRANSITIONS[self.state]:
            raise LifecycleError(f"the VM is {self.state.value}: it cannot become {to.value}")
        self.state = to

    def require(self, *states: VmState) -> None:
        if self.state not in states:
            raise LifecycleError(f"the VM is {self.state.value} (expected "
                                 f"{' or '.join(s.value for s in states)})")

    # ------------------------------------------------------------------
    # building steps (called by stratopy.builder, in its order)
    # ------------------------------------------------------------------
    @classmethod
    def ram_layout_of(cls, config: MachineConfig) -> list[tuple[int, int]]:
        """Machine type: [(gpa, size), ...] of guest RAM for ``config``."""
        raise NotImplementedError

    def ram_layout(self) -> list[tuple[int, int]]:
        return self.ram_layout_of(self.config)

    def create_vm(self) -> None:
        """The KVM VM and what must exist before any vCPU (arch set-up)."""
        self.require(VmState.CREATED)
        if self.vm is not None:
            raise LifecycleError("the VM is built already")
        self.kvm = Kvm()
        cpus = self.config.cpus
        max_vcpus = self.kvm.max_vcpus()
        if cpus > max_vcpus:
            from stratopy.errors import ConfigError
            raise ConfigError("-smp", f"{cpus} vCPUs requested, this KVM allows {max_vcpus}")
        self.vm = self.kvm.create_vm()
        self.setup_vm()

    def setup_vm(self) -> None:
        """Machine type: what the VM needs before its vCPUs (irqchip, ...)."""

    def set_memory(self, mem: GuestMemory) -> None:
        """Adopt ``mem`` as guest RAM and map it into the VM."""
        self.mem = mem
        for slot, region in enumerate(mem.regions):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)

    def create_vcpus(self, cpuids: list | None = None) -> None:
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

    def setup_boot_vcpus(self, entry: int) -> None:
        """Cold boot: every vCPU at the kernel's 64-bit entry (APs wait for SIPI)."""
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

    def irq_line(self, gsi: int) -> Callable[[], None]:
        """An edge on IOAPIC pin ``gsi``, raised synchronously with KVM_IRQ_LINE.

        Not an irqfd: for an IOAPIC pin KVM injects an irqfd from a kernel
        worker, which on a busy host waits for a CPU for milliseconds per
        interrupt (measured: a serial echo round trip several times slower
        than QEMU, which uses KVM_IRQ_LINE too). The two structs are built
        once: this runs on vCPU threads for every interrupt.
        """
        return self.vm.irq_pulse(gsi)

    @staticmethod
    def plan_slots(config: MachineConfig, placement: dict[str, int] | None = None) -> list:
        """Machine type: the virtio slots ``config`` makes (no device yet),
        devices placed as ``placement`` (id -> slot) says where it can."""
        raise NotImplementedError

    def create_devices(self, slots: list) -> None:
        """Machine type: platform devices, then the virtio ``slots``."""
        raise NotImplementedError

    def load_guest(self) -> int:
        """Machine type, cold boot: kernel, tables, page tables -> entry point."""
        raise NotImplementedError

    def warm_started(self) -> None:
        """Machine type: what every warm start does before the first KVM_RUN."""

    # ------------------------------------------------------------------
    # persist
    # ------------------------------------------------------------------
    def snapshot_state(self) -> MachineState:
        """The whole machine's state; the vCPUs must be parked (PAUSED)."""
        from stratopy.machine import vcpu_state

        self.require(VmState.PAUSED)
        kvm = self.kvm
        has_xsave = bool(kvm.check_extension(uapi.KVM_CAP_XSAVE))
        has_xcrs = bool(kvm.check_extension(uapi.KVM_CAP_XCRS))
        msr_indices = kvm.msr_index_list()
        vcpus = [vcpu_state.save_vcpu(v, msr_indices, has_xsave, has_xcrs,
                                      cpuid=cpu.cpuid_to_plain(c))
                 for v, c in zip(self.vcpus, self.vcpu_cpuids)]
        return MachineState(machine_type=self.machine_type, vm=vcpu_state.save_vm(self.vm),
                            vcpus=vcpus, devices=self.devices.state())

    def restore_state(self, state: MachineState) -> None:
        """Apply a validated MachineState to a machine built from the command
        line (vCPUs created with the template's CPUID, devices created):
        VM-wide state (irqchips, PIT, clock) before the vCPUs, as Firecracker
        does; then the vCPUs; then the devices."""
        from stratopy.machine import vcpu_state

        self.require(VmState.CREATED)
        clock = self.config.incoming.clock if self.config.incoming is not None else "realtime"
        vcpu_state.restore_vm(self.vm, state.vm, clock)
        self._restored_clock = (state.vm.clock, clock)
        for vcpu, st in zip(self.vcpus, state.vcpus):
            vcpu_state.restore_vcpu(vcpu, st)
        self.devices.restore(state.devices)

    # ------------------------------------------------------------------
    # running
    # ------------------------------------------------------------------
    def prestart_vcpus(self) -> None:
        """Create the vCPU threads, held before their first KVM_RUN until
        start() (a template server's pool member, while it waits)."""
        self.require(VmState.CREATED)
        install_kick_handler()
        for vcpu in self.vcpus:
            r = VcpuRunner(vcpu, self.pio, self.mmio, self.loop.device_lock, self._vcpu_stopped)
            self.runners.append(r)
            r.prestart()

    def start(self) -> None:
        self.require(VmState.CREATED)
        if not self.built:
            raise LifecycleError("the VM is not built")
        install_kick_handler()
        if self._restored_clock is not None:
            # kvm-clock runs from the restore's KVM_SET_CLOCK on, vCPUs
            # stopped or not: a template server's pool member restored long
            # before its request would start with the time it waited in the
            # pool on its clock (clock=saved), and the guest would first run
            # every timer due meanwhile (writeback, journal commits: disk
            # I/O before it reads the serial; docs/performance.md). Set it
            # again now, as QEMU's kvmclock does when the VM starts running.
            raw, policy = self._restored_clock
            self._restored_clock = None
            self.vm.set_clock(raw, advance_to_now=policy == "realtime")
        for ch in self.chardevs:
            ch.attach(self.loop, self._chardev_input(ch))
        for vcpu in self.vcpus[len(self.runners):]:     # prestarted ones exist
            r = VcpuRunner(vcpu, self.pio, self.mmio, self.loop.device_lock, self._vcpu_stopped)
            self.runners.append(r)
        paused = self.config.start_paused and self.config.incoming is None
        for r in self.runners:
            r.start(paused=paused)
        self.transition(VmState.PAUSED if paused else VmState.RUNNING)

    def _chardev_input(self, ch) -> Callable[[bytes], None]:
        """Input from a chardev to the device it feeds, loss-free and bounded
        (chardev.ConsoleInput: the chardev is not read while the device
        cannot take more)."""
        from stratopy.chardev import ConsoleInput

        sink = self.devices.input_sink(ch)
        if sink is None:
            return lambda data: None
        return ConsoleInput(ch, self.loop, sink).feed

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
        """i8042 reset (``reboot=k``): the end of the VM."""
        self.request_shutdown("guest-reset", guest=True, code=0)

    def request_shutdown(self, reason: str, guest: bool, code: int = 0) -> None:
        """End the VM (thread-safe, idempotent): SHUTDOWN event, then stop the loop."""
        if not self._shutdown_once.acquire(blocking=False):
            return
        self.shutdown_reason = reason
        self.exit_code = code

        def finish() -> None:
            self.transition(VmState.SHUTDOWN)
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
        self.require(VmState.RUNNING, VmState.PAUSED)
        self.pause_vcpus()
        self.devices.kernel_devices("pause")
        self.transition(VmState.PAUSED)
        self.event_sink("STOP", {})

    def resume(self) -> None:
        self.require(VmState.RUNNING, VmState.PAUSED)
        self.devices.kernel_devices("resume")
        self.resume_vcpus()
        self.transition(VmState.RUNNING)
        self.event_sink("RESUME", {})

    def teardown(self) -> None:
        """Stop vCPUs, close every fd and mapping. Idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        for r in self.runners:
            r.stop()
        self.devices.close()
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()
        if self.mem is not None:
            self.mem.close()
        self.loop.close()

