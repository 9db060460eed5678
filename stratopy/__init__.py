"""stratopy: a KVM microVM monitor in Python, driven like StratoVirt."""

__version__ = "0.1.0"
