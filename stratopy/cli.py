"""``stratopy`` / ``python -m stratopy``: argv -> config -> machine -> run.

Every StratoError becomes one line on stderr and its exit code; a Python
traceback reaching the user is a bug.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from stratopy.errors import StratoError

log = logging.getLogger("stratopy")


def _setup_logging(config) -> None:
    level = logging.DEBUG if os.environ.get("STRATOPY_DEBUG") else logging.INFO
    fmt = "%(asctime)s.%(msecs)03d [pid %(process)d tid %(thread)d] %(levelname)s %(name)s: %(message)s"
    if config.log_file:
        handler: logging.Handler = logging.FileHandler(config.log_file)
    elif config.logging:
        handler = logging.StreamHandler(sys.stderr)
    else:
        # Without -D only warnings and errors reach stderr.
        handler = logging.StreamHandler(sys.stderr)
        level = logging.DEBUG if os.environ.get("STRATOPY_DEBUG") else logging.WARNING
        fmt = "stratopy: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def run(argv: list[str]) -> int:
    from stratopy.cli_parse import HelpRequested, VersionRequested, parse_args

    try:
        config = parse_args(argv)
    except (HelpRequested, VersionRequested) as h:
        print(h.text)
        return 0
    _setup_logging(config)

    from stratopy.machine.microvm import MicroVm
    from stratopy.machine.control import attach_control

    machine = MicroVm(config)
    try:
        if config.incoming is not None:
            machine.build_from_template()
        else:
            machine.build_for_boot()
        # QMP sockets exist before the first guest instruction runs.
        control = attach_control(machine)

        def on_signal(signum, _frame) -> None:
            machine.request_shutdown("host-signal", guest=False, code=0)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_signal)

        machine.start()
        if os.environ.get("STRATOPY_TIMINGS"):
            _report_timings(machine)
        code = machine.run()
        control.close()
        return code
    except BaseException:
        machine.teardown()
        raise


def _report_timings(machine) -> None:
    """For bench/: one JSON line on stderr with start-up figures.

    STRATOPY_T0 is the launcher's time.time() just before exec.
    """
    import json
    import time

    deadline = time.monotonic() + 2.0
    while machine.runners and machine.runners[0].first_run_at is None \
            and time.monotonic() < deadline:
        time.sleep(0.0005)
    t = {k: round(v * 1000, 3) for k, v in machine.timings.items()}
    t0 = os.environ.get("STRATOPY_T0")
    if t0 and machine.runners and machine.runners[0].first_run_at:
        t["exec_to_first_kvm_run"] = round((machine.runners[0].first_run_at - float(t0)) * 1000, 3)
    print("stratopy-timings-ms: " + json.dumps(t), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        return run(argv)
    except StratoError as e:
        print(f"stratopy: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
