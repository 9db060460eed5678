"""A termination signal during start-up (before the device loop owns the
signals): both places it can land in cli._run_vm -- before the machine
exists and while it is being built -- log it, tell a waiting daemon parent
and return 0; in the second the machine is torn down after the report."""

from __future__ import annotations

import pytest

from stratopy import builder, cli
from stratopy.cli_parse import parse_args


class _Daemon:
    reporting = True
    pidfile = None

    def __init__(self, events: list):
        self.events = events

    def write_pidfile(self) -> None:
        pass

    def fail(self, message: str, code: int) -> None:
        self.events.append(("fail", message, code))


class _Machine:
    def __init__(self, events: list):
        self.events = events
        self.config = _config()

    def teardown(self) -> None:
        self.events.append(("teardown",))


def _config():
    return parse_args(["-kernel", "/dev/null", "-disable-seccomp"])


def test_signal_before_the_machine_exists(monkeypatch):
    events: list = []

    def check_host(_config):
        raise cli._Terminated(15)

    monkeypatch.setattr(cli, "_check_host", check_host)
    assert cli._run_vm(_config(), _Daemon(events)) == 0
    assert events == [("fail", "terminating on signal 15 during start-up", 1)]


@pytest.mark.parametrize("signum", [2, 15])
def test_signal_while_the_machine_is_built(monkeypatch, signum):
    events: list = []

    def build(_machine):
        raise cli._Terminated(signum)

    monkeypatch.setattr(cli, "_check_host", lambda _config: None)
    monkeypatch.setattr(builder, "create_machine", lambda _config: _Machine(events))
    monkeypatch.setattr(builder, "build_for_boot", build)
    assert cli._run_vm(_config(), _Daemon(events)) == 0
    # reported first, torn down after
    assert events == [("fail", f"terminating on signal {signum} during start-up", 1),
                      ("teardown",)]
