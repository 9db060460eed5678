"""The contract between a virtio device's logic and its transport.

A device is pure: no threads, no fds of its own beyond the injected backend.
The transport (mmio.py) owns the registers, the queues and the interrupt
status; it calls the device through these methods.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from stratopy.errors import StratoError, TemplateError

# Device ids (virtio spec 1.1 §5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

# Feature bits common to every device
VIRTIO_F_VERSION_1 = 32
VIRTIO_RING_F_EVENT_IDX = 29

# Device status bits
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80


class VirtioDevice:
    """Base class of virtio device logic.

    Subclasses set ``device_type``, ``queue_sizes`` (max size of each queue),
    ``avail_features`` (a bit mask; the transport always adds
    VIRTIO_F_VERSION_1) and ``label`` (the name that starts their broken
    reasons and template errors, e.g. "virtio-net"), and implement the hooks
    below. The helpers at the end (``_ready_queue``, ``_broke``,
    ``_check_offered``, ``_check_acked``) are shared by the devices.
    """

    device_type: int = 0
    queue_sizes: Sequence[int] = ()
    avail_features: int = 0
    label: str = "virtio"

    def __init__(self) -> None:
        self.acked_features = 0
        self.queues: list = []            # set by activate(): list[Queue]
        self.mem = None                   # set by activate(): GuestMemory
        self.signal_used: Callable[[int], None] = lambda q: None  # set by the transport
        # set by the transport: marks the device broken (DEVICE_NEEDS_RESET +
        # config interrupt). For device work that does not start from a queue
        # notification (e.g. a tap or console becoming readable); exceptions
        # out of process_queue() are turned into this by the transport itself.
        # Devices call it through _broke().
        self.signal_broken: Callable[[str], None] = lambda reason: None
        # set by the transport: the device's config space changed (e.g. a
        # hot-replaced backend changed the disk capacity, or virtio-net's link
        # status changed). The transport bumps ConfigGeneration and raises the
        # config interrupt once the driver is running.
        self.signal_config: Callable[[], None] = lambda: None
        # set by restore() when the restored config space differs from the
        # template's (virtio-net given a MAC of its own): the transport's
        # restore, which brings back the template's ConfigGeneration, then
        # signals the change (and clears this)
        self.restore_changed_config = False
        self.activated = False
        # set by _broke(): the device stops touching its queues until the
        # driver resets it (or it is activated again)
        self.broken = False

    # --- config space ----------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of the device config space; out of range reads as zeros."""
        return bytes(size)

    def write_config(self, offset: int, data: bytes) -> None:
        """Most devices have a read-only config space: ignore writes."""

    # --- lifecycle ---------------------------------------------------------
    def activate(self, mem, queues: list, signal_used: Callable[[int], None]) -> None:
        """Called once the driver sets DRIVER_OK. ``signal_used(qidx)`` raises
        the used-buffer interrupt for that queue (the transport decides)."""
        self.mem = mem
        self.queues = queues
        self.signal_used = signal_used
        self.activated = True
        self.broken = False

    def reset(self) -> None:
        """Called when the driver writes status 0: forget all queue state."""
        self.activated = False
        self.queues = []
        self.acked_features = 0
        self.broken = False

    def process_queue(self, index: int) -> None:
        """The driver notified queue ``index`` (MMIO write or ioeventfd).

        May raise DeviceError (or GuestMemoryError) for a broken queue: the
        transport catches it and marks the device NEEDS_RESET.
        """

    # --- snapshot -----------------------------------------------------------
    def state(self) -> Any:
        """A dataclass with this device's own state (config, positions)."""
        return None

    def restore(self, state: Any) -> None:
        """Apply a validated state (see each device's from_state)."""

    # --- helpers for the devices -----------------------------------------------
    def _ready_queue(self, index: int) -> Optional[Any]:
        """Queue ``index`` if the device may use it now (activated, not
        broken, the index exists, the driver made the queue ready); else None."""
        if not self.activated or self.broken or not 0 <= index < len(self.queues):
            return None
        q = self.queues[index]
        return q if q.ready else None

    def _serve_queue(self, index: int, handle: Callable[[Any], int]) -> None:
        """Pop the chains of queue ``index`` (at most a ring's worth per
        kick), complete each with ``handle(chain)`` -> bytes written, raise
        the used interrupt once; a broken chain or a failing ``handle``
        marks the device broken (``_broke``). For devices whose every chain
        is answered at once."""
        q = self._ready_queue(index)
        if q is None:
            return
        mem = self.mem
        used = 0
        try:
            for _ in range(q.size):
                chain = q.pop(mem)
                if chain is None:
                    break
                q.add_used(mem, chain.head, handle(chain))
                used += 1
        except Exception as e:  # noqa: BLE001 - DeviceError and anything else
            self._broke(e)
        if used:
            self.signal_used(index)

    def _broke(self, e: BaseException) -> None:
        """A queue turned out broken while the device worked on it: stop using
        the queues and tell the transport (``signal_broken``), with the reason
        prefixed by ``label``; an unexpected exception is named as an
        internal error. Never raises for a StratoError or plain Exception."""
        self.broken = True
        if isinstance(e, StratoError):
            self.signal_broken(f"{self.label}: {e}")
        else:
            self.signal_broken(f"{self.label}: internal error {type(e).__name__}: {e}")

    def _check_offered(self, avail: Any, offerable: int) -> int:
        """A template's ``offered_features`` (what the driver was offered; -1:
        this device's own offer): -> the offer, or TemplateError if it holds
        bits outside ``offerable`` (or is not a non-negative int)."""
        if avail == -1:
            avail = self.avail_features
        if type(avail) is not int or avail < 0 or avail & ~offerable:
            raise TemplateError(f"{self.label} state field offered_features {avail!r} holds "
                                f"features this device never offers")
        return avail

    def _check_acked(self, acked: Any, avail: int) -> int:
        """A template's ``acked_features`` checked against the offer ``avail``
        (device bits; VIRTIO_F_VERSION_1 is always offered): -> ``acked``, or
        TemplateError if it is not a non-negative int within the offer."""
        offered = avail | (1 << VIRTIO_F_VERSION_1)
        if type(acked) is not int or acked < 0 or acked & ~offered:
            raise TemplateError(f"{self.label} state field acked_features {acked!r} is not a "
                                f"subset of the offered features {offered:#x}")
        return acked
