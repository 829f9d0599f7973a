"""Webhooks, the authoritative path: signing, the retry schedule, the router and the senders."""
