"""Headless Chromium, for testing and picturing `dbt-klaviyo report`'s page in a real
browser: Debian's `chromium` package, which root installs with apt-get when it is missing
(CI starts from a fresh Debian machine; the install takes about two minutes).

Standard library only: dev.py imports it before the virtual environment exists.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from scripts import debian

DEBIAN_PACKAGE = "chromium"


class BrowserError(Exception):
    """Chromium cannot be found, installed or run."""


def find() -> str | None:
    """The Chromium on the PATH, if any."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def ensure() -> str | None:
    """Chromium, installed first when missing and this is root on Debian; None when it is
    missing and cannot be installed here (the browser tests then skip)."""
    found = find()
    if found or not debian.can_install():
        return found
    print(f"Chromium is not installed: apt-get install {DEBIAN_PACKAGE} ...", flush=True)
    try:
        debian.install(DEBIAN_PACKAGE)
    except debian.InstallError as exc:
        raise BrowserError(str(exc)) from None
    found = find()
    if not found:
        raise BrowserError(f"{DEBIAN_PACKAGE} was installed, but no chromium is on the PATH.")
    return found


def headless(page: Path, *args: str, width: int = 1280, height: int = 2400) -> str:
    """Open a local page in headless Chromium with `args` (--dump-dom prints the DOM it
    built, --screenshot=FILE writes a PNG of the window); what it printed on stdout."""
    browser = find()
    if not browser:
        raise BrowserError(f"Chromium is not installed (apt-get install {DEBIAN_PACKAGE}).")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",  # as root, in CI and containers
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                *args,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if done.returncode:
        raise BrowserError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout
