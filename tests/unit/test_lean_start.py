"""The lean start (issue #10, docs/performance.md): stratopy.logs imports
`logging` only for a record that is emitted and from then on behaves as
plain `logging`; cli.main() starts without garbage-collection passes.

Each check runs in a fresh interpreter: whether `logging` is imported is the
point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("STRATOPY_DEBUG", None)
    r = subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code), *args],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    return r


def test_below_the_threshold_nothing_is_imported_then_the_setup_runs_once():
    r = run("""
        import sys
        from stratopy import logs
        calls = []

        def setup():
            import logging
            calls.append(1)
            h = logging.StreamHandler(sys.stdout)
            h.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
            logging.getLogger().handlers[:] = [h]
            logging.getLogger().setLevel(logging.WARNING)

        logs.defer_setup(logs.WARNING, setup)
        log = logs.get_logger("stratopy.x")
        assert log is logs.get_logger("stratopy.x")
        log.debug("d %d", 1)
        log.info("i %d", 2)
        assert "logging" not in sys.modules and not calls
        log.warning("w %d", 3)
        assert "logging" in sys.modules and calls == [1]
        log.info("i %d", 4)            # now logging decides: still below WARNING
        log.error("e %d", 5)
        assert calls == [1]
    """)
    assert r.stdout.splitlines() == ["stratopy.x WARNING w 3", "stratopy.x ERROR e 5"]


def test_unconfigured_is_like_logging_warnings_reach_stderr():
    r = run("""
        import sys
        from stratopy.logs import get_logger
        get_logger("a").info("quiet")
        assert "logging" not in sys.modules
        get_logger("a").warning("loud %s", "x")
    """)
    assert r.stderr == "loud x\n"


def test_logging_configured_elsewhere_decides():
    r = run("""
        import logging, sys
        logging.basicConfig(level=logging.DEBUG, stream=sys.stdout,
                            format="%(levelname)s %(filename)s:%(lineno)d %(message)s")
        from stratopy.logs import get_logger
        log = get_logger("b")
        log.debug("dbg")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("failed")
    """)
    lines = r.stdout.splitlines()
    # The caller's file and line, not stratopy/logs.py's.
    assert lines[0] == "DEBUG <string>:7 dbg", lines
    assert lines[1] == "ERROR <string>:11 failed", lines
    assert "ZeroDivisionError" in r.stdout


def test_cli_without_D_defers_logging_and_keeps_its_stderr_format():
    r = run("""
        import sys
        from stratopy import cli
        from stratopy.cli_parse import parse_args
        cli._setup_logging(parse_args(["-kernel", "/dev/null"]))
        cli.log.info("starting")
        assert "logging" not in sys.modules
        cli.log.warning("terminating on signal %d", 15)
    """)
    assert r.stderr == "stratopy: terminating on signal 15\n"


def test_cli_with_D_sets_up_logging_at_once(tmp_path):
    path = str(tmp_path / "log")
    r = run(f"""
        import sys
        from stratopy import cli
        from stratopy.cli_parse import parse_args
        cli._setup_logging(parse_args(["-kernel", "/dev/null", "-D", {path!r}]))
        assert "logging" in sys.modules
        cli.log.info("hello")
    """)
    with open(path) as f:
        text = f.read()
    assert text.endswith(":INFO: hello\n") and text.startswith(time.strftime("%Y-")), text   # StratoVirt's format


def test_cli_main_runs_without_gc_passes_and_restores_the_collector():
    """cli.main() disables the cyclic collector for the start-up (its passes
    cost ~11 M instructions before the first KVM_RUN) and turns it back on
    however run() ends."""
    r = run("""
        import gc
        from stratopy import cli
        from stratopy.errors import StratoError
        seen = []

        def fake_run(argv):
            seen.append(gc.isenabled())
            if argv == ["fail"]:
                raise StratoError("boom")
            return 0

        cli.run = fake_run
        assert gc.isenabled()
        assert cli.main([]) == 0 and gc.isenabled()
        assert cli.main(["fail"]) == 1 and gc.isenabled()
        assert seen == [False, False], seen
    """)
    assert r.stderr == "stratopy: boom\n"
