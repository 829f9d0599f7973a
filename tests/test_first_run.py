"""The first ten minutes, as the README tells them: its commands, read out of README.md and run
on a fresh clone (a first start on a taken port, then the key, the tour, an ended call's 204, a
later start's pasted `keys create`); docs that stay inside the repository; examples that explain
themselves; and a terminal that the console's own requests do not flood."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import pytest

from switchboard.cli import admin_command
from switchboard.config import Settings
from switchboard.events import CATALOGUE
from switchboard.logs import access_level
from switchboard.server import banner
from switchboard.workspaces import NoSingleWorkspace, WorkspaceSummary, only_workspace
from tests.harness import ServerThread, Workspace, eventually

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


# --- the README, read as commands ----------------------------------------------------------------


def shell_blocks(markdown: str) -> list[list[str]]:
    """The README's ```sh blocks, each as its commands: continued lines joined, comments and
    blank lines left out."""
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", markdown, re.DOTALL):
        joined = re.sub(r"\\\n\s*", "", body)
        commands = [line.split("  #")[0].rstrip() for line in joined.splitlines()]
        blocks.append([c for c in commands if c and not c.lstrip().startswith("#")])
    return blocks


def readme_commands() -> list[str]:
    return [command for block in shell_blocks(README.read_text()) for command in block]


def command_with(*needles: str) -> str:
    """The one README command that holds every needle (it may be shown more than once)."""
    found = {c for c in readme_commands() if all(n in c for n in needles)}
    assert len(found) == 1, (needles, found)
    return found.pop()


def test_every_readme_command_runs_through_the_virtualenv() -> None:
    programs = {
        command.split()[0] for command in readme_commands() if "=" not in command.split()[0]
    }
    # One way to run things: `.venv/bin/...` (no bare `switchboard` or `python` that only an
    # activated virtualenv would find), besides curl and the shell's own.
    allowed = {"python3", ".venv/bin/switchboard", ".venv/bin/python", "curl", "echo", "export"}
    assert programs <= allowed, programs
    for command in readme_commands():
        assert not re.search(r"(^|[|;&(]\s*)(switchboard|python|pytest) ", command), command


def test_the_readme_and_docs_point_only_inside_the_repository() -> None:
    for page in [README, ROOT / "docs" / "events.md", ROOT / "docs" / "streams.md"]:
        text = page.read_text()
        assert "../shared" not in text and "SPEC" not in text, page
    for page in [README, *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).resolve().is_relative_to(ROOT), (page, target)
                assert (page.parent / target).exists(), (page, target)


def test_the_event_catalogue_in_docs_is_the_one_the_code_checks() -> None:
    text = (ROOT / "docs" / "events.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \| (.*) \|$", text, re.MULTILINE))
    assert set(rows) == set(CATALOGUE)
    for event_type, fields in CATALOGUE.items():
        for name in fields:
            assert f"`{name}`" in rows[event_type], (event_type, name)


def test_the_stream_contract_is_in_docs() -> None:
    text = (ROOT / "docs" / "streams.md").read_text()
    for promise in (
        "204",
        "event: end",
        "event: error",
        "retry:",
        "from=start",
        "Last-Event-ID",
        "event: gap",
        "event: reset",
        ": keep-alive",
        "send_dtmf",
        "command.result",
        "1012",
        "?token=",
    ):
        assert promise in text, promise


# --- the console's requests in the access log ----------------------------------------------------


def test_the_consoles_own_reads_log_at_debug_and_the_api_at_info() -> None:
    quiet = [
        ("GET", "/", 200, None),
        ("GET", "/web/app.js", 200, "same-origin"),
        ("GET", "/favicon.ico", 200, "same-origin"),
        ("HEAD", "/healthz", 200, None),
        ("GET", "/metrics", 200, None),
        ("GET", "/v1/calls", 200, "same-origin"),
        ("GET", "/v1/events/stream", 200, "same-origin"),
        ("GET", "/v1/calls/call_x/transcript/stream", 204, "same-origin"),
        ("WS", "/v1/calls/call_x/stream", 101, "same-origin"),
    ]
    loud = [
        ("GET", "/v1/calls", 200, None),  # an API client
        ("GET", "/v1/calls", 200, "cross-site"),
        ("GET", "/v1/calls", 200, "none"),  # typed into the address bar
        ("POST", "/v1/messages", 201, "same-origin"),  # a person's action in the console
        ("PATCH", "/v1/conversations/conv_x", 200, "same-origin"),
        ("GET", "/v1/calls/call_x", 404, "same-origin"),  # failures always show
        ("GET", "/web/missing.js", 404, "same-origin"),
        ("GET", "/readyz", 503, None),
        ("GET", "/v1/calls", 0, "same-origin"),  # the client left before an answer
    ]
    assert [access_level(*r) for r in quiet] == [logging.DEBUG] * len(quiet)
    assert [access_level(*r) for r in loud] == [logging.INFO] * len(loud)


async def test_a_console_left_open_does_not_flood_the_terminal(
    server: ServerThread, workspace: Workspace, console_log: io.StringIO
) -> None:
    browser = {"Sec-Fetch-Site": "same-origin", **workspace.headers}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/", headers={"Sec-Fetch-Site": "none"})).status_code == 200
        assert (await http.get("/web/app.js", headers=browser)).status_code == 200
        assert (await http.get("/healthz")).status_code == 200
        for _ in range(3):  # the console's reads of the API
            assert (await http.get("/v1/calls", headers=browser)).status_code == 200
        # What still shows: an API client's request, a person's action, a failure.
        assert (await http.get("/v1/workspace", headers=workspace.headers)).status_code == 200
        placed = await http.post(
            "/v1/calls",
            headers=browser,
            json={"to_number": "+14155550100", "from_number": "+14155550101"},
        )
        assert placed.status_code == 201
        assert (await http.get("/v1/calls/call_0000000000000000", headers=browser)).is_error

    await eventually(lambda: "GET /v1/calls/call_0000000000000000 404" in console_log.getvalue())
    lines = console_log.getvalue().splitlines()
    assert any("GET /v1/workspace 200" in line for line in lines)
    assert any("POST /v1/calls 201" in line for line in lines)
    for quiet in ("GET / 200", "GET /web/app.js 200", "GET /healthz 200", "GET /v1/calls 200"):
        assert not any(quiet in line for line in lines), (quiet, lines)


# --- the examples --------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_an_example_run_without_arguments_prints_its_usage(example: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    bare = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, env=env, timeout=30
    )
    assert bare.returncode == 2, bare.stderr
    assert "usage:" in bare.stderr and f"examples/{example.name}" in bare.stderr
    assert "Traceback" not in bare.stderr
    arguments = (
        ["call_0000000000000000", "1"] if "dtmf" in example.name else ["call_0000000000000000"]
    )
    keyless = subprocess.run(
        [sys.executable, str(example), *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert keyless.returncode == 2 and "SWITCHBOARD_API_KEY" in keyless.stderr, keyless.stderr


# --- later starts: the banner's workspace and its pasted command ---------------------------------


def summary(workspace_id: str, name: str) -> WorkspaceSummary:
    return WorkspaceSummary(workspace_id, name, datetime.now(UTC), 1)


def test_the_admin_command_is_the_program_and_data_dir_this_serve_ran_with() -> None:
    default = Settings()
    script = admin_command(".venv/bin/switchboard", "/usr/bin/python3", Path("/a b"), default)
    assert script("keys create") == "cd '/a b' && .venv/bin/switchboard keys create"
    module = admin_command(
        "/x/switchboard/__main__.py", "/v/bin/python", Path("/w"), Settings(data_dir=Path("/d"))
    )
    assert module("keys create") == "/v/bin/python -m switchboard keys create --data-dir /d"
    relative = admin_command("/v/bin/switchboard", "/p", Path("/w"), Settings(data_dir=Path("d")))
    assert relative("workspace list") == "cd /w && /v/bin/switchboard workspace list --data-dir d"


def test_a_later_starts_banner_names_the_workspace_and_how_to_get_a_key() -> None:
    def admin(arguments: str) -> str:
        return f"sb {arguments}"

    one = banner("http://h:1", None, None, [summary("ws_a", "Default workspace")], admin)
    assert "Workspace:  ws_a (Default workspace)" in one
    assert re.search(r"a new one:\n\s+sb keys create\n", one)
    two = banner("http://h:1", None, None, [summary("ws_a", "A"), summary("ws_b", "B")], admin)
    assert "sb keys create --workspace ws_a" in two and "sb workspace list" in two
    assert 'sb workspace create "My workspace"' in banner("http://h:1", None, None, [], admin)
    first = banner("http://h:1", "pk_live_x", None, [], admin)
    assert "pk_live_x" in first and "keys create" not in first


def test_only_one_workspace_may_go_unnamed() -> None:
    assert only_workspace([summary("ws_a", "A")]) == "ws_a"
    with pytest.raises(NoSingleWorkspace, match="ws_a  A\n  ws_b  B"):
        only_workspace([summary("ws_a", "A"), summary("ws_b", "B")])
    with pytest.raises(NoSingleWorkspace, match="no workspace yet"):
        only_workspace([])


# --- the first run, on a fresh clone -------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh clone of this repository whose `.venv` is this one (creating a virtualenv and
    installing into it is what .ci/run does; here it would only take minutes)."""
    target = tmp_path / "switchboard"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True, timeout=120)
    (target / ".venv").symlink_to(ROOT / ".venv")
    return target


def port_8080_taken() -> socket.socket | None:
    """Holds 127.0.0.1:8080, the README's port, unless another process already does."""
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8080))
        holder.listen()
    except OSError:
        holder.close()
        return None
    return holder


def sh(command: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> str:
    done = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (command, done.stdout, done.stderr)
    return done.stdout


def start(command: str, cwd: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Runs the README's serve command; returns it, its URL and its banner."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    for line in iter(process.stdout.readline, ""):
        lines.append(line)
        if line.startswith("  Try:"):
            break
    url = re.search(r"URL:\s+(http://\S+)", "".join(lines))
    assert url, lines
    return process, url.group(1), lines


def stop(process: subprocess.Popen[str]) -> None:
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    _gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive


@pytest.mark.slow
def test_the_readme_first_run_on_a_fresh_clone(clone: Path) -> None:
    first = command_with("switchboard serve")
    install, serve = first.rsplit(" && ", 1)
    assert install == "python3 -m venv .venv && .venv/bin/pip install -q -e ."
    assert serve.startswith(".venv/bin/switchboard serve")

    # The first start, with the README's port taken: it says so and makes nothing.
    holder = port_8080_taken()
    try:
        refused = subprocess.run(
            ["bash", "-c", serve],
            cwd=clone,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        if holder is not None:
            holder.close()
    assert refused.returncode != 0
    assert "127.0.0.1:8080" in refused.stderr and "--port 0" in refused.stderr, refused.stderr
    assert not (clone / ".switchboard").exists()

    # As the message says: --port 0. The key comes, once.
    process, url, lines = start(f"{serve} --port 0", clone)
    try:
        key = re.search(r"API key:\s+(pk_live_\w+)", "".join(lines))
        assert key, lines
        env = clean_env(KEY=key.group(1), SWITCHBOARD_URL=url)

        def readme(*needles: str) -> str:
            return command_with(*needles).replace("http://127.0.0.1:8080", url)

        assert '"id":"ws_' in sh(readme("$KEY", "/v1/workspace"), clone, env)
        headers = {"Authorization": f"Bearer {key.group(1)}"}
        live = f"{url}/v1/calls?status=in_progress"
        deadline = time.monotonic() + 60
        while not httpx.get(live, headers=headers, timeout=10).json()["calls"]:
            assert time.monotonic() < deadline, "the demo put no call on the air"
            time.sleep(0.2)  # a REST list: from outside there is no event to wait on
        assert '"status":"in_progress"' in sh(readme('status=in_progress"'), clone, env)

        # The tour's live call, and `tail` on it from the start.
        call = sh(readme("CALL=$(") + "; echo $CALL", clone, env).split()[-1]
        assert call.startswith("call_"), call
        env["CALL"] = call
        tail_line = command_with("switchboard tail $CALL --from-start")
        tail = subprocess.Popen(
            ["bash", "-c", f"export SWITCHBOARD_API_KEY=$KEY; exec {tail_line}"],
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert tail.stdout is not None
            assert re.match(r"\s*(user|agent): ", tail.stdout.readline())
        finally:
            tail.kill()
            tail.wait()

        # Once the call has ended, its stream answers 204, and from=start has it all.
        assert httpx.delete(f"{url}/v1/calls/{call}", headers=headers, timeout=10).is_success
        ended = sh(readme("curl -i", "/transcript/stream"), clone, env)
        assert ended.startswith("HTTP/1.1 204"), ended
        replay = command_with("curl -N", "/transcript/stream?from=start")
        assert "event: end" in sh(replay.replace("http://127.0.0.1:8080", url), clone, env)
        example = command_with("examples/watch_transcript.py")
        printed = sh(f"export SWITCHBOARD_API_KEY=$KEY; {example}", clone, env)
        assert printed.rstrip().endswith("call ended")
    finally:
        stop(process)

    # A later start has no key to show: it names the workspace and a command, pasted as is.
    process, url, lines = start(f"{serve} --port 0", clone)
    try:
        text = "".join(lines)
        assert re.search(r"Workspace:\s+ws_\w+ \(Default workspace\)", text), text
        pasted = re.search(r"a new one:\n\s+(.+)\n", text)
        assert pasted, text
        made = sh(pasted.group(1), Path("/"), clean_env())  # from another folder
        new_key = re.search(r"api key (pk_live_\w+)", made)
        assert new_key, made
        headers = {"Authorization": f"Bearer {new_key.group(1)}"}
        assert httpx.get(f"{url}/v1/workspace", headers=headers, timeout=10).status_code == 200
    finally:
        stop(process)
