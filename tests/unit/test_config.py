"""stratopy.config's classes keep what @dataclass(frozen=True) gave them
(they are written out now: generating them cost every start ~42 M
instructions, docs/performance.md): field-wise equality within one class,
a hash that agrees with it, immutability, a repr naming every field, keyword
construction with the same defaults, and replace()."""

from __future__ import annotations

import pytest

from stratopy import config as c


def _sample() -> c.MachineConfig:
    drive = c.DriveConfig(id="d0", file="/img")
    return c.MachineConfig(kernel="/k", cpus=2, drives=(drive,),
                           devices=(c.DeviceConfig(driver=c.BLK, id="blk0", drive=drive),),
                           qmp=(c.QmpConfig(kind="unix", path="/q"),),
                           incoming=c.IncomingConfig(path="/t"))


def test_defaults_match_the_documented_ones():
    d = c.DriveConfig("d0", "/img")
    assert (d.readonly, d.direct, d.serial, d.format, d.aio) == (False, True, None, "raw", "native")
    n = c.NetdevConfig(id="n0")
    assert (n.kind, n.ifname, n.fd, n.vhost, n.queues) == ("tap", None, None, False, 1)
    assert c.IncomingConfig("/t").mapped is True
    m = c.MachineConfig(kernel="/k")
    assert (m.machine_type, m.cpus, m.mem_size, m.devices, m.incoming) == \
        ("microvm", 1, c.DEFAULT_MEM_SIZE, (), None)


def test_machine_config_is_keyword_only_and_needs_a_kernel():
    with pytest.raises(TypeError):
        c.MachineConfig("/k")  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.MachineConfig()  # type: ignore[call-arg]


def test_equality_is_field_wise_and_per_class():
    assert _sample() == _sample()
    assert _sample() != _sample().replace(cpus=3)
    assert c.QmpConfig(kind="unix", path="/q") != c.QmpConfig(kind="unix", path="/r")
    # Same field values, other class: not equal (as dataclasses compare).
    assert c.RngObjectConfig(id="a", filename="/f") != c.IncomingConfig("a", "/f")
    assert c.IncomingConfig("/t") != ("/t", True)


def test_hash_agrees_with_equality():
    assert hash(_sample()) == hash(_sample())
    assert len({_sample(), _sample(), _sample().replace(cpus=3)}) == 2


def test_frozen():
    cfg = _sample()
    with pytest.raises(AttributeError, match="frozen"):
        cfg.cpus = 4  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del cfg.kernel
    with pytest.raises(AttributeError):
        cfg.new_field = 1  # type: ignore[attr-defined]
    assert cfg.cpus == 2


def test_replace_copies_with_changes_and_rejects_unknown_fields():
    cfg = _sample()
    r = cfg.replace(incoming=None, cpus=4)
    assert (r.incoming, r.cpus, r.kernel, r.drives) == (None, 4, "/k", cfg.drives)
    assert cfg.incoming == c.IncomingConfig("/t")           # the original is unchanged
    with pytest.raises(TypeError, match="no field 'cpu'"):
        cfg.replace(cpu=4)


def test_repr_names_every_field():
    assert repr(c.IncomingConfig("/t")) == "IncomingConfig(path='/t', mapped=True, verify='lazy', clock='realtime')"
    text = repr(_sample())
    assert text.startswith("MachineConfig(machine_type='microvm', ")
    assert "disable_seccomp=False)" in text and "DriveConfig(id='d0'" in text


def test_copy_deepcopy_and_pickle_give_equal_objects():
    import copy
    import pickle

    cfg = _sample()
    for clone in (copy.copy(cfg), copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert clone == cfg and type(clone) is c.MachineConfig
        assert clone.devices[0].drive == cfg.drives[0]
        with pytest.raises(AttributeError, match="frozen"):
            clone.cpus = 1  # type: ignore[misc]
