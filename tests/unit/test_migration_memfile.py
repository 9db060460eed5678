"""Sparse memory files and the atomic template commit."""

from __future__ import annotations

import os
import shutil

import pytest

from stratopy.errors import MigrationError, TemplateError
from stratopy.memory import PAGE_SIZE, GuestMemory
from stratopy.migration import format as fmt
from stratopy.migration import memfile

MiB = 1 << 20
META = {"arch": "x86_64", "cpu_vendor": "GenuineIntel", "machine": {"vcpus": 1}}
EXPECT = {"expect_arch": "x86_64", "expect_vendor": "GenuineIntel"}


def _mem(layout, pages=()):
    mem = GuestMemory.anonymous(layout)
    for gpa, fill in pages:
        mem.write(gpa, fill)
    return mem


def _file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _ram_bytes(mem):
    return b"".join(r.mm[:] for r in sorted(mem.regions, key=lambda r: r.file_offset))


def _disk_bytes(path):
    return os.stat(path).st_blocks * 512


def test_sparse_single_region(tmp_path):
    size = 64 * MiB
    pages = [(0, b"\x01" * 10), (5 * MiB + 3 * PAGE_SIZE, b"\xaa" * PAGE_SIZE),
             (size - PAGE_SIZE, b"end")]
    with _mem([(0, size)], pages) as mem:
        img = memfile.write_memory(str(tmp_path), mem)
        try:
            assert img.size == size == os.stat(img.path).st_size
            assert img.data_bytes == 3 * PAGE_SIZE
            assert _disk_bytes(img.path) < 1 * MiB
            assert _file_bytes(img.path) == _ram_bytes(mem)
            assert os.path.basename(img.path).startswith(".memory.tmp-")
            assert oct(os.stat(img.path).st_mode & 0o777) == oct(0o600)
        finally:
            os.unlink(img.path)


def test_sparse_two_regions_and_runs(tmp_path):
    # like microvm: RAM below 3 GiB and above 4 GiB, smaller here
    layout = [(0, 8 * MiB), (4 << 30, 6 * MiB + 3 * PAGE_SIZE)]   # odd tail size
    pages = [(0x1000, b"\x11" * (3 * PAGE_SIZE)),          # a 3-page run
             (2 * MiB - PAGE_SIZE, b"\x22" * (2 * PAGE_SIZE)),  # run across a chunk boundary
             (8 * MiB - 1, b"\x33"),                       # last byte of region 0
             (4 << 30, b"\x44"),                           # first byte of region 1
             ((4 << 30) + 6 * MiB + 2 * PAGE_SIZE + 7, b"tail")]
    with _mem(layout, pages) as mem:
        img = memfile.write_memory(str(tmp_path), mem)
        try:
            assert img.size == mem.size
            assert img.data_bytes == 8 * PAGE_SIZE
            assert _disk_bytes(img.path) < 2 * MiB
            assert _file_bytes(img.path) == _ram_bytes(mem)
            # and the file maps back as the same guest memory
            with GuestMemory.from_file(img.path, [(0, 8 * MiB),
                                                  (4 << 30, 6 * MiB + 3 * PAGE_SIZE)]) as back:
                for gpa, data in pages:
                    assert back.read(gpa, len(data)) == data
                assert back.read(0x10000, 16) == bytes(16)
        finally:
            os.unlink(img.path)


def test_all_zero_and_all_data(tmp_path):
    with _mem([(0, 4 * MiB)]) as mem:
        img = memfile.write_memory(str(tmp_path), mem)
        assert img.data_bytes == 0 and os.stat(img.path).st_size == 4 * MiB
        assert _disk_bytes(img.path) == 0 or _disk_bytes(img.path) < 64 * 1024
        os.unlink(img.path)
    with _mem([(0, 4 * MiB)]) as mem:
        mem.regions[0].mm[:] = os.urandom(4 * MiB)
        img = memfile.write_memory(str(tmp_path), mem)
        assert img.data_bytes == 4 * MiB
        assert _file_bytes(img.path) == _ram_bytes(mem)
        os.unlink(img.path)


def test_256mib_mostly_zero(tmp_path):
    size = 256 * MiB
    pages = [(i * 7 * MiB + 4096, b"x" * 100) for i in range(30)]
    with _mem([(0, size)], pages) as mem:
        img = memfile.write_memory(str(tmp_path), mem)
        try:
            assert img.size == size and img.data_bytes == 30 * PAGE_SIZE
            assert _disk_bytes(img.path) < 4 * MiB
        finally:
            os.unlink(img.path)


def test_write_failure_removes_temp(tmp_path, monkeypatch):
    calls = []
    real = os.pwrite

    def failing_pwrite(fd, data, off):
        calls.append(off)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(fd, data, off)

    monkeypatch.setattr(memfile.os, "pwrite", failing_pwrite)
    with _mem([(0, 8 * MiB)], [(0, b"a"), (4 * MiB, b"b")]) as mem:
        with pytest.raises(MigrationError, match="No space left"):
            memfile.write_memory(str(tmp_path), mem)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# whole templates

def _save(d, mem, comps=None):
    return memfile.save_template(str(d), mem, META, comps or {"k": [1]})


def test_save_and_load_template(tmp_path):
    d = tmp_path / "tpl"                        # created if missing
    with _mem([(0, 4 * MiB), (1 << 32, 2 * MiB)], [(0x5000, b"hello")]) as mem:
        img = _save(d, mem)
        assert sorted(os.listdir(d)) == ["memory", "state"]
        assert img.path == str(d / "memory")
        meta, comps, mpath = memfile.load_template(str(d), mem.size, **EXPECT)
        assert comps == {"k": [1]} and mpath == str(d / "memory")
        assert meta["memory"]["size"] == mem.size
        assert meta["memory"]["template_id"] == img.template_id
        assert meta["machine"] == META["machine"]
        assert os.getxattr(mpath, memfile.XATTR_ID) == img.template_id.encode()


def test_resave_replaces_pair(tmp_path):
    with _mem([(0, 4 * MiB)], [(0x5000, b"one")]) as mem:
        first = _save(tmp_path, mem)
        mem.write(0x5000, b"two")
        second = _save(tmp_path, mem)
        assert first.template_id != second.template_id
        meta, _, mpath = memfile.load_template(str(tmp_path), mem.size, **EXPECT)
        assert meta["memory"]["template_id"] == second.template_id
        assert _file_bytes(mpath)[0x5000:0x5003] == b"two"
        assert sorted(os.listdir(tmp_path)) == ["memory", "state"]


def test_resave_from_a_clone_mapping_the_template(tmp_path):
    """A VM restored from DIR (MAP_PRIVATE on DIR/memory) snapshots into DIR again."""
    with _mem([(0, 4 * MiB)], [(0x5000, b"orig"), (0x9000, b"keep")]) as mem:
        _save(tmp_path, mem)
    with GuestMemory.from_file(str(tmp_path / "memory"), [(0, 4 * MiB)]) as clone:
        clone.write(0x5000, b"new!")
        _save(tmp_path, clone)
        assert clone.read(0x9000, 4) == b"keep"       # old inode still mapped fine
        data = _file_bytes(tmp_path / "memory")
        assert data[0x5000:0x5004] == b"new!" and data[0x9000:0x9004] == b"keep"
    memfile.load_template(str(tmp_path), 4 * MiB, **EXPECT)


def test_stale_temps_are_cleaned(tmp_path):
    (tmp_path / ".memory.tmp-deadbeef").write_bytes(b"x")
    (tmp_path / ".state.tmp-deadbeef").write_bytes(b"x")
    with _mem([(0, 2 * MiB)]) as mem:
        _save(tmp_path, mem)
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]


@pytest.mark.parametrize("fail_on", ["memory", "state"])
def test_injected_rename_failure_leaves_no_state(tmp_path, monkeypatch, fail_on):
    with _mem([(0, 4 * MiB)], [(0x5000, b"one")]) as mem:
        _save(tmp_path, mem)                              # an old good template
        real = os.rename

        def rename(src, dst):
            if os.path.basename(dst) == fail_on:
                raise OSError(5, "Input/output error")
            return real(src, dst)

        monkeypatch.setattr(memfile.os, "rename", rename)
        mem.write(0x5000, b"two")
        with pytest.raises(MigrationError, match="Input/output error"):
            _save(tmp_path, mem)
    left = os.listdir(tmp_path)
    assert "state" not in left
    assert not [n for n in left if ".tmp-" in n]
    with pytest.raises(TemplateError, match="not found"):
        memfile.load_template(str(tmp_path), 4 * MiB, **EXPECT)


def test_injected_write_failure_keeps_old_template(tmp_path, monkeypatch):
    with _mem([(0, 4 * MiB)], [(0x5000, b"one")]) as mem:
        _save(tmp_path, mem)
        real = os.write

        def write(fd, data):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(fmt.os, "write", write)      # the state temp write fails
        mem.write(0x5000, b"two")
        with pytest.raises(MigrationError, match="No space left"):
            _save(tmp_path, mem)
        monkeypatch.setattr(fmt.os, "write", real)
    # failure before the commit sequence: the old pair is intact and consistent
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]
    meta, _, mpath = memfile.load_template(str(tmp_path), 4 * MiB, **EXPECT)
    assert _file_bytes(mpath)[0x5000:0x5003] == b"one"


def test_state_with_foreign_memory_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with _mem([(0, 4 * MiB)], [(0x5000, b"AAAA"), (3 * MiB, b"a")]) as mem:
        _save(a, mem)
    with _mem([(0, 4 * MiB)], [(0x5000, b"BBBB"), (3 * MiB, b"b")]) as mem:
        _save(b, mem)
    # copy b's memory next to a's state, with xattrs (same as a rename would)
    shutil.copy2(b / "memory", a / "memory")
    with pytest.raises(TemplateError, match="another template"):
        memfile.load_template(str(a), 4 * MiB, **EXPECT)
    # without the xattr, the content sample still catches it
    os.removexattr(a / "memory", memfile.XATTR_ID)
    with pytest.raises(TemplateError, match="content sample mismatch"):
        memfile.load_template(str(a), 4 * MiB, **EXPECT)


def test_copied_template_still_loads(tmp_path):
    with _mem([(0, 4 * MiB)], [(0x5000, b"AAAA")]) as mem:
        _save(tmp_path / "a", mem)
    shutil.copytree(tmp_path / "a", tmp_path / "copy", copy_function=shutil.copyfile)
    memfile.load_template(str(tmp_path / "copy"), 4 * MiB, **EXPECT)


def test_check_memory_file_errors(tmp_path):
    with _mem([(0, 4 * MiB)], [(0x5000, b"AAAA")]) as mem:
        img = _save(tmp_path, mem)
    rec = img.record()
    path = str(tmp_path / "memory")
    memfile.check_memory_file(path, 4 * MiB, rec)
    memfile.check_memory_file(path, 4 * MiB)               # size only
    with pytest.raises(TemplateError, match="memory file missing"):
        memfile.check_memory_file(str(tmp_path / "nope"), 4 * MiB)
    with pytest.raises(TemplateError, match="not a regular file"):
        memfile.check_memory_file(str(tmp_path), 4 * MiB)
    with pytest.raises(TemplateError, match="has 4194304 bytes, the guest has 8388608"):
        memfile.check_memory_file(path, 8 * MiB, rec)
    for bad in ({**rec, "size": "x"}, {**rec, "template_id": "zz"},
                {**rec, "sample_offsets": [1]}, {**rec, "sample_offsets": [1 << 40]},
                {**rec, "sample_sha256": None}, {k: v for k, v in rec.items() if k != "size"},
                [], "x"):
        with pytest.raises(TemplateError, match="meta.memory"):
            memfile.check_memory_file(path, 4 * MiB, bad)
    with pytest.raises(TemplateError, match="records 8388608 bytes"):
        memfile.check_memory_file(path, 4 * MiB, {**rec, "size": 8 * MiB})
    # truncated memory file
    os.truncate(path, 2 * MiB)
    with pytest.raises(TemplateError, match="has 2097152 bytes"):
        memfile.check_memory_file(path, 4 * MiB, rec)


def test_changed_memory_content_refused(tmp_path):
    with _mem([(0, 4 * MiB)], [(0x5000, b"AAAA")]) as mem:
        img = _save(tmp_path, mem)
    # the data page is always sampled
    assert 0x5000 in img.sample_offsets
    with open(tmp_path / "memory", "r+b") as f:
        f.seek(0x5000)
        f.write(b"B")
    with pytest.raises(TemplateError, match="content sample mismatch"):
        memfile.load_template(str(tmp_path), 4 * MiB, **EXPECT)


def test_busy_directory(tmp_path):
    with memfile.template_lock(str(tmp_path), exclusive=True):
        with _mem([(0, 2 * MiB)]) as mem:
            with pytest.raises(MigrationError, match="another snapshot"):
                _save(tmp_path, mem)
    assert os.listdir(tmp_path) == []


def test_unwritable_target(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with _mem([(0, 2 * MiB)]) as mem:
        with pytest.raises(MigrationError):
            _save(f, mem)
        with pytest.raises(MigrationError):
            _save(f / "sub", mem)


def test_sample_offsets_spread():
    runs = [(0x100000, 10 * PAGE_SIZE), (0x800000, 200 * PAGE_SIZE)]
    offs = memfile._sample_offsets(64 * MiB, runs)
    assert len(offs) <= memfile.SPREAD_SAMPLES + memfile.DATA_SAMPLES
    assert all(o % PAGE_SIZE == 0 and 0 <= o < 64 * MiB for o in offs)
    assert 0 in offs and 64 * MiB - PAGE_SIZE in offs
    data_hits = [o for o in offs if 0x100000 <= o < 0x100000 + 10 * PAGE_SIZE
                 or 0x800000 <= o < 0x800000 + 200 * PAGE_SIZE]
    assert len(data_hits) >= memfile.DATA_SAMPLES - 1
    assert memfile._sample_offsets(0, []) == []
