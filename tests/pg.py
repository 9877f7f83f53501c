"""A throwaway PostgreSQL server for tests: its own cluster in a temp dir, on a free local port.

    with PostgresCluster() as cluster:
        url = cluster.create_database()   # a fresh, empty database per call

Uses the Debian ``postgresql`` package's binaries (/usr/lib/postgresql/<version>/bin; the
scripts/test helper installs it). initdb and postgres refuse to run as root, so under root
they run as the ``postgres`` user the package creates. The server runs in the foreground as
our child with a parent-death signal: if the test process dies without tearing down, the
server dies with it instead of lingering as a daemon.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

START_TIMEOUT_S = 60.0


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    if candidates:
        return max(candidates, key=lambda p: _version_key(p.parent.name))
    for name in ("pg_ctl", "initdb"):
        found = shutil.which(name)
        if found:
            return Path(found).resolve().parent
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL is not installed: run scripts/test (it installs it) or "
                "apt-get install -y postgresql"
            )
        self.bindir = bindir
        self.port = 0
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError(
                    "running as root needs the 'postgres' user (the postgresql package makes it)"
                ) from exc
            self._uid, self._gid = user.pw_uid, user.pw_gid
            self._run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def data_dir(self) -> Path:
        assert self._tmp is not None
        return self._tmp / "data"

    @property
    def log_path(self) -> Path:
        assert self._tmp is not None
        return self._tmp / "postgres.log"

    def start(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="rtcvoice-pg-"))
        try:
            if self._run_as:
                os.chown(self._tmp, self._uid, self._gid)
            (self._tmp / "sock").mkdir()
            if self._run_as:
                os.chown(self._tmp / "sock", self._uid, self._gid)
            self._bin(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
            # Another process may take the free port between our probe and the bind: try again.
            for _ in range(3):
                self.port = _free_port()
                if self._start_server():
                    return
            raise RuntimeError(f"PostgreSQL did not start; its log:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _start_server(self) -> bool:
        assert self._tmp is not None
        argv = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-k",
            str(self._tmp / "sock"),
            # A throwaway cluster: losing it to a power cut is fine, waiting for fsyncs is not.
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=60",
            "-c",
            "shared_buffers=32MB",
        ]
        setpriv = shutil.which("setpriv")
        if setpriv:
            # Set after the switch to the postgres user (a uid change clears it), kept across exec.
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                cwd=self._tmp,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **self._run_as,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            )
            if ready.returncode == 0:
                return True
            time.sleep(0.1)
        raise RuntimeError(
            f"PostgreSQL was not ready within {START_TIMEOUT_S:.0f} s; its log:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stopped = self._bin(
                "pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", check=False
            )
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"pg_ctl stop did not stop PostgreSQL: {stopped.stdout!r}") from None
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp)

    # -- use ---------------------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        name = name or "test_" + uuid.uuid4().hex[:12]
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.url(database),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    # -- helpers -----------------------------------------------------------------------------------

    def _bin(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.bindir / name), *args],
            cwd=self._tmp,  # the postgres user may not be allowed into ours
            capture_output=True,
            text=True,
            check=False,
            **self._run_as,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{name} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError as exc:
            return f"(no log: {exc})"
