"""PCI/PCIe for -machine q35: config space, host bridge and buses,
CF8/CFC and ECAM access, MSI-X, pcie-root-port, the virtio-pci transport.
Pure state machines: the machine (machine/q35.py) wires them to KVM."""
