"""The console's files as the server serves them, without a browser: every file under
switchboard/web with a content type a browser runs, the page's strict CSP, nothing inline
that the CSP would block, no eval, and the key kept in sessionStorage only."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.harness import ServerThread

WEB = Path(__file__).resolve().parent.parent / "switchboard" / "web"
TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".html": "text/html",
}


async def test_every_console_file_is_served_with_its_type(server: ServerThread) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        page = await http.get("/")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "unsafe" not in csp
        for path in sorted(WEB.iterdir()):
            response = await http.get(f"/web/{path.name}")
            assert response.status_code == 200, path.name
            kind = response.headers["content-type"].split(";")[0]
            wanted = TYPES[path.suffix]
            assert kind == wanted or (path.suffix == ".js" and kind == "application/javascript")
            assert response.headers["cache-control"] == "no-cache"  # revalidated, never stale
        favicon = await http.get("/favicon.ico")
        assert favicon.status_code == 200 and favicon.headers["content-type"] == "image/svg+xml"
        # Every file the page and its modules name exists.
        named = set(re.findall(r'(?:src|href)="/web/([\w.]+)"', page.text))
        for module in WEB.glob("*.js"):
            named |= set(re.findall(r'from "\./([\w.]+)"', module.read_text()))
        assert named and all((WEB / name).exists() for name in named), named


def test_nothing_inline_no_eval_and_the_key_in_session_storage_only() -> None:
    page = (WEB / "index.html").read_text()
    assert "<style" not in page and " style=" not in page
    assert all('src="' in tag for tag in re.findall(r"<script[^>]*>", page))
    for module in WEB.glob("*.js"):
        code = module.read_text()
        for banned in ("eval(", "new Function", "localStorage", "innerHTML", ".style."):
            assert banned not in code, f"{module.name}: {banned}"
        assert 'setAttribute("style"' not in code and "style:" not in code, module.name
