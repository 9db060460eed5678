"""cli_values: the shared checks of ids and paths, through the parser."""

from __future__ import annotations

import pytest

from stratopy.cli_parse import parse_args
from stratopy.errors import ConfigError

K = ["-kernel", "vmlinux"]


@pytest.mark.parametrize("argv, message", [
    (K + ["-drive", "id=,file=/x"], "-drive: id must not be empty"),
    (K + ["-drive", "id=" + "a" * 256 + ",file=/x"], "-drive: id is longer than 255 characters"),
    (["-kernel", "/" + "k" * 4096], "-kernel: path is longer than 4096 characters"),
    (K + ["-chardev", "pty,id=c\x01"], "-chardev: id contains a control character ('\\x01')"),
])
def test_id_and_path_bounds_messages(argv, message):
    """Ids and paths share one check (cli_values._bounded): each message
    names the option, the noun and the limit."""
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert str(e.value).endswith(message), str(e.value)
