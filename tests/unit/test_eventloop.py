"""The device-thread event loop: cross-thread calls, timers, readers, stop."""

from __future__ import annotations

import os
import threading
import time

import pytest

from stratopy.machine.eventloop import EventLoop

JOIN = 5.0


@pytest.fixture
def loop():
    lp = EventLoop()
    t = threading.Thread(target=lp.run, name="test-eventloop", daemon=True)
    t.start()
    # wait until the loop thread has entered run()
    deadline = time.monotonic() + JOIN
    while lp.thread_id is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert lp.thread_id == t.ident
    yield lp
    lp.stop()
    t.join(JOIN)
    assert not t.is_alive(), "run() did not return after stop()"
    lp.close()


def test_call_returns_value_on_the_loop_thread(loop):
    caller = threading.get_ident()
    assert loop.call(lambda: 6 * 7) == 42
    assert loop.call(threading.get_ident) == loop.thread_id != caller


def test_call_reraises_the_exception(loop):
    class Boom(Exception):
        pass

    err = Boom("kaput")

    def fail():
        raise err

    with pytest.raises(Boom) as ei:
        loop.call(fail)
    assert ei.value is err
    # the loop survives and keeps serving
    assert loop.call(lambda: "still here") == "still here"


def test_call_from_the_loop_thread_runs_inline(loop):
    # a request that itself calls call() must not deadlock
    assert loop.call(lambda: loop.call(lambda: "nested"), timeout=JOIN) == "nested"


def test_call_soon_runs_in_order(loop):
    seen = []
    for i in range(200):
        loop.call_soon(lambda i=i: seen.append(i))
    loop.call(lambda: None)      # everything posted before has run
    assert seen == list(range(200))


def test_call_soon_from_several_threads_runs_every_callback(loop):
    seen = []

    def post(k):
        for i in range(100):
            loop.call_soon(lambda i=i: seen.append((k, i)))

    threads = [threading.Thread(target=post, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    loop.call(lambda: None)
    assert sorted(seen) == [(k, i) for k in range(4) for i in range(100)]
    for k in range(4):           # each thread's own order is kept
        assert [i for kk, i in seen if kk == k] == list(range(100))


def test_call_later_fires_in_deadline_order(loop):
    fired = []
    done = threading.Event()

    def at(name):
        def cb():
            fired.append((name, time.monotonic()))
            if len(fired) == 5:
                done.set()
        return cb

    def schedule():
        t0 = time.monotonic()
        loop.call_later(0.15, at("d"))
        loop.call_later(0.05, at("b"))
        loop.call_later(0.0, at("a"))
        loop.call_later(0.10, at("c1"))
        loop.call_later(0.10, at("c2"))    # same delay: insertion order
        return t0

    t0 = loop.call(schedule)
    assert done.wait(JOIN)
    assert [n for n, _ in fired] == ["a", "b", "c1", "c2", "d"]
    delays = {n: t - t0 for n, t in fired}
    assert delays["b"] >= 0.05 and delays["c1"] >= 0.10 and delays["d"] >= 0.15


def test_call_later_runs_under_device_lock(loop):
    got = []
    done = threading.Event()

    def cb():
        got.append(loop.device_lock._is_owned())
        done.set()

    loop.call(lambda: loop.call_later(0.01, cb))
    assert done.wait(JOIN)
    assert got == [True]


def test_add_reader_on_a_pipe(loop):
    r, w = os.pipe()
    try:
        got = []
        event = threading.Event()

        def on_read():
            got.append((os.read(r, 100), loop.device_lock._is_owned(),
                        threading.get_ident() == loop.thread_id))
            event.set()

        loop.call(lambda: loop.add_reader(r, on_read))
        os.write(w, b"ping")
        assert event.wait(JOIN)
        assert got == [(b"ping", True, True)]

        # after remove_reader, data on the pipe no longer calls back
        loop.call(lambda: loop.remove_reader(r))
        event.clear()
        os.write(w, b"pong")
        assert not event.wait(0.2)
        assert len(got) == 1
        assert os.read(r, 100) == b"pong"
    finally:
        os.close(r)
        os.close(w)


def test_add_reader_replaces_the_callback(loop):
    r, w = os.pipe()
    try:
        calls = []
        event = threading.Event()

        def first():
            calls.append("first")

        def second():
            calls.append(("second", os.read(r, 10)))
            event.set()

        loop.call(lambda: loop.add_reader(r, first))
        loop.call(lambda: loop.add_reader(r, second))   # re-register: modify
        os.write(w, b"x")
        assert event.wait(JOIN)
        assert calls == [("second", b"x")]
        loop.call(lambda: loop.remove_reader(r))
    finally:
        os.close(r)
        os.close(w)


def test_add_reader_on_a_regular_file(loop, tmp_path):
    path = tmp_path / "input.txt"
    path.write_bytes(b"line1\nline2\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        import selectors
        if isinstance(loop.sel, selectors.EpollSelector):
            probe = selectors.EpollSelector()
            with pytest.raises(PermissionError):    # what the loop must work around
                probe.register(fd, selectors.EVENT_READ)
            probe.close()
        chunks = []
        calls = [0]
        eof = threading.Event()

        def on_read():
            calls[0] += 1
            data = os.read(fd, 4)
            chunks.append(data)
            if not data:
                eof.set()

        loop.call(lambda: loop.add_reader(fd, on_read))
        assert eof.wait(JOIN)
        # read to EOF through repeated callbacks, then still polled (always ready)
        n = loop.call(lambda: calls[0])
        deadline = time.monotonic() + JOIN
        while loop.call(lambda: calls[0]) == n and time.monotonic() < deadline:
            time.sleep(0.005)
        assert loop.call(lambda: calls[0]) > n
        loop.call(lambda: loop.remove_reader(fd))
        assert b"".join(chunks) == b"line1\nline2\n"
        # removed: no more callbacks
        after = loop.call(lambda: calls[0])
        time.sleep(0.05)
        assert loop.call(lambda: calls[0]) == after
        # and the loop idles again (blocks) rather than spinning: a timer still fires
        fired = threading.Event()
        loop.call(lambda: loop.call_later(0.01, fired.set))
        assert fired.wait(JOIN)
    finally:
        os.close(fd)


def test_stop_makes_run_return():
    lp = EventLoop()
    returned = threading.Event()

    def runner():
        lp.run()
        returned.set()

    t = threading.Thread(target=runner, daemon=True)
    t.start()
    assert lp.call(lambda: 1, timeout=JOIN) == 1
    assert not returned.is_set()
    lp.stop()                    # from another thread
    t.join(JOIN)
    assert not t.is_alive() and returned.is_set()
    lp.close()


def test_stop_from_a_callback_on_the_loop_thread():
    lp = EventLoop()
    t = threading.Thread(target=lp.run, daemon=True)
    t.start()
    lp.call_soon(lp.stop)
    t.join(JOIN)
    assert not t.is_alive()
    lp.close()


def test_stop_while_blocked_with_a_pending_far_timer():
    lp = EventLoop()
    lp.call_later(3600, lambda: None)   # before run(): allowed
    t = threading.Thread(target=lp.run, daemon=True)
    t.start()
    time.sleep(0.02)
    lp.stop()
    t.join(JOIN)
    assert not t.is_alive()
    lp.close()


def test_remove_reader_from_a_callback_stops_a_ready_peer(loop):
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        os.write(w1, b"a")
        os.write(w2, b"b")
        calls = []

        def make(me, other):
            def cb():
                calls.append(me)
                os.read(me, 10)
                loop.remove_reader(me)
                loop.remove_reader(other)   # the peer is ready too: it must not run now
            return cb

        def register_both():          # both ready before the next select()
            loop.add_reader(r1, make(r1, r2))
            loop.add_reader(r2, make(r2, r1))

        loop.call(register_both)
        time.sleep(0.1)
        loop.call(lambda: None)
        assert len(calls) == 1, calls
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
