"""Installing a Debian package the tests need, as root, non-interactively (CI starts from a
fresh Debian machine). Standard library only: dev.py imports it before the virtual
environment exists."""

from __future__ import annotations

import os
import shutil
import subprocess


class InstallError(Exception):
    """apt-get failed; its output is above."""


def can_install() -> bool:
    """Whether packages can be installed here: as root, with apt-get."""
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def install(package: str) -> None:
    """apt-get update, then install the package without its recommendations."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-q", "-y", "--no-install-recommends", package],
    ):
        if subprocess.run(command, env=env).returncode:
            raise InstallError(f"`{' '.join(command)}` failed (see its output above).")
