"""vCPU threads: the KVM_RUN loop, exit dispatch, and the pause protocol.

Pause protocol (stop, snapshot): the controller sets ``pause_requested``,
sets kvm_run.immediate_exit and signals the thread so that a KVM_RUN in
progress returns EINTR. Before parking, the thread enters KVM_RUN once more
with immediate_exit set: KVM completes any pending PIO/MMIO read into the
guest registers and returns at once, so the saved state is consistent
(KVM API doc, "immediate_exit"). A parked thread is outside KVM_RUN, so the
controller may then read or write the vCPU's state.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

from stratopy.errors import KvmError
from stratopy.kvm import exits
from stratopy.kvm.exits import CONTINUE, FATAL, IoIn, IoOut, MmioRead, MmioWrite, handle_exit
from stratopy.logs import get_logger

log = get_logger(__name__)

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> None:
    """A no-op handler: the signal's only job is to interrupt KVM_RUN (EINTR).

    Must be called from the main thread before vCPU threads start.
    """
    signal.signal(KICK_SIGNAL, lambda *_: None)


class VcpuRunner:
    def __init__(self, vcpu, pio, mmio, device_lock,
                 on_stop: Callable[[str, object], None]):
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.lock = device_lock
        self.on_stop = on_stop            # (action, exit) -> machine decides
        self.cond = threading.Condition()
        self.pause_requested = False
        self.parked = False
        self.exit_requested = False
        self.finished = False
        self.first_run_at: float | None = None   # time.time() of the first KVM_RUN
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.index}",
                                       daemon=True)
        self._gate: threading.Lock | None = None    # held while prestarted

    # --- controller side ----------------------------------------------------
    def prestart(self) -> None:
        """Create the thread now, blocked before its first KVM_RUN until
        start(): a template server's pool member does this while it waits,
        so a clone's start is a lock release, not a thread creation."""
        self._gate = threading.Lock()
        self._gate.acquire()
        self.thread.start()

    def start(self, paused: bool = False) -> None:
        self.pause_requested = paused
        if self._gate is not None:
            self._gate.release()
        else:
            self.thread.start()

    def _kick(self) -> None:
        self.vcpu.kick_prepare()
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def pause(self, timeout: float = 10.0) -> bool:
        with self.cond:
            self.pause_requested = True
        deadline_ok = True
        with self.cond:
            waited = 0.0
            while not self.parked and not self.finished:
                self._kick()
                self.cond.wait(0.05)
                waited += 0.05
                if waited >= timeout:
                    deadline_ok = False
                    break
        return deadline_ok

    def resume(self) -> None:
        with self.cond:
            self.pause_requested = False
            self.cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        with self.cond:
            self.exit_requested = True
            self.cond.notify_all()
        if self._gate is not None and self._gate.locked():
            self._gate.release()            # prestarted, never started
        if self.thread.is_alive():
            self._kick()
            self.thread.join(timeout)
            while self.thread.is_alive() and timeout > 0:
                self._kick()
                self.thread.join(0.1)
                timeout -= 0.1

    # --- vCPU thread ----------------------------------------------------------
    def _park(self) -> None:
        # Complete a pending IN/MMIO read before anyone looks at the registers.
        self.vcpu.kick_prepare()
        self.vcpu.run_once()
        with self.cond:
            self.parked = True
            self.cond.notify_all()
            while self.pause_requested and not self.exit_requested:
                self.cond.wait()
            self.parked = False

    def _main(self) -> None:
        vcpu, pio, mmio, lock = self.vcpu, self.pio, self.mmio, self.lock
        if self._gate is not None:
            self._gate.acquire()            # released by start() or stop()
        self.first_run_at = time.time()
        try:
            while not self.exit_requested:
                if self.pause_requested:
                    self._park()
                    continue
                ex = vcpu.run_once()
                t = type(ex)
                # Hot path: port and MMIO accesses.
                if t is IoOut or t is MmioWrite:
                    with lock:
                        handle_exit(ex, pio, mmio)
                    continue
                if t is IoIn or t is MmioRead:
                    with lock:
                        _, data = handle_exit(ex, pio, mmio)
                    vcpu.complete_in(data)
                    continue
                action, _ = handle_exit(ex, pio, mmio)
                if action == CONTINUE:
                    continue
                self.on_stop(action, ex)
                break
        except KvmError as e:
            self.on_stop(FATAL, e)
        except Exception as e:  # never let a vCPU thread die silently
            log.exception("vCPU %d thread failed", vcpu.index)
            self.on_stop(FATAL, e)
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()


__all__ = ["VcpuRunner", "install_kick_handler", "exits"]
