"""The three live streams: a hub of shared bus subscriptions, bounded outboxes, SSE, WebSocket."""
