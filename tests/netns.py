"""Private network namespaces for tests: nothing a test sends leaves them.

Each VM under test runs inside its own namespace (``ip netns exec``) with a
tap device whose host side has HOST_IP; the guest uses GUEST_IP. Because
every clone gets a namespace of its own, clones of one template (same guest
IP, same MAC) never see each other.
"""

from __future__ import annotations

import os
import subprocess
import sys

HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
PREFIX = 24
TAP = "stap0"
HOST_MAC = "02:00:00:77:00:01"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class NetNs:
    """A namespace with a configured tap (created before the VM opens it)."""

    def __init__(self, name: str):
        self.name = name
        _ip("netns", "add", name)
        try:
            self.run_ok("ip", "link", "set", "lo", "up")
            self.run_ok("ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
            # The same host MAC in every namespace: a clone keeps the ARP
            # entry its template learnt, so the host side must not change.
            self.run_ok("ip", "link", "set", TAP, "address", HOST_MAC)
            self.run_ok("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", TAP)
            self.run_ok("ip", "link", "set", TAP, "up")
        except BaseException:
            self.close()
            raise

    def run(self, *argv: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv],
                              capture_output=True, text=True, timeout=timeout, **kw)

    def run_ok(self, *argv: str, timeout: float = 60) -> str:
        r = self.run(*argv, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name}: {r.stderr.strip()}")
        return r.stdout

    def program(self) -> list[str]:
        """argv prefix that runs stratopy inside this namespace."""
        return ["ip", "netns", "exec", self.name, sys.executable, "-m", "stratopy"]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


_counter = 0


def new_netns() -> NetNs:
    global _counter
    _counter += 1
    return NetNs(f"stratopy-t{os.getpid()}-{_counter}")
