"""Terminal renderings shared by the admin commands."""

from __future__ import annotations

from typing import Any

from switchboard.ids import iso_ms


def key_line(row: Any) -> str:
    state = f"revoked {iso_ms(row['revoked_at'])}" if row["revoked_at"] else "active"
    return f"{row['id']}  {row['display_prefix']}...  {row['mode']}  {state}  {row['name']}"
