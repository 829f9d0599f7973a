"""Per-workspace quotas shared by every replica and worker (SPEC 6, "Limits")."""
