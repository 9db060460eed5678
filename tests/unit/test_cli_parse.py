"""The StratoVirt command line, parsed into MachineConfig (no KVM needed)."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratopy.cli_parse import (
    HELP_TEXT,
    CliExit,
    HelpRequested,
    VersionRequested,
    parse_args,
)
from stratopy.config import (
    ChardevConfig,
    DeviceConfig,
    DriveConfig,
    IncomingConfig,
    MachineConfig,
    NetdevConfig,
    QmpConfig,
    RngObjectConfig,
)
from stratopy.errors import ConfigError

MiB = 1 << 20

# The seed document's command line, word for word.
SEED_BOOT = [
    "-machine", "microvm",
    "-kernel", "path/to/vmlinux.bin",
    "-append", "console=ttyS0 pci=off reboot=k quiet panic=1 root=/dev/vda",
    "-drive", "file=path/to/rootfs,id=rootfs,readonly=off,direct=off",
    "-device", "virtio-blk-device,drive=rootfs,id=rootfs",
    "-qmp", "unix:path/to/socket,server,nowait",
    "-serial", "stdio",
]
SEED_RESTORE = SEED_BOOT + ["-incoming", "file:path/to/template"]

K = ["-kernel", "vmlinux"]


def err(argv: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    return info.value


def check(argv: list[str], option: str, *words: str) -> ConfigError:
    e = err(argv)
    assert e.option == option, str(e)
    msg = str(e)
    assert msg.startswith(option + ": "), msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert "\n" not in msg
    return e


# --------------------------------------------------------------------- seed


def test_seed_boot_command_line():
    cfg = parse_args(SEED_BOOT)
    rootfs = DriveConfig(id="rootfs", file="path/to/rootfs", readonly=False, direct=False,
                         serial=None, format="raw", aio="off")
    assert cfg == MachineConfig(
        kernel="path/to/vmlinux.bin",
        kernel_cmdline="console=ttyS0 pci=off reboot=k quiet panic=1 root=/dev/vda",
        drives=(rootfs,),
        devices=(DeviceConfig(driver="virtio-blk-device", id="rootfs", drive=rootfs),),
        qmp=(QmpConfig(kind="unix", path="path/to/socket"),),
        serial=ChardevConfig(id="serial_chardev", backend="stdio"),
    )
    assert cfg.machine_type == "microvm"
    assert (cfg.cpus, cfg.max_cpus, cfg.sockets, cfg.cores, cfg.threads) == (1, 1, 1, 1, 1)
    assert cfg.mem_size == 256 * MiB
    assert cfg.incoming is None and not cfg.start_paused
    assert cfg.virtio_devices() == cfg.devices == cfg.transport_devices()


def test_seed_restore_command_line():
    boot = parse_args(SEED_BOOT)
    cfg = parse_args(SEED_RESTORE)
    assert cfg.incoming == IncomingConfig(path="path/to/template", mapped=True)
    assert cfg.replace(incoming=None) == boot


def test_incoming_mapped_off():
    cfg = parse_args(SEED_RESTORE[:-1] + ["file:/t,mapped=off"])
    assert cfg.incoming == IncomingConfig(path="/t", mapped=False)


def test_incoming_clock_policy():
    # realtime (default): kvmclock advanced to now; saved: as the template had it
    assert parse_args(SEED_RESTORE).incoming.clock == "realtime"
    for policy in ("realtime", "saved"):
        cfg = parse_args(SEED_RESTORE[:-1] + [f"file:/t,clock={policy}"])
        assert cfg.incoming == IncomingConfig(path="/t", clock=policy)


def test_config_is_frozen():
    cfg = parse_args(SEED_BOOT)
    with pytest.raises(AttributeError, match="frozen"):
        cfg.cpus = 2  # type: ignore[misc]


# --------------------------------------------------------------- full set


def test_everything_together():
    cfg = parse_args(K + [
        "-machine", "type=microvm,dump-guest-core=off,mem-share=off",
        "-smp", "cpus=2,maxcpus=4,sockets=2,cores=2,threads=1",
        "-m", "size=1G",
        "-initrd", "/boot/initrd",
        "-append", "console=hvc0", "-append", "quiet",
        "-drive", "id=d0,file=/d0.img,readonly=on,direct=on,serial=SER0,if=none,format=raw,aio=io_uring",
        "-drive", "id=d1,file=/d1.img",
        "-netdev", "tap,id=n0,ifname=tap0,vhost=on,queues=2",
        "-netdev", "tap,id=n1,fd=7",
        "-chardev", "socket,id=c0,path=/tmp/con.sock,server,nowait",
        "-chardev", "pty,id=c1",
        "-chardev", "file,id=c2,path=/tmp/serial.log",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-net-device,netdev=n0,id=net0,mac=52:54:00:AB:cd:01",
        "-device", "virtio-blk-device,drive=d0,id=blk0",
        "-device", "virtio-serial-device,id=vs0",
        "-device", "virtconsole,chardev=c0,id=con0",
        "-device", "virtio-rng-device,rng=rng0",
        "-device", "virtio-blk-device,drive=d1,id=blk1,serial=XYZ",
        "-device", "virtio-net-device,netdev=n1",
        "-serial", "chardev:c2",
        "-qmp", "unix:/tmp/q1.sock,server,nowait",
        "-qmp", "tcp:127.0.0.1:4444,server,nowait",
        "-S", "-name", "vm1", "-D", "/tmp/log", "-daemonize", "-pidfile", "/tmp/pid",
        "-disable-seccomp", "-mem-path", "/dev/hugepages/x", "-mem-prealloc",
    ])
    assert cfg.dump_guest_core is False and cfg.mem_share is False
    assert (cfg.cpus, cfg.max_cpus, cfg.sockets, cfg.cores, cfg.threads) == (2, 4, 2, 2, 1)
    assert cfg.mem_size == 1024 * MiB
    assert cfg.initrd == "/boot/initrd"
    assert cfg.kernel_cmdline == "console=hvc0 quiet"
    d0, d1 = cfg.drives
    assert d0 == DriveConfig(id="d0", file="/d0.img", readonly=True, direct=True, serial="SER0",
                             format="raw", aio="io_uring")
    assert d1.direct is True and d1.aio == "native" and d1.readonly is False  # StratoVirt defaults
    assert cfg.netdevs == (
        NetdevConfig(id="n0", kind="tap", ifname="tap0", fd=None, vhost=True, queues=2),
        NetdevConfig(id="n1", kind="tap", ifname=None, fd=7, vhost=False, queues=1),
    )
    c0, c1, c2 = cfg.chardevs
    assert c0 == ChardevConfig(id="c0", backend="socket", path="/tmp/con.sock", server=True, nowait=True)
    assert c1 == ChardevConfig(id="c1", backend="pty")
    assert c2 == ChardevConfig(id="c2", backend="file", path="/tmp/serial.log")
    assert cfg.serial is c2
    assert cfg.rng_objects == (RngObjectConfig(id="rng0", filename="/dev/urandom"),)

    drivers = [d.driver for d in cfg.devices]
    assert drivers == ["virtio-net-device", "virtio-blk-device", "virtio-serial-device", "virtconsole",
                       "virtio-rng-device", "virtio-blk-device", "virtio-net-device"]
    net0, blk0, vs0, con0, rng, blk1, net1 = cfg.devices
    assert net0.id == "net0" and net0.netdev == cfg.netdevs[0] and net0.mac == "52:54:00:ab:cd:01"
    assert blk0.drive is d0 and blk0.serial == "SER0"
    assert blk1.drive is d1 and blk1.serial == "XYZ"
    assert vs0.chardev is c0 and con0.chardev is c0 and con0.bus == "vs0"
    assert rng.rng == cfg.rng_objects[0] and rng.id == "virtio-rng-device.4"
    assert net1.id == "virtio-net-device.6" and net1.mac is None
    assert cfg.transport_devices() == (net0, blk0, vs0, rng, blk1, net1)
    assert cfg.device("blk1") is blk1 and cfg.device("nope") is None

    assert cfg.qmp == (QmpConfig(kind="unix", path="/tmp/q1.sock"),
                       QmpConfig(kind="tcp", host="127.0.0.1", port=4444))
    assert cfg.start_paused and cfg.name == "vm1" and cfg.log_file == "/tmp/log"
    assert cfg.daemonize and cfg.pidfile == "/tmp/pid" and cfg.disable_seccomp
    assert cfg.mem_path == "/dev/hugepages/x" and cfg.mem_prealloc


@pytest.mark.parametrize("arg,size", [
    ("512", 512 * MiB), ("512M", 512 * MiB), ("512m", 512 * MiB), ("2G", 2048 * MiB),
    ("2g", 2048 * MiB), ("65536K", 64 * MiB), ("size=128", 128 * MiB), ("16M", 16 * MiB),
])
def test_memory_sizes(arg, size):
    assert parse_args(K + ["-m", arg]).mem_size == size


@pytest.mark.parametrize("arg,topo", [
    ("4", (4, 4, 1, 4, 1)),
    ("cpus=4", (4, 4, 1, 4, 1)),
    ("2,maxcpus=8", (2, 8, 1, 8, 1)),
    ("4,sockets=2", (4, 4, 2, 2, 1)),
    ("4,cores=2", (4, 4, 2, 2, 1)),
    ("8,sockets=2,cores=2", (8, 8, 2, 2, 2)),
    ("2,sockets=2,cores=2,threads=2", (2, 8, 2, 2, 2)),
    ("254", (254, 254, 1, 254, 1)),
    ("4,sockets=2,cores=3,threads=1", (4, 6, 2, 3, 1)),
    ("1", (1, 1, 1, 1, 1)),
])
def test_smp_topology(arg, topo):
    cfg = parse_args(K + ["-smp", arg])
    assert (cfg.cpus, cfg.max_cpus, cfg.sockets, cfg.cores, cfg.threads) == topo


@pytest.mark.parametrize("word,value", [
    ("on", True), ("off", False), ("true", True), ("false", False), ("yes", True), ("no", False),
    ("ON", True),
])
def test_booleans(word, value):
    cfg = parse_args(K + ["-drive", f"id=d,file=f,readonly={word},direct=off"])
    assert cfg.drives[0].readonly is value


@pytest.mark.parametrize("spec,expect", [
    ("stdio", ChardevConfig("serial_chardev", "stdio")),
    ("pty", ChardevConfig("serial_chardev", "pty")),
    ("file,path=/tmp/s", ChardevConfig("serial_chardev", "file", path="/tmp/s")),
    ("socket,path=/tmp/s,server,nowait", ChardevConfig("serial_chardev", "socket", "/tmp/s", True, True)),
    ("socket,path=/tmp/s", ChardevConfig("serial_chardev", "socket", "/tmp/s", False, False)),
    ("none", None),
])
def test_serial_backends(spec, expect):
    assert parse_args(K + ["-serial", spec]).serial == expect


def test_chardev_stdio_and_console():
    cfg = parse_args(K + ["-chardev", "stdio,id=con", "-device", "virtio-serial-device",
                          "-device", "virtconsole,id=c,chardev=con,nr=0"])
    assert cfg.chardevs == (ChardevConfig("con", "stdio"),)
    assert cfg.devices[0].id == "virtio-serial-device.0"
    assert cfg.devices[1].bus == "virtio-serial-device.0"


def test_log_to_stderr_and_optional_value():
    cfg = parse_args(K + ["-D"])
    assert cfg.log_file is None and cfg.log_to_stderr and cfg.logging
    cfg = parse_args(["-D", "-kernel", "vmlinux"])
    assert cfg.log_file is None and cfg.log_to_stderr
    cfg = parse_args(K + ["-D", "/tmp/l"])
    assert cfg.log_file == "/tmp/l" and not cfg.log_to_stderr and cfg.logging
    assert not parse_args(K).logging


def test_qmp_ipv6_and_append_value_with_dash():
    cfg = parse_args(K + ["-qmp", "tcp:[::1]:4444,server,nowait", "-append", "-x foo"])
    assert cfg.qmp == (QmpConfig(kind="tcp", host="::1", port=4444),)
    assert cfg.kernel_cmdline == "-x foo"


def test_machine_underscore_spellings_and_case():
    cfg = parse_args(K + ["-machine", "MicroVM,dump_guest_core=off,mem_share=on,accel=kvm,usb=off"])
    assert cfg.machine_type == "microvm" and not cfg.dump_guest_core and cfg.mem_share


def test_vhost_and_mem_path_accepted_by_parser():
    cfg = parse_args(K + ["-netdev", "tap,id=n,ifname=t,vhost=on", "-mem-path", "/x"])
    assert cfg.netdevs[0].vhost and cfg.mem_path == "/x"


def test_userspace_vsock_device():
    cfg = parse_args(K + ["-device", "virtio-vsock-device,id=vs,guest-cid=3,uds-path=/run/v.sock"])
    [d] = cfg.devices
    assert (d.driver, d.id, d.guest_cid, d.uds_path) == ("virtio-vsock-device", "vs", 3,
                                                          "/run/v.sock")


def test_many_block_devices_allowed():
    argv = list(K)
    for i in range(8):
        argv += ["-drive", f"id=d{i},file=/d{i}", "-device", f"virtio-blk-device,id=b{i},drive=d{i}"]
    assert len(parse_args(argv).devices) == 8


def test_unused_backends_are_fine():
    cfg = parse_args(K + ["-drive", "id=d,file=f", "-netdev", "tap,id=n,ifname=t",
                          "-chardev", "pty,id=c", "-object", "rng-random,id=r,filename=/dev/urandom"])
    assert cfg.devices == ()


# ------------------------------------------------------------- help/version


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help(flag):
    with pytest.raises(HelpRequested) as info:
        parse_args(["-m", "1G", flag])
    assert info.value.text == HELP_TEXT and info.value.exit_code == 0
    assert "-kernel" in info.value.text and "-incoming" in info.value.text
    assert isinstance(info.value, CliExit) and not isinstance(info.value, ConfigError)


@pytest.mark.parametrize("flag", ["-V", "-version", "--version"])
def test_version(flag):
    with pytest.raises(VersionRequested) as info:
        parse_args([flag])
    assert "stratopy" in info.value.text and info.value.exit_code == 0


# ------------------------------------------------------------------ errors

ERRORS = [
    # option table
    (["-kernel", "k", "-bogus"], "-bogus", "unknown option"),
    (["-kernel", "k", "--kernel", "x"], "--kernel", "single dash"),
    (["-kernel", "k", "-cpu", "host"], "-cpu", "does not support"),
    (["-kernel", "k", "stray"], "'stray'", "unexpected argument"),
    (["-kernel", "k", ""], "''", "unexpected argument"),
    (["-kernel", "k", "-m", "1\nG"], "-m", "'1\\nG'"),
    (["-kernel"], "-kernel", "missing value"),
    (["-kernel", "-S"], "-kernel", "missing value"),
    (K + ["-m"], "-m", "missing value"),
    (K + ["-name", "-daemonize"], "-name", "missing value"),
    (K + ["-m", "1G", "-m", "2G"], "-m", "more than once"),
    (K + ["-kernel", "k2"], "-kernel", "more than once"),
    (["-m", "1G"], "-kernel", "required"),
    ([], "-kernel", "required"),
    # -machine
    (K + ["-machine", "virt"], "-machine", "virt", "microvm or q35"),
    (K + ["-machine", "pc"], "-machine", "unknown machine type", "pc"),
    (K + ["-machine", "microvm,foo=on"], "-machine", "unknown property 'foo'"),
    (K + ["-machine", "microvm,dump-guest-core=maybe"], "-machine", "dump-guest-core", "maybe"),
    (K + ["-machine", "microvm,mem-share"], "-machine", "mem-share", "needs a value"),
    (K + ["-machine", "microvm,type=q35"], "-machine", "twice"),
    (K + ["-machine", "dump-guest-core=on"], "-machine", "no machine type"),
    (K + ["-machine", "microvm,accel=tcg"], "-machine", "kvm"),
    # -smp
    (K + ["-smp", "0"], "-smp", "cpus", "out of range"),
    (K + ["-smp", "255"], "-smp", "out of range"),
    (K + ["-smp", "two"], "-smp", "not a number"),
    (K + ["-smp", "-1"], "-smp", "not a number"),
    (K + ["-smp", "4,maxcpus=2"], "-smp", "maxcpus"),
    (K + ["-smp", "4,maxcpus=4,sockets=2,cores=3,threads=1"], "-smp", "sockets*cores*threads"),
    (K + ["-smp", "4,cores=8"], "-smp", "does not fit"),
    (K + ["-smp", "4,sockets=3"], "-smp", "sockets*cores*threads"),
    (K + ["-smp", "4,dies=2"], "-smp", "dies"),
    (K + ["-smp", "4,foo=2"], "-smp", "unknown property 'foo'"),
    (K + ["-smp", "maxcpus=4"], "-smp", "no vcpu count"),
    (K + ["-smp", "9" * 5000], "-smp", "out of range"),
    # -m
    (K + ["-m", "12X"], "-m", "invalid size '12X'"),
    (K + ["-m", "1.5G"], "-m", "invalid size"),
    (K + ["-m", "0"], "-m", "must not be 0"),
    (K + ["-m", "8"], "-m", "minimum"),
    (K + ["-m", "16385K"], "-m", "4 KiB"),
    (K + ["-m", "1G,maxmem=2G"], "-m", "maxmem"),
    (K + ["-m", "9" * 30 + "G"], "-m", "too large"),
    (K + ["-m", ""], "-m", "empty"),
    # -drive
    (K + ["-drive", "file=/x"], "-drive", "requires id="),
    (K + ["-drive", "id=d"], "-drive", "requires file="),
    (K + ["-drive", "id=d,file="], "-drive", "empty"),
    (K + ["-drive", "id=d,file=/x,format=qcow2"], "-drive", "format=qcow2", "only raw"),
    (K + ["-drive", "id=d,file=/x,if=pflash"], "-drive", "pflash"),
    (K + ["-drive", "id=d,file=/x,aio=threads"], "-drive", "aio=threads"),
    (K + ["-drive", "id=d,file=/x,direct=off,aio=native"], "-drive", "direct=on"),
    (K + ["-drive", "id=d,file=/x,readonly"], "-drive", "readonly", "needs a value"),
    (K + ["-drive", "id=d,file=/x,cache=none"], "-drive", "unknown property 'cache'"),
    (K + ["-drive", "id=d,file=/x,,readonly=on"], "-drive", "empty item"),
    (K + ["-drive", "id=d,file=/x,=on"], "-drive", "no property name"),
    (K + ["-drive", "id=d,file=/x", "-drive", "id=d,file=/y"], "-drive", "'d'", "twice"),
    (K + ["-drive", "id=d,file=/x,serial=" + "s" * 21], "-drive", "serial"),
    # -netdev
    (K + ["-netdev", "user,id=n"], "-netdev", "only tap"),
    (K + ["-netdev", "tap,ifname=t"], "-netdev", "requires id="),
    (K + ["-netdev", "tap,id=n"], "-netdev", "ifname=, fd= or fds="),
    (K + ["-netdev", "tap,id=n,ifname=t,fd=5"], "-netdev", "not ifname= and fd="),
    (K + ["-netdev", "tap,id=n,fds=3:5,fd=5"], "-netdev", "not fd= and fds="),
    (K + ["-netdev", "tap,id=n,fds=3:3"], "-netdev", "given twice"),
    (K + ["-netdev", "tap,id=n,fds=3:"], "-netdev", "not a number"),
    (K + ["-netdev", "tap,id=n,fds=4:2"], "-netdev", "fd 2 is stdin/stdout/stderr"),
    (K + ["-netdev", "tap,id=n,fds=" + ":".join(str(i) for i in range(3, 20))], "-netdev", "more than 16"),
    (K + ["-uuid", "not-a-uuid"], "-uuid", "is not a UUID"),
    (K + ["-incoming", "file:/t", "-mem-path", "/dev/hugepages"], "-incoming", "-mem-path"),
    (K + ["-incoming", "file:/t", "-machine", "microvm,mem-share=on"], "-incoming", "mem-share=on"),
    (K + ["-mem-prealloc", "-incoming", "file:/t"], "-incoming", "-mem-prealloc"),
    (K + ["-uuid", "6f03e56e-efa1-4f0f-9b8f-492cf1824c8"], "-uuid", "is not a UUID"),
    (K + ["-device", "vhost-vsock-device,id=v,guest-cid=3,vhostfd=2"], "-device",
     "vhostfd: fd 2 is stdin/stdout/stderr"),
    (K + ["-device", "virtio-vsock-device,id=v,guest-cid=3"], "-device", "requires uds-path="),
    (K + ["-device", "virtio-vsock-device,id=v,uds-path=/tmp/v"], "-device", "requires guest-cid="),
    (K + ["-device", "virtio-vsock-device,id=v,guest-cid=1,uds-path=/tmp/v"], "-device",
     "guest-cid: 1 is out of range"),
    (K + ["-device", "virtio-vsock-device,id=v,guest-cid=3,uds-path=/tmp/v,vhostfd=5"], "-device",
     "unknown property 'vhostfd'"),
    (K + ["-device", "virtio-vsock-device,id=v,guest-cid=3,uds-path=/tmp/" + "p" * 200], "-device",
     "longer than"),
    (K + ["-device", "virtio-vsock-device,id=v,guest-cid=3,uds-path=/tmp/v",
          "-device", "virtio-vsock-device,id=w,guest-cid=4,uds-path=/tmp/w"], "-device",
     "only one vsock device"),
    (K + ["-qmp", "unix:/tmp/v,server,nowait",
          "-device", "virtio-vsock-device,id=v,guest-cid=3,uds-path=/tmp/v"], "-device",
     "also used by -qmp"),
    (K + ["-device", "vhost-vsock-device,id=v,guest-cid=2"], "-device", "guest-cid: 2 is out of range"),
    (K + ["-device", "vhost-vsock-device,id=v"], "-device", "requires guest-cid="),
    (K + ["-device", "vhost-vsock-device,id=v,guest-cid=3,cid=4"], "-device", "unknown property 'cid'"),
    (K + ["-netdev", "tap,id=n,fd=-3"], "-netdev", "negative"),
    (K + ["-netdev", "tap,id=n,fd=x"], "-netdev", "not a number"),
    (K + ["-netdev", "tap,id=n,fd=1"], "-netdev", "stdout"),
    (K + ["-netdev", "tap,id=n,ifname=" + "t" * 16], "-netdev", "interface name"),
    (K + ["-netdev", "tap,id=n,ifname=t,queues=0"], "-netdev", "queues"),
    (K + ["-netdev", "tap,id=n,ifname=t", "-netdev", "tap,id=n,ifname=u"], "-netdev", "twice"),
    # -chardev / -serial
    (K + ["-chardev", "stdio"], "-chardev", "requires id="),
    (K + ["-chardev", "vc,id=c"], "-chardev", "unknown chardev backend 'vc'"),
    (K + ["-chardev", "file,id=c"], "-chardev", "requires path="),
    (K + ["-chardev", "socket,id=c"], "-chardev", "requires path="),
    (K + ["-chardev", "socket,id=c,host=127.0.0.1,port=4"], "-chardev", "tcp"),
    (K + ["-chardev", "socket,id=c,path=/s,nowait"], "-chardev", "nowait", "server"),
    (K + ["-chardev", "socket,id=c,path=/" + "s" * 120 + ",server"], "-chardev", "107 bytes"),
    (K + ["-chardev", "pty,id=c", "-chardev", "stdio,id=c"], "-chardev", "twice"),
    (K + ["-chardev", "stdio,id=a", "-serial", "stdio"], "-chardev", "stdio"),
    (K + ["-serial", "chardev:nope"], "-serial", "'nope'", "not defined by -chardev"),
    (K + ["-serial", "chardev:"], "-serial", "chardev:ID"),
    (K + ["-serial", "telnet"], "-serial", "unknown chardev backend"),
    (K + ["-serial", "stdio,id=x"], "-serial", "id="),
    (K + ["-serial", "file"], "-serial", "requires path="),
    (K + ["-serial", "stdio", "-serial", "pty"], "-serial", "more than once"),
    (K + ["-chardev", "pty,id=c", "-serial", "chardev:c", "-device", "virtio-serial-device",
          "-device", "virtconsole,id=v,chardev=c"], "-device", "already used by -serial"),
    # -object
    (K + ["-object", "iothread,id=io"], "-object", "only rng-random"),
    (K + ["-object", "memory-backend-file,id=m,size=1G"], "-object", "not supported"),
    (K + ["-object", "rng-random,id=r"], "-object", "requires filename="),
    (K + ["-object", "rng-random,filename=/dev/urandom"], "-object", "requires id="),
    (K + ["-object", "rng-random,id=r,filename=/a", "-object", "rng-random,id=r,filename=/b"],
     "-object", "twice"),
    # -device
    (K + ["-device", "virtio-blk-pci,id=b,drive=d"], "-device", "pci", "-machine q35"),
    (K + ["-device", "e1000"], "-device", "unknown device", "virtio-blk-device"),
    (K + ["-device", "id=x"], "-device", "must start with the device driver"),
    (K + ["-drive", "id=d,file=f", "-device", "virtio-blk-device,drive=d,id=b,foo=1"],
     "-device", "unknown property 'foo' for virtio-blk-device"),
    (K + ["-device", "virtio-blk-device,drive=x,id=b"], "-device", "virtio-blk-device",
     "drive 'x' is not defined by -drive"),
    (K + ["-drive", "id=d,file=f", "-device", "virtio-blk-device,drive=d"], "-device", "requires id="),
    (K + ["-drive", "id=d,file=f", "-device", "virtio-blk-device,id=b"], "-device", "requires drive="),
    (K + ["-drive", "id=d,file=f", "-device", "virtio-blk-device,id=b,drive=d",
          "-device", "virtio-blk-device,id=c,drive=d"], "-device", "drive 'd' is already used"),
    (K + ["-drive", "id=d,file=f", "-drive", "id=e,file=g", "-device", "virtio-blk-device,id=b,drive=d",
          "-device", "virtio-blk-device,id=b,drive=e"], "-device", "'b'", "twice"),
    (K + ["-drive", "id=d,file=f", "-device", "virtio-blk-device,id=b,drive=d,bus=pcie.0"],
     "-device", "bus", "microvm"),
    (K + ["-drive", "id=d,file=f,serial=A", "-device", "virtio-blk-device,id=b,drive=d,serial=B"],
     "-device", "differs"),
    (K + ["-device", "virtio-net-device,netdev=n,id=x"], "-device", "netdev 'n' is not defined by -netdev"),
    (K + ["-netdev", "tap,id=n,ifname=t", "-device", "virtio-net-device,netdev=n,mac=52:54:00:12:34"],
     "-device", "mac", "malformed"),
    (K + ["-netdev", "tap,id=n,ifname=t", "-device", "virtio-net-device,netdev=n,mac=52:54:00:12:34:zz"],
     "-device", "malformed"),
    (K + ["-netdev", "tap,id=n,ifname=t", "-device", "virtio-net-device,netdev=n,mac=01:00:5e:00:00:01"],
     "-device", "multicast"),
    (K + ["-netdev", "tap,id=n,ifname=t", "-device", "virtio-net-device,netdev=n",
          "-device", "virtio-net-device,netdev=n"], "-device", "netdev 'n' is already used"),
    (K + ["-chardev", "pty,id=c", "-device", "virtconsole,id=v,chardev=c"], "-device",
     "virtio-serial-device before"),
    (K + ["-device", "virtio-serial-device", "-device", "virtconsole,id=v,chardev=c"],
     "-device", "chardev 'c' is not defined by -chardev"),
    (K + ["-chardev", "pty,id=c", "-chardev", "pty,id=d", "-device", "virtio-serial-device",
          "-device", "virtconsole,id=v,chardev=c", "-device", "virtconsole,id=w,chardev=d"],
     "-device", "already has a console"),
    (K + ["-device", "virtio-serial-device", "-device", "virtio-serial-device"], "-device", "only one"),
    (K + ["-device", "virtio-rng-device,rng=r"], "-device", "rng object 'r' is not defined"),
    (K + ["-object", "rng-random,id=r,filename=/dev/urandom", "-device",
          "virtio-rng-device,rng=r,max-bytes=1234"], "-device", "max-bytes and period go together"),
    # -qmp
    (K + ["-qmp", "unix:/tmp/q"], "-qmp", "'server,nowait' is required"),
    (K + ["-qmp", "unix:/tmp/q,server"], "-qmp", "'server,nowait' is required"),
    (K + ["-qmp", "/tmp/q,server,nowait"], "-qmp", "unix:PATH"),
    (K + ["-qmp", "vsock:3,server,nowait"], "-qmp", "unknown socket type"),
    (K + ["-qmp", "unix:,server,nowait"], "-qmp", "empty"),
    (K + ["-qmp", "tcp:localhost:4444,server,nowait"], "-qmp", "not an ip address"),
    (K + ["-qmp", "tcp:127.0.0.1:99999,server,nowait"], "-qmp", "port"),
    (K + ["-qmp", "tcp:127.0.0.1,server,nowait"], "-qmp", "tcp:IP:PORT"),
    (K + ["-qmp", "unix:/q,server,nowait,iothread=x"], "-qmp", "unknown property"),
    (K + ["-qmp", "unix:/q,server,nowait", "-qmp", "unix:/q,server,nowait"], "-qmp", "twice"),
    (K + ["-qmp", "unix:/q,server,nowait", "-chardev", "socket,id=c,path=/q,server,nowait"],
     "-chardev", "also used by -qmp"),
    # -incoming
    (K + ["-incoming", "tcp:127.0.0.1:4444"], "-incoming", "only file:DIR"),
    (K + ["-incoming", "unix:/tmp/s"], "-incoming", "live migration"),
    (K + ["-incoming", "/tmp/t"], "-incoming", "file:DIR"),
    (K + ["-incoming", "file:"], "-incoming", "empty"),
    (K + ["-incoming", "file:/t,mapped=maybe"], "-incoming", "mapped"),
    (K + ["-incoming", "file:/t,clock=host"], "-incoming", "clock=realtime"),
    (K + ["-incoming", "file:/t,uffd_sock=/s"], "-incoming", "unknown property"),
    # combinations
    (K + ["-pidfile", "/tmp/p"], "-pidfile", "requires -daemonize"),
    (K + ["-daemonize", "-serial", "stdio"], "-daemonize", "stdio"),
    (K + ["-daemonize", "-chardev", "stdio,id=c"], "-daemonize", "stdio"),
    (K + ["-name", ""], "-name", "1..255"),
    (K + ["-S", "-S"], "-S", "more than once"),
]


@pytest.mark.parametrize("case", ERRORS, ids=lambda c: " ".join(c[0])[:60])
def test_errors_name_the_option(case):
    argv, option, *words = case
    check(argv, option, *words)


# ---------------------------------------------------------------- fuzzing

_OPTION_WORDS = [
    "-machine", "-smp", "-m", "-kernel", "-append", "-initrd", "-drive", "-device", "-netdev",
    "-chardev", "-serial", "-qmp", "-incoming", "-S", "-name", "-D", "-daemonize", "-pidfile",
    "-disable-seccomp", "-object", "-mem-path", "-mem-prealloc", "-bogus", "--kernel", "-",
]
_VALUE_WORDS = [
    "microvm", "q35", "4", "0", "255", "cpus=2,maxcpus=4,sockets=2,cores=2,threads=1", "1G", "12X",
    "size=64M", "vmlinux", "id=d,file=/x", "id=d,file=/x,readonly=on,direct=off",
    "virtio-blk-device,drive=d,id=b", "virtio-net-device,netdev=n,mac=52:54:00:00:00:01",
    "virtio-serial-device", "virtconsole,chardev=c,id=v", "virtio-rng-device,rng=r",
    "tap,id=n,ifname=t", "tap,id=n,fd=-1", "stdio", "pty", "chardev:c", "stdio,id=c",
    "socket,id=c,path=/s,server,nowait", "unix:/q,server,nowait", "tcp:127.0.0.1:1,server,nowait",
    "file:/t", "file:/t,mapped=off", "rng-random,id=r,filename=/dev/urandom", "", ",", "=", "a=b=c",
    "id=", "x,,y", "-x",
]
_word = st.one_of(
    st.sampled_from(_OPTION_WORDS),
    st.sampled_from(_VALUE_WORDS),
    st.text(max_size=30),
    st.lists(st.sampled_from(["id=a", "drive=a", "file=/a", "server", "nowait", "k", "=", "mac=zz",
                              "cpus=3", "on", "virtio-blk-device", "tap", "socket"]),
             max_size=5).map(",".join),
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_word, max_size=16))
def test_random_argv_only_raises_config_error(argv):
    try:
        cfg = parse_args(argv)
    except (ConfigError, CliExit) as e:
        assert str(e)
        if isinstance(e, ConfigError):
            assert "\n" not in str(e) and e.option
    else:
        assert isinstance(cfg, MachineConfig) and cfg.kernel


@settings(max_examples=500, deadline=None)
@given(st.lists(_word, max_size=12))
def test_random_argv_with_kernel_only_raises_config_error(argv):
    try:
        parse_args(["-kernel", "vmlinux"] + argv)
    except (ConfigError, CliExit):
        pass


# ------------------------------------------------- text, names and paths (issue 9)

# What Python makes of the argv bytes b"a\xffb" (undecodable: surrogate escape).
NOT_UTF8 = b"a\xffb".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize("argv,option", [
    (K + ["-append", "console=ttyS0 " + NOT_UTF8], "-append"),
    (K + ["-name", NOT_UTF8], "-name"),
    (["-kernel", "/boot/" + NOT_UTF8], "-kernel"),
    (K + ["-initrd", NOT_UTF8], "-initrd"),
    (K + ["-drive", f"id=d,file=/{NOT_UTF8}"], "-drive"),
    (K + ["-D", NOT_UTF8], "-D"),
    (K + ["-serial", f"file,path={NOT_UTF8}"], "-serial"),
])
def test_non_utf8_values_are_refused_showing_the_bytes(argv, option):
    e = check(argv, option, "not valid UTF-8", "a\\xffb")
    str(e).encode("utf-8")                   # the message itself prints anywhere


@pytest.mark.parametrize("argv,option,what", [
    (["-kernel", "/boot/vm\nlinux"], "-kernel", "path contains a control character ('\\n')"),
    (K + ["-initrd", "/i\rrd"], "-initrd", "control character ('\\r')"),
    (K + ["-D", "/tmp/log\nINFO forged line"], "-D", "control character ('\\n')"),
    (K + ["-pidfile", "/p\n", "-daemonize"], "-pidfile", "control character"),
    (K + ["-serial", "file,path=/s\nx"], "-serial", "control character"),
    (K + ["-chardev", "socket,id=c,path=/s\tx,server,nowait"], "-chardev", "control character ('\\t')"),
    (K + ["-qmp", "unix:/q\n,server,nowait"], "-qmp", "control character"),
    (K + ["-object", "rng-random,id=r,filename=/dev/u\x1brandom"], "-object", "control character ('\\x1b')"),
    (K + ["-drive", "id=d,file=/d\x7f"], "-drive", "control character ('\\x7f')"),
    (K + ["-mem-path", "/m\n"], "-mem-path", "control character"),
    (K + ["-name", "vm\nINFO forged"], "-name", "the name contains a control character ('\\n')"),
    (K + ["-drive", "id=d\n,file=/d"], "-drive", "id contains a control character"),
    (K + ["-chardev", "stdio,id=c\x00"], "-chardev", "id contains a NUL character"),
    (["-kernel", "/k\x00"], "-kernel", "path contains a NUL character"),
])
def test_control_characters_in_paths_ids_and_name_are_refused(argv, option, what):
    check(argv, option, what)


def test_append_may_hold_any_text_but_stays_text():
    cfg = parse_args(K + ["-append", "a=é\tb", "-append", "c\nd"])
    assert cfg.kernel_cmdline == "a=é\tb c\nd"


@pytest.mark.parametrize("ifname", ["a:b", "a b", "a\nb", ".", "..", "é" * 8, "a/b", "\x00"])
def test_ifname_follows_linux_dev_valid_name(ifname):
    check(K + ["-netdev", f"tap,id=n,ifname={ifname}"], "-netdev", "not a valid interface name")


def test_ifname_of_15_bytes_is_accepted():
    assert parse_args(K + ["-netdev", "tap,id=n,ifname=" + "é" * 7 + "x"]).netdevs[0].ifname == "é" * 7 + "x"


def test_kata_options():
    """What Kata Containers' StratoVirt driver passes besides the usual."""
    cfg = parse_args(K + ["-uuid", "6F03E56E-efa1-4f0f-9b8f-492cf1824c83",
                          "-netdev", "tap,id=eth0,fds=3:4",
                          "-device", "virtio-net-device,netdev=eth0,id=eth0,mac=02:00:00:00:00:01"])
    assert cfg.uuid == "6f03e56e-efa1-4f0f-9b8f-492cf1824c83"
    nd = cfg.netdevs[0]
    assert (nd.fd, nd.extra_fds, nd.ifname) == (3, (4,), None)
    assert parse_args(K + ["-netdev", "tap,id=n,fds=7"]).netdevs[0].extra_fds == ()
