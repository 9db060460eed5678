"""virtio-balloon (virtio 1.1 §5.5): the host asks the guest for memory back.

The host sets a target, ``num_pages`` (4 KiB pages the guest should hand
over), in the config space and raises the config interrupt; the guest driver
allocates that many pages and lists their page frame numbers on the inflate
queue; the device gives the host the backing memory of each page back
(``discard``); when the target drops, the guest lists pages it takes back on
the deflate queue (nothing to do: a discarded page reads as zeros, or as
the backing file's content, when the guest touches it again). The driver
writes how many pages it holds into ``actual``; QMP ``query-balloon``
reports RAM minus that.

Queues (Linux numbers them in this order, skipping what is not negotiated;
no stats or free-page-hint queue is offered): 0 inflate, 1 deflate, and 2
free page reporting with ``free-page-reporting=on``
(VIRTIO_BALLOON_F_REPORTING): the guest posts ranges of free memory
(descriptor address and length) that the device discards the same way
before returning them. ``deflate-on-oom=on`` offers
VIRTIO_BALLOON_F_DEFLATE_ON_OOM (the guest may take balloon pages back
under memory pressure; nothing for the device to do).

Everything from the guest is untrusted: each PFN is checked against guest
RAM (a PFN outside it is skipped and counted, never discarded), a chain's
PFN list is bounded (``MAX_PFNS_PER_CHAIN``; Linux sends at most 256), and
reported ranges are cut to whole pages. A broken ring (the queue code's
DeviceError) marks the device broken through ``signal_broken``; nothing
raises out of ``process_queue``.

``discard(gpa, length)`` is injected (the machine passes guest memory's
``discard``: MADV_DONTNEED for private RAM, MADV_REMOVE for shared or file
backed RAM), so the device is a pure state machine. ``actual_changed`` (with
``call_later``) reports the guest's new ``actual`` at most once a second,
as StratoVirt's BALLOON_CHANGED timer does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from stratopy.devices.virtio.device import VirtioDevice
from stratopy.logs import get_logger

log = get_logger(__name__)

VIRTIO_ID_BALLOON = 5
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_REPORTING = 5

PAGE_SHIFT = 12                        # VIRTIO_BALLOON_PFN_SHIFT: always 4 KiB
PAGE = 1 << PAGE_SHIFT
QUEUE_SIZE = 256
INFLATE, DEFLATE, REPORTING = 0, 1, 2
MAX_PFNS_PER_CHAIN = 16384             # 64 KiB of PFNs: bounds one request's work
CONFIG_SIZE = 8                        # num_pages le32, actual le32
ACTUAL_OFFSET = 4
EVENT_DELAY = 1.0                      # seconds: StratoVirt's BALLOON_CHANGED timer

_CONFIG = struct.Struct("<II")


class BalloonDevice(VirtioDevice):
    device_type = VIRTIO_ID_BALLOON
    label = "virtio-balloon"

    def __init__(self, ram_size: int, discard: Callable[[int, int], None], *,
                 deflate_on_oom: bool = False, free_page_reporting: bool = False,
                 actual_changed: Callable[[int], None] | None = None,
                 call_later: Callable[[float, Callable[[], None]], None] | None = None) -> None:
        """``ram_size``: guest RAM in bytes. ``discard(gpa, length)``: give
        the host the memory of a page-aligned range inside one RAM region
        back (may raise OSError: counted, the guest is not told).
        ``actual_changed(guest_bytes)``: called through ``call_later(delay,
        fn)`` (the machine's timer) after the driver changed ``actual``."""
        super().__init__()
        if actual_changed is not None and call_later is None:
            raise ValueError("actual_changed needs a timer (call_later)")
        self.ram_pages = ram_size >> PAGE_SHIFT
        self.discard = discard
        self.avail_features = ((1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM if deflate_on_oom else 0)
                               | (1 << VIRTIO_BALLOON_F_REPORTING if free_page_reporting else 0))
        self.queue_sizes = (QUEUE_SIZE,) * (3 if free_page_reporting else 2)
        self.actual_changed = actual_changed
        self.call_later = call_later
        self._timer_armed = False
        self.num_pages = 0             # the host's target (config, set by QMP balloon)
        self.actual = 0                # pages the driver says it holds (config, written by it)
        # statistics, not state
        self.discarded_pages = 0
        self.rejected_pfns = 0
        self.discard_failures = 0

    # --- the host side (QMP) --------------------------------------------------
    def set_target(self, guest_bytes: int) -> None:
        """QMP ``balloon``: leave the guest ``guest_bytes`` of RAM (at most
        all of it); raises the config interrupt once the driver runs."""
        target = min(max(guest_bytes, 0) >> PAGE_SHIFT, self.ram_pages)
        self.num_pages = self.ram_pages - target
        self.signal_config()

    def guest_bytes(self) -> int:
        """QMP ``query-balloon``'s ``actual``: RAM minus what the driver
        holds (a driver claiming more than RAM counts as holding it all)."""
        return (self.ram_pages - min(self.actual, self.ram_pages)) << PAGE_SHIFT

    # --- config space -----------------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        data = _CONFIG.pack(self.num_pages, self.actual)
        if offset < 0 or size <= 0 or offset >= CONFIG_SIZE:
            return bytes(max(size, 0))
        return (data[offset:offset + size] + bytes(size))[:size]

    def write_config(self, offset: int, data: bytes) -> None:
        # Only ``actual`` is the driver's (num_pages is read-only for it);
        # Linux writes it whole, as one le32.
        if offset != ACTUAL_OFFSET or len(data) != 4:
            return
        new = int.from_bytes(data, "little")
        if new == self.actual:
            return
        self.actual = new
        if self.actual_changed is not None and not self._timer_armed:
            self._timer_armed = True
            self.call_later(EVENT_DELAY, self._report_actual)

    def _report_actual(self) -> None:
        self._timer_armed = False
        if self.actual_changed is not None:
            self.actual_changed(self.guest_bytes())

    # --- lifecycle ----------------------------------------------------------------
    def reset(self) -> None:
        # A driver that probes again starts with an empty balloon (and reads
        # the host's target, which stays).
        super().reset()
        self.actual = 0

    def process_queue(self, index: int) -> None:
        if index == INFLATE:
            self._serve_queue(INFLATE, self._inflate)
        elif index == DEFLATE:
            # the pages come back on their own when the guest touches them
            self._serve_queue(DEFLATE, lambda chain: 0)
        elif index == REPORTING:
            self._serve_queue(REPORTING, self._report)

    def _report(self, chain) -> int:
        """Discard the whole pages of each free range the guest reported."""
        for addr, length, _w in chain.buffers:
            start = (addr + PAGE - 1) & ~(PAGE - 1)
            end = (addr + length) & ~(PAGE - 1)
            if end > start:
                self._discard(start, end - start)
        return 0

    def _inflate(self, chain) -> int:
        """Discard the pages of the chain's PFN list, adjacent ones as one range."""
        mem = self.mem
        left = MAX_PFNS_PER_CHAIN
        run_start = run_len = 0
        for addr, length, is_write in chain.buffers:
            if is_write or left <= 0:
                continue
            n = min(length // 4, left)
            left -= n
            for (pfn,) in struct.iter_unpack("<I", mem.read(addr, 4 * n)):
                gpa = pfn << PAGE_SHIFT
                if run_len and gpa == run_start + run_len and mem.check(run_start, run_len + PAGE):
                    run_len += PAGE
                    continue
                if run_len:
                    self._discard(run_start, run_len)
                    run_len = 0
                if mem.check(gpa, PAGE):
                    run_start, run_len = gpa, PAGE
                else:
                    self.rejected_pfns += 1
                    if self.rejected_pfns == 1:
                        log.warning("virtio-balloon: the guest gave page frame %#x, outside "
                                    "guest RAM (skipped; further ones only counted)", pfn)
        if run_len:
            self._discard(run_start, run_len)
        return 0

    def _discard(self, gpa: int, length: int) -> None:
        try:
            self.discard(gpa, length)
        except OSError as e:
            # e.g. huge pages (a 4 KiB hole cannot be punched): the guest
            # keeps working, the host simply does not get the memory back
            self.discard_failures += 1
            if self.discard_failures == 1:
                log.warning("virtio-balloon: cannot give back guest memory [%#x, +%#x): %s "
                            "(further failures only counted)", gpa, length, e.strerror)
            return
        self.discarded_pages += length >> PAGE_SHIFT
