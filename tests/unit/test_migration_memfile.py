"""The memory file: header page, sparse RAM, pairing by id, chunk digests."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading

import pytest

from stratopy.errors import MigrationError, TemplateError
from stratopy.memory import PAGE_SIZE, GuestMemory
from stratopy.migration import memfile, template_dir

MiB = 1 << 20
H = memfile.HEADER_SIZE
META = {"arch": "x86_64", "cpu_vendor": "GenuineIntel", "machine": {"vcpus": 1}}
EXPECT = {"expect_arch": "x86_64", "expect_vendor": "GenuineIntel"}
L4 = [(0, 4 * MiB)]


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


def _save(d, pages=((0x1000, b"\x42" * 64),), layout=L4):
    with _mem(layout, pages) as mem:
        return template_dir.save_template(str(d), mem, META, {"k": [1]})


def _open(d, layout=L4):
    return template_dir.open_template(str(d), layout, **EXPECT)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]) if b else b"\x01")


def test_sparse_single_region_after_a_header_page(tmp_path):
    size = 64 * MiB
    pages = [(0, b"\x01" * 10), (5 * MiB + 3 * PAGE_SIZE, b"\xaa" * PAGE_SIZE),
             (size - PAGE_SIZE, b"end")]
    with _mem([(0, size)], pages) as mem:
        img = memfile.write_memory(str(tmp_path), mem)
        try:
            assert img.size == size and os.stat(img.path).st_size == H + size
            assert img.data_bytes == 3 * PAGE_SIZE
            assert os.stat(img.path).st_blocks * 512 < 1 * MiB
            data = _file_bytes(img.path)
            assert data[:8] == b"STRATMEM"
            assert data[H:] == _ram_bytes(mem)                # RAM at a page offset
            assert os.path.basename(img.path) == f".memory-{img.template_id}"
            assert oct(os.stat(img.path).st_mode & 0o777) == oct(0o600)
            tid, rsize, layout = memfile.parse_header(data[:H], "m")
            assert (tid, rsize, layout) == (img.template_id, size, [(0, size)])
        finally:
            os.unlink(img.path)


def test_chunk_digests_of_two_regions(tmp_path):
    layout = [(0, 8 * MiB), (4 << 30, 6 * MiB + 3 * PAGE_SIZE)]     # odd tail size
    pages = [(0x1000, b"\x11" * (3 * PAGE_SIZE)), ((4 << 30) + 6 * MiB, b"\x33" * 100)]
    with _mem(layout, pages) as mem:
        img = memfile.write_memory(str(tmp_path), mem)
        ram = _ram_bytes(mem)
    chunks = []
    off = 0
    for _, size in layout:
        for c in range(0, size, memfile.CHUNK):
            n = min(memfile.CHUNK, size - c)
            chunks.append(hashlib.sha256(ram[off + c:off + c + n]).digest())
        off += size
    assert img.digests == b"".join(chunks)
    assert len(chunks) == memfile.chunk_count(layout) == 4 + 4
    assert _file_bytes(img.path)[H:] == ram


def test_save_open_map_and_verify(tmp_path):
    pages = [(0x2000, b"\x5a" * PAGE_SIZE), (3 * MiB, b"tail")]
    img = _save(tmp_path, pages)
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]
    t = _open(tmp_path)
    try:
        assert t.meta["memory"]["template_id"] == img.template_id
        assert memfile.verify_chunks(t.memory_fd, t.memory_path, t.record, L4) == 2 * 2 * MiB
        for mapped in (True, False):
            with memfile.map_memory(t.memory_fd, L4, mapped=mapped) as mem:
                assert mem.read(0x2000, 4) == b"\x5a" * 4
                assert mem.read(3 * MiB, 4) == b"tail"
                mem.write(0x2000, b"COW!")          # private: the file is not written
    finally:
        t.close()
    assert _file_bytes(tmp_path / "memory")[H + 0x2000:H + 0x2004] == b"\x5a" * 4


def test_a_later_templates_memory_of_the_same_vm_is_refused(tmp_path):
    """Two templates of the very same RAM: their memory files differ only by
    the id in the header. One copied next to the other's state (without
    xattrs, as cp does) is refused -- the sample check could not tell."""
    _save(tmp_path / "a")
    _save(tmp_path / "b")
    shutil.copyfile(tmp_path / "b" / "memory", tmp_path / "a" / "memory")
    with pytest.raises(TemplateError, match="belongs to another template"):
        _open(tmp_path / "a")
    shutil.copytree(tmp_path / "b", tmp_path / "copy")    # a whole copy still loads
    _open(tmp_path / "copy").close()


def test_damaged_memory_is_found_by_the_chunk_digests(tmp_path):
    _save(tmp_path, [(0x1000, b"\x42" * PAGE_SIZE)])
    mpath = str(tmp_path / "memory")
    _flip(mpath, H + 0x1000 + 17)                        # a written page
    t = _open(tmp_path)                                  # the pairing still holds
    try:
        with pytest.raises(TemplateError, match=r"damaged: the 2 MiB chunk at guest "
                                                r"address 0x0 .*does not match"):
            memfile.verify_chunks(t.memory_fd, t.memory_path, t.record, L4)
    finally:
        t.close()
    _flip(mpath, H + 0x1000 + 17)                        # undo
    _flip(mpath, H + 3 * MiB + 5)                        # data in a hole chunk
    with pytest.raises(TemplateError, match="chunk at guest address 0x200000"):
        template_dir.full_check(str(tmp_path), L4, **EXPECT)


def test_memory_file_header_and_size_damage(tmp_path):
    _save(tmp_path)
    mpath = tmp_path / "memory"
    good = _file_bytes(mpath)
    _flip(str(mpath), 40)
    with pytest.raises(TemplateError, match="corrupt memory file header"):
        _open(tmp_path)
    mpath.write_bytes(good + b"x")
    with pytest.raises(TemplateError, match="truncated or extended"):
        _open(tmp_path)
    mpath.write_bytes(b"\0" * (4 * MiB))                 # an old, header-less file
    with pytest.raises(TemplateError, match="bad magic"):
        _open(tmp_path)
    mpath.write_bytes(good)
    with pytest.raises(TemplateError, match="the guest has 8388608"):
        _open(tmp_path, [(0, 8 * MiB)])
    os.unlink(mpath)
    with pytest.raises(TemplateError, match="no template memory file"):
        _open(tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_memory_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    _save(tmp_path)
    mpath = tmp_path / "memory"
    os.rename(mpath, tmp_path / "real")
    if kind == "fifo":
        os.mkfifo(mpath)
    elif kind == "directory":
        mpath.mkdir()
    else:
        os.symlink(tmp_path / "real", mpath)
    out = []

    def run():
        try:
            _open(tmp_path)
        except TemplateError as e:
            out.append(str(e))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "opening the memory file blocked"
    assert out and {"fifo": "is a FIFO", "directory": "is a directory",
                    "symlink": "symbolic link"}[kind] in out[0]


def test_the_checked_file_is_the_one_mapped(tmp_path):
    """Restore keeps the fd it checked: a memory file swapped in by path
    afterwards (another template's) is never what the guest gets."""
    _save(tmp_path, [(0x1000, b"AAAA")])
    t = _open(tmp_path)
    try:
        _save(tmp_path / "other", [(0x1000, b"BBBB")])
        os.replace(tmp_path / "other" / "memory", tmp_path / "memory")
        with memfile.map_memory(t.memory_fd, L4) as mem:
            assert mem.read(0x1000, 4) == b"AAAA"
        memfile.verify_chunks(t.memory_fd, t.memory_path, t.record, L4)
    finally:
        t.close()


def test_record_is_checked_strictly(tmp_path):
    _save(tmp_path)
    t = _open(tmp_path)
    t.close()
    rec = {k: v for k, v in t.meta["memory"].items()}
    memfile.check_record(rec, "s", L4)
    for bad, what in ((dict(rec, size=True), "size"),
                      (dict(rec, template_id="x" * 32), "template_id"),
                      (dict(rec, chunk_sha256=rec["chunk_sha256"][:-64]), "chunk_sha256"),
                      (dict(rec, chunk_size=4096), "chunk_size"),
                      (dict(rec, extra=1), "unknown field"),
                      ("nope", "not an object")):
        with pytest.raises(TemplateError, match=what):
            memfile.check_record(bad, "s", L4)


def test_write_failure_removes_the_file(tmp_path, monkeypatch):
    def failing_pwrite(fd, data, off):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(memfile.os, "pwrite", failing_pwrite)
    with _mem(L4, [(0, b"x")]) as mem:
        with pytest.raises(MigrationError, match="No space left"):
            memfile.write_memory(str(tmp_path), mem)
    assert os.listdir(tmp_path) == []


def test_damage_is_found_in_every_chunk_position_with_one_read_buffer(tmp_path):
    """verify_chunks reads every chunk into one reused buffer: a byte flipped
    in the first, a middle, a short last chunk of a region, the next
    region's first chunk, or in a hole chunk is found and named by its guest
    address. Every data chunk holds the same bytes, so a chunk hashed from
    what the buffer held before (not re-read) would match and pass."""
    layout = [(0, 5 * MiB), (8 * MiB, 3 * MiB)]
    pattern = bytes(range(256)) * 16
    data_chunks = [0, 2 * MiB, 4 * MiB, 8 * MiB]         # 4 MiB: the 1 MiB short one
    _save(tmp_path, [(gpa + 0x3000, pattern) for gpa in data_chunks], layout)
    mpath = str(tmp_path / "memory")
    t = _open(tmp_path, layout)
    try:
        # 5 MiB of region 0 and the first 2 MiB of region 1; 10 MiB is a hole
        assert memfile.verify_chunks(t.memory_fd, t.memory_path, t.record, layout) == 7 * MiB
        # file offset of a guest address: the regions follow each other
        for gpa, file_off in ((0, 0), (2 * MiB, 2 * MiB), (4 * MiB, 4 * MiB),
                              (8 * MiB, 5 * MiB), (10 * MiB, 7 * MiB)):
            where = H + file_off + 0x3000 + 77
            _flip(mpath, where)
            with pytest.raises(TemplateError, match=f"chunk at guest address {gpa:#x} "):
                memfile.verify_chunks(t.memory_fd, t.memory_path, t.record, layout)
            _flip(mpath, where)
        memfile.verify_chunks(t.memory_fd, t.memory_path, t.record, layout)
    finally:
        t.close()
