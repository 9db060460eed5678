"""Chardev input into a device that cannot take it all (a full UART FIFO):
bounded memory, one retry timer, nothing lost (issue 9, code review)."""

from __future__ import annotations

import fcntl
import os
import struct
import termios

from stratopy.chardev import READ_CHUNK, Chardev
from stratopy.config import ChardevConfig, MachineConfig
from stratopy.devices import serial as S
from stratopy.machine.microvm import MicroVm


class TimerLoop:
    """Readers and call_later timers, run by hand."""

    def __init__(self) -> None:
        self.readers: dict[int, object] = {}
        self.timers: list = []

    def add_reader(self, fd, cb):
        self.readers[fd] = cb

    def remove_reader(self, fd):
        self.readers.pop(fd, None)

    def call_later(self, delay, fn):
        self.timers.append(fn)

    def run_timers(self) -> None:
        due, self.timers = self.timers, []
        for fn in due:
            fn()


def _unread(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_a_thousand_feeds_into_a_full_uart_hold_one_read_and_one_timer():
    vm = MicroVm(MachineConfig(kernel="/nonexistent"))
    vm.loop.close()
    loop = vm.loop = TimerLoop()
    vm.devices.serial = S.Serial(irq=lambda: None, out=lambda data: None)
    assert vm.serial.enqueue_input(b"\xff" * S.FIFO_SIZE) == S.FIFO_SIZE   # full
    r, w = os.pipe2(os.O_NONBLOCK)
    null = os.open(os.devnull, os.O_WRONLY)
    ch = Chardev(ChardevConfig(id="serial0", backend="stdio"), stdin_fd=r, stdout_fd=null)
    try:
        ch.open()
        vm.devices.serial_chardev = ch
        ch.attach(loop, vm._chardev_input(ch))
        sent = bytearray()
        for i in range(1000):
            chunk = bytes([i & 0xFF]) * 1024
            try:
                n = os.write(w, chunk)
            except BlockingIOError:
                n = 0            # the pipe is full: the writer waits, as it should
            sent += chunk[:n]
            cb = loop.readers.get(r)
            if cb is not None:
                cb()
        taken_from_pipe = len(sent) - _unread(r)
        # The monitor holds at most one read; the rest waits in the pipe.
        assert taken_from_pipe <= READ_CHUNK
        assert len(loop.timers) == 1
        assert r not in loop.readers         # not read while the device is full

        # The guest drains the FIFO: everything arrives, in order, and the
        # chardev is read again once the device has taken it all.
        got = bytearray()
        for _ in range(100_000):
            while vm.serial.fifo_room < S.FIFO_SIZE:
                got.append(vm.serial.read(S.DATA, 1)[0])
            if len(got) >= S.FIFO_SIZE + len(sent):
                break
            assert len(loop.timers) <= 1
            loop.run_timers()
            cb = loop.readers.get(r)
            if cb is not None:
                cb()
        assert bytes(got) == b"\xff" * S.FIFO_SIZE + bytes(sent)
        assert r in loop.readers and not loop.timers
    finally:
        ch.close()
        for fd in (r, w, null):
            try:
                os.close(fd)
            except OSError:
                pass


def test_pause_and_resume_input_follow_the_client_and_eof(tmp_path):
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    ch = Chardev(ChardevConfig(id="c", backend="stdio"), stdin_fd=r, stdout_fd=null)
    loop = TimerLoop()
    try:
        ch.open()
        ch.attach(loop, lambda data: None)
        ch.pause_input()
        assert r not in loop.readers
        ch.resume_input()
        assert r in loop.readers
        os.close(w)
        w = -1
        loop.readers[r]()                   # EOF: stop reading for good
        assert r not in loop.readers
        ch.pause_input()
        ch.resume_input()
        assert r not in loop.readers        # no spinning on EOF after a resume
    finally:
        ch.close()
        for fd in (r, w, null):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
