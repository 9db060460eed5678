"""ACPI tables and AML built by the monitor (no KVM here; docs/acpi.md).

Nothing is imported eagerly: a cold boot imports ``tables``/``devices``
when it writes the tables; a warm start needs at most ``ged`` (the event
register and the VMGenID value), which imports nothing heavy.
"""
