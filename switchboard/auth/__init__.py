"""Authentication: API keys, the `?token=` path policy, and revocation across replicas."""
