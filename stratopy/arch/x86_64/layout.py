"""Every guest-physical address of the x86_64 microvm, in one place.

Values follow StratoVirt's microvm (Firecracker's is similar); see SPEC §2.
"""

MiB = 1 << 20
GiB = 1 << 30

# --- low memory boot structures -------------------------------------------
GDT_ADDR = 0x500             # null, null, code (0xa09b), data (0xc093)
IDT_ADDR = 0x520
ZERO_PAGE_ADDR = 0x7000      # struct boot_params
BOOT_STACK_POINTER = 0x8FF0  # initial RSP
PML4_ADDR = 0x9000           # identity map of the first 1 GiB, 2 MiB pages
PDPTE_ADDR = 0xA000
PDE_ADDR = 0xB000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000        # bytes reserved for the kernel command line

EBDA_START = 0x9FC00         # MP table lives here (reserved in e820)
EBDA_END = 0xA0000
BIOS_ROM_START = 0xD0000     # reserved in e820
# ACPI tables (cold boot, stratopy/acpi): the RSDP at 0xE0000 (where Linux
# scans for it), the other tables after it below 0xFF000, and the 16-byte
# VMGenID GUID alone on the page at 0xFF000 (rewritten on every warm start).
ACPI_RSDP_ADDR = 0xE0000
ACPI_TABLES_END = 0xFF000
VMGENID_GUID_ADDR = 0xFF000
BIOS_ROM_END = 0x100000
HIMEM_START = 0x100000       # 1 MiB: bzImage protected-mode code, ELF vmlinux loads above

INITRD_ALIGN = 0x1000

# --- RAM split around the 32-bit MMIO hole ---------------------------------
MEM_BELOW_4G_MAX = 3 * GiB   # RAM [0, 3 GiB), the rest from 4 GiB up
MEM_ABOVE_4G_START = 4 * GiB

# --- 32-bit MMIO hole --------------------------------------------------------
MMIO_BASE = 0xF0100000       # first virtio-mmio transport
VIRTIO_MMIO_SIZE = 0x200     # bytes per transport
IRQ_BASE = 5                 # first virtio-mmio IRQ
BLK_SLOTS = 4                # reserved hot-replaceable virtio-blk slots (IRQ 5-8)
NET_SLOTS = 2                # reserved hot-replaceable virtio-net slots (IRQ 9-10)
IRQ_MAX = 23                 # last IOAPIC pin
# The ACPI GED (docs/acpi.md: VMGenID and power-button events) owns the last
# IOAPIC pin, so virtio slots get IRQ 5-22 (18 transports) and can never
# take it; a guest booted with acpi=off never unmasks it.
GED_IRQ = IRQ_MAX
VIRTIO_IRQ_MAX = GED_IRQ - 1

# ACPI GED MMIO page (event selector, sleep control/status; QEMU's microvm
# uses the same address), free between the virtio slots and the IOAPIC.
GED_MMIO_ADDR = 0xFEA00000
IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000
TSS_ADDR = 0xFEF0C000        # KVM_SET_TSS_ADDR (3 pages), StratoVirt's value
IDENTITY_MAP_ADDR = 0xFEF0F000  # KVM_SET_IDENTITY_MAP_ADDR (1 page) right after

# --- legacy ports -----------------------------------------------------------
SERIAL_PORT = 0x3F8
SERIAL_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64


def ram_layout(mem_size: int, below_4g_max: int = MEM_BELOW_4G_MAX) -> list[tuple[int, int]]:
    """The (gpa, size) RAM regions for a guest of ``mem_size`` bytes: up to
    ``below_4g_max`` from 0 (the microvm's 3 GiB; q35 passes its 2 GiB),
    the rest from 4 GiB."""
    if mem_size <= below_4g_max:
        return [(0, mem_size)]
    return [(0, below_4g_max), (MEM_ABOVE_4G_START, mem_size - below_4g_max)]


def virtio_slot(index: int) -> tuple[int, int]:
    """(MMIO base, IRQ) of virtio-mmio transport number ``index``.

    Slots 0-3 are the reserved block slots, 4-5 the reserved net slots,
    other devices follow from slot 6 (0xf0100c00, IRQ 11).
    """
    return MMIO_BASE + index * VIRTIO_MMIO_SIZE, IRQ_BASE + index
