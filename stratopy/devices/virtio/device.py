"""The contract between a virtio device's logic and its transport.

A device is pure: no threads, no fds of its own beyond the injected backend.
The transport (mmio.py) owns the registers, the queues and the interrupt
status; it calls the device through these methods.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

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

    Subclasses set ``device_type``, ``queue_sizes`` (max size of each queue)
    and ``avail_features`` (a bit mask; the transport always adds
    VIRTIO_F_VERSION_1), and implement the hooks below.
    """

    device_type: int = 0
    queue_sizes: Sequence[int] = ()
    avail_features: int = 0

    def __init__(self) -> None:
        self.acked_features = 0
        self.queues: list = []            # set by activate(): list[Queue]
        self.mem = None                   # set by activate(): GuestMemory
        self.signal_used: Callable[[int], None] = lambda q: None  # set by the transport
        # set by the transport: marks the device broken (DEVICE_NEEDS_RESET +
        # config interrupt). For device work that does not start from a queue
        # notification (e.g. a tap or console becoming readable); exceptions
        # out of process_queue() are turned into this by the transport itself.
        self.signal_broken: Callable[[str], None] = lambda reason: None
        # set by the transport: the device's config space changed (e.g. a
        # hot-replaced backend changed the disk capacity). The transport bumps
        # ConfigGeneration and raises the config interrupt once the driver
        # is running.
        self.signal_config: Callable[[], None] = lambda: None
        self.activated = False

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

    def reset(self) -> None:
        """Called when the driver writes status 0: forget all queue state."""
        self.activated = False
        self.queues = []
        self.acked_features = 0

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
