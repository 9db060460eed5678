"""Start a program the way Kata Containers starts StratoVirt: with tap
queue fds inherited as 3, 4, ... (Go's exec.Cmd.ExtraFiles).

    python -m tests.kata_launch TAPNAME NQUEUES -- PROGRAM ARGS...

Opens NQUEUES queues of the multi-queue tap TAPNAME (created here, in the
current network namespace, gone when the last fd closes), moves them to fds
3.. and execs PROGRAM. Run it under ``ip netns exec`` so that the tap lives
in a private namespace.
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000


def open_queues(name: str, n: int) -> list[int]:
    fds = []
    for _ in range(n):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)
        fcntl.ioctl(fd, TUNSETIFF, ifr + bytes(40 - len(ifr)))
        fds.append(fd)
    return fds


def main() -> None:
    name, n, sep, *argv = sys.argv[1:]
    vhost_path = None
    if sep == "--vhostfd":
        vhost_path, sep, *argv = argv
    assert sep == "--" and argv, __doc__
    fds = open_queues(name, int(n))
    if vhost_path is not None:
        fds.append(os.open(vhost_path, os.O_RDWR))
    # move them out of the way first, then to 3, 4, ... inheritable
    high = [os.dup(fd) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
