"""bin/stratopy, the installed `stratopy` command: Python without `site`
(docs/performance.md), finding the package as pip installs it -- a regular
install, an editable one (tools/setup.sh: editable_mode=compat) -- and the
normal start-up as the fallback for anything else.

Each case is a throw-away venv (no pip) whose site-packages holds the
package the way that install would, plus a .pth file that reports whether
`site` ran: it must not, on the launcher's path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "bin", "stratopy")
SITE_PROBE = 'import sys; sys.stderr.write("SITE RAN\\n")\n'


def _venv(tmp_path) -> tuple[str, str]:
    """(venv dir, its site-packages), the launcher copied into its bin/."""
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    v = sys.version_info
    sp = os.path.join(venv, "lib", f"python{v[0]}.{v[1]}", "site-packages")
    assert os.path.isdir(sp), sp
    shutil.copy(LAUNCHER, os.path.join(venv, "bin", "stratopy"))
    with open(os.path.join(sp, "zz_probe.pth"), "w") as f:
        f.write(SITE_PROBE)
    return venv, sp


def _run(cmd: list[str], path: str | None = None, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STRATOPY_PYTHON")}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=60, **kw)


def test_launcher_runs_the_tree_on_pythonpath():
    env = dict(os.environ, PYTHONPATH=REPO, STRATOPY_PYTHON=sys.executable)
    r = subprocess.run([LAUNCHER, "--version"], capture_output=True, text=True, env=env,
                       cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("stratopy ")
    bad = subprocess.run([LAUNCHER, "-m", "64"], capture_output=True, text=True, env=env,
                         cwd="/", timeout=60)
    assert bad.returncode != 0
    assert bad.stderr.splitlines() == ["stratopy: -kernel: is required (the guest kernel: "
                                       "vmlinux or bzImage)"], bad.stderr


@pytest.mark.parametrize("install", ["regular", "editable"])
def test_launcher_finds_an_install_and_skips_site(tmp_path, install):
    venv, sp = _venv(tmp_path)
    if install == "regular":
        os.symlink(os.path.join(REPO, "stratopy"), os.path.join(sp, "stratopy"))
    else:
        with open(os.path.join(sp, "__editable__.stratopy-0.1.0.pth"), "w") as f:
            f.write(REPO + "\n")
    r = _run([os.path.join(venv, "bin", "stratopy"), "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("stratopy ")
    assert "SITE RAN" not in r.stderr
    # The control: the same venv's normal start-up does run the probe.
    r = _run([os.path.join(venv, "bin", "python3"), "-m", "stratopy", "--version"])
    assert r.returncode == 0 and "SITE RAN" in r.stderr, r.stderr


def test_launcher_through_a_link_uses_the_python_beside_the_script(tmp_path):
    """As pipx installs it: ~/.local/bin/stratopy -> VENV/bin/stratopy, with
    no python3 beside the link."""
    venv, sp = _venv(tmp_path)
    os.symlink(os.path.join(REPO, "stratopy"), os.path.join(sp, "stratopy"))
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(os.path.join(venv, "bin", "stratopy"), links / "stratopy")
    # No python3 on PATH: only the one beside the script can run it.
    tools = tmp_path / "tools"
    tools.mkdir()
    os.symlink(shutil.which("readlink"), tools / "readlink")
    r = _run([str(links / "stratopy"), "--version"], path=str(tools))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("stratopy ") and "SITE RAN" not in r.stderr


def test_launcher_falls_back_to_the_normal_start_up(tmp_path):
    """A package only a .pth's code puts on sys.path (as an import-hook
    editable install does): the launcher re-executes Python with site."""
    venv, sp = _venv(tmp_path)
    with open(os.path.join(sp, "hook.pth"), "w") as f:
        f.write(f"import sys; sys.path.append({REPO!r})\n")
    r = _run([os.path.join(venv, "bin", "stratopy"), "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("stratopy ") and "SITE RAN" in r.stderr


def test_launcher_without_the_package_says_so(tmp_path):
    venv, _ = _venv(tmp_path)
    r = _run([os.path.join(venv, "bin", "stratopy"), "--version"])
    assert r.returncode != 0
    assert "No module named stratopy" in r.stderr, r.stderr
