"""`switchboard serve` on the embedded default, as a user runs it: it prints where to look and a
key, answers, reuses its data on a second start, leaves no process behind however it is
stopped, and never logs a token. The admin CLI works beside it and without it."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import orjson
import psutil
import pytest

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Serve:
    process: subprocess.Popen[str]
    url: str = ""
    api_key: str | None = None
    banner: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def start_serve(data_dir: Path, *extra: str, timeout: float = 60) -> Serve:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "switchboard",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    serve = Serve(process)
    assert process.stderr is not None and process.stdout is not None
    err_stream = process.stderr
    threading.Thread(
        target=lambda: serve.stderr.extend(iter(err_stream.readline, "")), daemon=True
    ).start()
    deadline = time.monotonic() + timeout
    for line in iter(process.stdout.readline, ""):
        serve.banner.append(line)
        if match := re.search(r"URL:\s+(http://\S+)", line):
            serve.url = match.group(1)
        if match := re.search(r"API key:\s+(pk_live_\w+)", line):
            serve.api_key = match.group(1)
        if line.startswith("  Try:"):
            break
        assert time.monotonic() < deadline, "serve did not print its banner"
    assert serve.url, "".join(serve.banner) + "".join(serve.stderr)
    return serve


def stop_and_assert_nothing_left(serve: Serve, sig: int) -> None:
    children = serve.descendants()
    assert any("postgres" in " ".join(p.cmdline()) for p in children)
    assert any("nats-server" in " ".join(p.cmdline()) for p in children)
    serve.process.send_signal(sig)
    code = serve.process.wait(30)
    if sig != signal.SIGKILL:
        assert code == 0, "".join(serve.stderr)
    _gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data"


def test_first_start_prints_a_key_that_works_and_sigterm_leaves_nothing(data_dir: Path) -> None:
    serve = start_serve(data_dir)
    try:
        assert serve.api_key is not None
        assert any("/docs" in line for line in serve.banner)
        headers = {"Authorization": f"Bearer {serve.api_key}"}
        response = httpx.get(f"{serve.url}/v1/workspace", headers=headers, timeout=10)
        assert response.status_code == 200
        # A token in a URL must never reach a log line.
        httpx.get(f"{serve.url}/v1/workspace", params={"token": serve.api_key}, timeout=10)
        httpx.get(
            f"{serve.url}/v1/calls/call_0000000000000000/stream",
            params={"token": serve.api_key},
            timeout=10,
        )
        assert httpx.get(f"{serve.url}/readyz", timeout=10).status_code == 200
    finally:
        stop_and_assert_nothing_left(serve, signal.SIGTERM)
    logs = "".join(serve.stderr)
    assert "GET /v1/workspace 200" in logs
    assert serve.api_key not in logs
    assert "token=" not in logs
    assert not (data_dir / "run.json").exists()

    # The second start reuses the data: no new key, and the first key still works.
    again = start_serve(data_dir)
    try:
        assert again.api_key is None
        headers = {"Authorization": f"Bearer {serve.api_key}"}
        assert (
            httpx.get(f"{again.url}/v1/workspace", headers=headers, timeout=10).status_code == 200
        )
    finally:
        stop_and_assert_nothing_left(again, signal.SIGINT)


def test_sigkill_leaves_no_orphans(data_dir: Path) -> None:
    serve = start_serve(data_dir)
    stop_and_assert_nothing_left(serve, signal.SIGKILL)


def uses(process: psutil.Process, data_dir: Path) -> bool:
    """Whether a process works on `data_dir`: named on its command line, or (Postgres as root,
    which reaches its data through its working directory) running inside it."""
    cmdline = " ".join(process.info["cmdline"] or [])
    return str(data_dir) in cmdline or (process.info["cwd"] or "").startswith(str(data_dir))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "switchboard", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )


def test_admin_cli_with_and_without_a_running_server(data_dir: Path) -> None:
    # Without a server: the command starts the embedded Postgres for itself, then stops it.
    made = run_cli("workspace", "create", "Acme", "--json", "--data-dir", str(data_dir))
    assert made.returncode == 0, made.stderr
    created = orjson.loads(made.stdout)
    assert created["workspace_id"].startswith("ws_")
    assert created["api_key"].startswith("pk_live_")
    assert not [p for p in psutil.process_iter(["cmdline", "cwd"]) if uses(p, data_dir)]

    serve = start_serve(data_dir)
    try:
        assert serve.api_key is None  # a workspace already exists: no bootstrap
        headers = {"Authorization": f"Bearer {created['api_key']}"}
        workspace = httpx.get(f"{serve.url}/v1/workspace", headers=headers, timeout=10).json()
        assert workspace == {**workspace, "id": created["workspace_id"], "name": "Acme"}

        # The banner names the workspace and a command that, pasted, makes a key that works.
        assert f"Workspace:  {created['workspace_id']} (Acme)" in "".join(serve.banner)
        pasted = new_key_command(serve)
        made_key = subprocess.run(
            ["bash", "-c", pasted], capture_output=True, text=True, env=clean_env(), timeout=60
        )
        assert made_key.returncode == 0, made_key.stderr
        pasted_key = re.search(r"api key (pk_live_\w+)", made_key.stdout)
        assert pasted_key, made_key.stdout
        pasted_headers = {"Authorization": f"Bearer {pasted_key.group(1)}"}
        answer = httpx.get(f"{serve.url}/v1/workspace", headers=pasted_headers, timeout=10)
        assert answer.json()["id"] == created["workspace_id"]

        # With a server running: the commands use its Postgres and NATS.
        key = run_cli(
            "keys",
            "create",
            "--workspace",
            created["workspace_id"],
            "--json",
            "--data-dir",
            str(data_dir),
        )
        assert key.returncode == 0, key.stderr
        second = orjson.loads(key.stdout)
        second_headers = {"Authorization": f"Bearer {second['api_key']}"}
        assert (
            httpx.get(f"{serve.url}/v1/workspace", headers=second_headers, timeout=10).status_code
            == 200
        )
        listed = run_cli(
            "keys",
            "list",
            "--workspace",
            created["workspace_id"],
            "--json",
            "--data-dir",
            str(data_dir),
        )
        assert {k["id"] for k in orjson.loads(listed.stdout)} >= {second["key_id"]}
        assert second["api_key"] not in listed.stdout
        revoked = run_cli("keys", "revoke", second["key_id"], "--data-dir", str(data_dir))
        assert revoked.returncode == 0, revoked.stderr
        # The running server's cache heard the revocation on NATS.
        assert (
            httpx.get(f"{serve.url}/v1/workspace", headers=second_headers, timeout=10).status_code
            == 401
        )
        assert (
            run_cli(
                "keys", "revoke", "key_doesnotexist0000", "--data-dir", str(data_dir)
            ).returncode
            == 1
        )

        # With two workspaces, `keys create` needs --workspace and says which there are.
        other = run_cli("workspace", "create", "Other", "--json", "--data-dir", str(data_dir))
        other_id = orjson.loads(other.stdout)["workspace_id"]
        ambiguous = run_cli("keys", "create", "--data-dir", str(data_dir))
        assert ambiguous.returncode == 2
        assert "--workspace" in ambiguous.stderr
        assert created["workspace_id"] in ambiguous.stderr and other_id in ambiguous.stderr
        assert "pk_live_" not in ambiguous.stdout + ambiguous.stderr
        listed_json = run_cli("workspace", "list", "--json", "--data-dir", str(data_dir))
        assert [(w["id"], w["name"]) for w in orjson.loads(listed_json.stdout)] == [
            (created["workspace_id"], "Acme"),
            (other_id, "Other"),
        ]
        table = run_cli("workspace", "list", "--data-dir", str(data_dir)).stdout.splitlines()
        assert table[0].split() == ["ID", "NAME", "CREATED", "ACTIVE", "KEYS"]
        assert table[1].startswith(created["workspace_id"]) and " Acme " in table[1]
        assert table[2].startswith(other_id) and len(table) == 3
    finally:
        stop_and_assert_nothing_left(serve, signal.SIGTERM)


def new_key_command(serve: Serve) -> str:
    """The command a later start's banner gives for a new key, as a person would copy it."""
    text = "".join(serve.banner)
    found = re.search(r"a new one:\n\s+(.+)\n", text)
    assert found, text
    return found.group(1).strip()


def test_a_taken_port_is_named_and_nothing_is_created(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = run_cli("serve", "--port", str(port), "--data-dir", str(data_dir))
    assert refused.returncode == 1
    assert f"127.0.0.1:{port}" in refused.stderr and "--port 0" in refused.stderr
    assert "Nothing was started or created" in refused.stderr
    assert not data_dir.exists()
    assert not [p for p in psutil.process_iter(["cmdline", "cwd"]) if uses(p, data_dir)]


def test_demo_mode_streams_live_calls_right_after_install(data_dir: Path) -> None:
    serve = start_serve(data_dir, "--demo")
    try:
        headers = {"Authorization": f"Bearer {serve.api_key}"}
        deadline = time.monotonic() + 30
        calls: list[dict[str, object]] = []
        while not calls:
            assert time.monotonic() < deadline, "the demo produced no call"
            calls = httpx.get(f"{serve.url}/v1/calls", headers=headers, timeout=10).json()["calls"]
            time.sleep(0.2)  # polling a REST list: there is no event to wait on from outside
        assert calls[0]["direction"] == "inbound"
    finally:
        stop_and_assert_nothing_left(serve, signal.SIGTERM)


def nats_line(serve: Serve) -> tuple[str, Path]:
    """(the NATS URL, the token file) that the banner tells producers to use."""
    text = "".join(serve.banner)
    url = re.search(r"NATS:\s+(nats://\S+)", text)
    token_file = re.search(r"token in (\S+)", text)
    assert url and token_file, text
    return url.group(1), Path(token_file.group(1))


async def producer_connects(url: str, token: str) -> None:
    producer = await nats.connect(url, token=token, allow_reconnect=False)
    await producer.flush()
    await producer.close()


async def test_the_banner_gives_producers_a_nats_url_that_survives_restarts(tmp_path: Path) -> None:
    home = tmp_path / "home"  # a home directory: 0700, and it must stay so
    home.mkdir(mode=0o700)
    data_dir = home / ".switchboard"
    serve = start_serve(data_dir)
    try:
        url, token_file = nats_line(serve)
        token = token_file.read_text().strip()
        assert token_file.parent.parent == data_dir.resolve()
        assert token not in url
        await producer_connects(url, token)
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        for private in (token_file, *data_dir.glob("*/*.log"), data_dir / "run.json"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    finally:
        stop_and_assert_nothing_left(serve, signal.SIGTERM)

    again = start_serve(data_dir)
    try:
        assert nats_line(again) == (url, token_file)
        await producer_connects(url, token)
    finally:
        stop_and_assert_nothing_left(again, signal.SIGTERM)
    for output in (serve, again):
        assert token not in "".join(output.banner + output.stderr)
