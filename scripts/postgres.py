"""A throwaway PostgreSQL server on 127.0.0.1 for the test suite: the one place that starts
and stops it. `python3 dev.py test` (and so CI) runs the tests inside `running()`, which
hands the connection to pytest through the DBT_KLAVIYO_PG_* environment variables.

Standard library only: dev.py imports it before the virtual environment exists.

    python3 scripts/postgres.py   # a server for running pytest by hand; Ctrl-C stops it

The server lives in a temporary folder and is gone when it stops: trust authentication on
loopback only, fsync off (its data is never worth keeping). PostgreSQL's `initdb` refuses
to run as root, so as root it runs as the `postgres` user, as Debian's own scripts do; any
other user runs it as themselves. When no PostgreSQL binaries are installed, root installs
Debian's server package with apt-get (CI starts from a fresh Debian machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__:
    from scripts import debian
else:  # run as a script: python3 scripts/postgres.py
    import debian  # type: ignore[no-redef]

HOST = "127.0.0.1"
#: The database superuser initdb creates: the name a stock server has, so the demo's
#: profile defaults work against either.
SUPERUSER = "postgres"
#: Debian's package for the distribution's PostgreSQL server (postgresql-15 on Debian 12);
#: it puts the binaries in /usr/lib/postgresql/<version>/bin and creates the postgres user.
DEBIAN_PACKAGE = "postgresql"
DEBIAN_BINARIES = Path("/usr/lib/postgresql")
#: The OS user root runs the server as.
SERVER_USER = "postgres"
#: Durability costs time and buys nothing for data thrown away after the run.
SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


class ServerError(Exception):
    """The server could not be started; the message says why and what to do."""


@dataclass(frozen=True)
class Server:
    """A running server, and how to reach it."""

    port: int
    directory: Path
    bin_dir: Path
    run_as: str | None  # the OS user that owns it, when it is not the current one

    def env(self) -> dict[str, str]:
        """The variables integration_tests/profiles.yml and the test fixtures read."""
        return {
            "DBT_KLAVIYO_PG_HOST": HOST,
            "DBT_KLAVIYO_PG_PORT": str(self.port),
            "DBT_KLAVIYO_PG_USER": SUPERUSER,
        }

    def stop(self) -> None:
        """Stop the server and remove its folder, data and all."""
        try:
            _run(self, "pg_ctl", "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running() -> Iterator[Server]:
    """A server for the duration of the block, stopped however the block ends."""
    server = start()
    try:
        yield server
    finally:
        server.stop()


def start() -> Server:
    """Start a new server on a free port of 127.0.0.1; ServerError says why it could not."""
    bin_dir = binaries() or install()
    run_as = SERVER_USER if os.geteuid() == 0 else None
    directory = Path(tempfile.mkdtemp(prefix="dbt-klaviyo-pg-"))
    server = Server(0, directory, bin_dir, run_as)
    try:
        if run_as is not None:
            _give(directory, run_as)
        _initdb(server)
        return _listen(server)
    except BaseException as exc:  # Ctrl-C too: leave nothing behind
        log = _tail(directory / "server.log")
        shutil.rmtree(directory, ignore_errors=True)
        if isinstance(exc, ServerError) and log:
            raise ServerError(f"{exc}\nThe server's log ends with:\n{log}") from None
        raise


def binaries() -> Path | None:
    """The folder with initdb and pg_ctl: Debian's newest version, or else the PATH's."""
    versions = sorted(
        (path.parent for path in DEBIAN_BINARIES.glob("*/bin/initdb")),
        key=lambda bin_dir: int(bin_dir.parent.name) if bin_dir.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def install() -> Path:
    """Install Debian's PostgreSQL server package (as root, non-interactively)."""
    if not debian.can_install():
        raise ServerError(
            "PostgreSQL is not installed: no initdb in /usr/lib/postgresql/*/bin or on the PATH. "
            f"Install the server (on Debian and Ubuntu: `sudo apt-get install {DEBIAN_PACKAGE}`)."
        )
    print(f"PostgreSQL is not installed: apt-get install {DEBIAN_PACKAGE} ...", flush=True)
    try:
        debian.install(DEBIAN_PACKAGE)
    except debian.InstallError as exc:
        raise ServerError(str(exc)) from None
    bin_dir = binaries()
    if bin_dir is None:
        raise ServerError(f"{DEBIAN_PACKAGE} was installed, but no initdb can be found.")
    return bin_dir


def _give(directory: Path, user: str) -> None:
    try:
        owner = pwd.getpwnam(user)
    except KeyError:
        raise ServerError(
            f"PostgreSQL refuses to run as root, and there is no {user!r} user to run it as. "
            f"Create one (`useradd --system {user}`) or run as another user."
        ) from None
    os.chown(directory, owner.pw_uid, owner.pw_gid)


def _initdb(server: Server) -> None:
    _run(
        server,
        "initdb",
        *("-D", str(server.directory / "data"), "-U", SUPERUSER),
        *("--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"),
    )


def _listen(server: Server) -> Server:
    """Start the server on a free port. Another process may take that port between our
    probe and the server's bind: then another port is tried, twice at most."""
    log = server.directory / "server.log"
    attempts = 3
    while True:
        attempts -= 1
        listening = dataclasses.replace(server, port=_free_port())
        options = f"-c listen_addresses={HOST} -p {listening.port} -k {server.directory}"
        try:
            _run(
                listening,
                "pg_ctl",
                *("-D", str(server.directory / "data"), "-l", str(log), "-w"),
                *("-o", f"{options} {SETTINGS}"),
                "start",
            )
            return listening
        except ServerError:
            if attempts == 0 or "already in use" not in _tail(log):
                raise


def _run(server: Server, program: str, *args: str) -> None:
    command = [str(server.bin_dir / program), *args]
    if server.run_as is not None:
        command = ["runuser", "-u", server.run_as, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, cwd=server.directory)
    if done.returncode:
        raise ServerError(
            f"`{' '.join(command)}` failed (exit status {done.returncode}):\n"
            f"{(done.stdout + done.stderr).strip()}"
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main() -> None:
    """Start a server for running pytest by hand, print its variables, stop on Ctrl-C."""
    try:
        server = start()
    except ServerError as exc:
        sys.exit(f"cannot start PostgreSQL: {exc}")
    try:
        print("PostgreSQL is running. In another shell:")
        for name, value in server.env().items():
            print(f"  export {name}={value}")
        print("Ctrl-C stops it.", flush=True)
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                signal.pause()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
