"""What the CLI checks outside the (pure) parser: the host's RAM, drive files,
the -D log and the pidfile (issue 9). No KVM: the checks run before any."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from stratopy import cli
from stratopy.cli_parse import parse_args
from stratopy.daemon import Daemonizer
from stratopy.errors import ConfigError, StratoError
from tests.harness import LOG_LINE
from tests.unit.bounded import deadline, umask

GiB = 1 << 30


def test_memory_above_host_ram_is_refused():
    ram = cli.host_ram()
    assert ram > 0
    too_much = parse_args(["-kernel", "k", "-m", f"{ram // GiB + 1}G"])
    with pytest.raises(ConfigError, match=r"^-m: \d+ MiB is more than this host's RAM \(\d+ MiB\)$"):
        cli._check_host(too_much)
    cli._check_host(parse_args(["-kernel", "k", "-m", "64M"]))


def test_drive_files_are_checked_before_the_machine_is_built(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    config = parse_args(["-kernel", "k", "-drive", f"id=a,file={img}",
                         "-drive", f"id=b,file={img},readonly=on"])
    with pytest.raises(ConfigError, match="^-drive: drive 'b'"):
        cli._check_host(config)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in handlers:       # the -D handler: close its file
            h.close()
            h.stream.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_log_file_is_created_private_under_umask_000(tmp_path, restore_logging):
    log = tmp_path / "vm.log"
    with umask(0):
        cli._setup_logging(parse_args(["-kernel", "k", "-D", str(log), "-name", "vm1"]))
    logging.getLogger("stratopy").info("hello")
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    line = log.read_text().splitlines()[-1]
    m = LOG_LINE.match(line)
    assert m and m.group(5, 6) == ("INFO", "hello") and int(m.group(1)) == os.getpid(), line


def test_log_file_fifo_is_refused_without_blocking(tmp_path, restore_logging):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with deadline(), pytest.raises(ConfigError, match="^-D: .* is a FIFO"):
        cli._setup_logging(parse_args(["-kernel", "k", "-D", str(fifo)]))


def test_pidfile_is_private_under_umask_000(tmp_path):
    path = tmp_path / "vm.pid"
    d = Daemonizer(str(path))
    with umask(0):
        d.write_pidfile()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        d.remove_pidfile()
    assert not path.exists()


def test_pidfile_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, what in ((fifo, "is a FIFO"), (tmp_path, "cannot open")):
        with deadline(), pytest.raises(StratoError, match=f"^-pidfile: .*{what}"):
            Daemonizer(str(path)).write_pidfile()
