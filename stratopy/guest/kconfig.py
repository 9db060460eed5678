"""The guest kernel's configuration: ``tools/guest/kernel.config`` (a
fragment applied on top of ``make tinyconfig``) as data, the
``scripts/config`` arguments that apply it, and the check that the final
.config honours every line (Kconfig drops options whose dependencies are
missing without a word). One kernel serves both machines (microvm and
q35); the fragment's blocks say which options each needs.

Pure (no build, no I/O): ``stratopy.guest`` builds the kernel with these.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from stratopy.errors import StratoError


@dataclasses.dataclass(frozen=True)
class ConfigOption:
    name: str            # without the CONFIG_ prefix
    value: str | None    # "y", "100", '"text"'; None = "is not set"

    def line(self) -> str:
        if self.value is None:
            return f"# CONFIG_{self.name} is not set"
        return f"CONFIG_{self.name}={self.value}"


_SET_RE = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.+)$")
_UNSET_RE = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


def parse_config(text: str, *, strict: bool = True) -> list[ConfigOption]:
    """Parse a Kconfig fragment or .config. ``strict``: refuse lines that are
    neither comments nor options, and duplicate options."""
    out: list[ConfigOption] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        m = _SET_RE.match(line)
        if m:
            opt = ConfigOption(m.group(1), m.group(2).strip())
        else:
            m = _UNSET_RE.match(line)
            if m:
                opt = ConfigOption(m.group(1), None)
            elif not line or line.startswith("#") or not strict:
                continue
            else:
                raise StratoError(f"kernel config fragment line {n}: cannot parse {raw!r}")
        if strict and opt.name in seen:
            raise StratoError(
                f"kernel config fragment line {n}: CONFIG_{opt.name} already "
                f"given on line {seen[opt.name]}")
        seen[opt.name] = n
        out.append(opt)
    return out


def scripts_config_args(options: Sequence[ConfigOption]) -> list[str]:
    """Arguments for the kernel's scripts/config applying ``options``."""
    args: list[str] = []
    for o in options:
        if o.value is None or o.value == "n":
            args += ["-d", o.name]
        elif o.value == "y":
            args += ["-e", o.name]
        elif o.value == "m":
            args += ["-m", o.name]
        elif o.value.startswith('"') and o.value.endswith('"') and len(o.value) >= 2:
            args += ["--set-str", o.name, o.value[1:-1]]
        else:
            args += ["--set-val", o.name, o.value]
    return args


def check_config(wanted: Sequence[ConfigOption], final_config: str) -> list[str]:
    """Lines of ``wanted`` that the final .config does not honour, each
    described with what the .config has instead."""
    have = {o.name: o.value for o in parse_config(final_config, strict=False)}
    bad: list[str] = []
    for o in wanted:
        got = have.get(o.name)
        if o.value is None or o.value == "n":
            if got not in (None, "n"):
                bad.append(f"{o.line()} (have CONFIG_{o.name}={got})")
        elif got != o.value:
            shown = "not set" if got is None else f"={got}"
            bad.append(f"{o.line()} (have {shown})")
    return bad
