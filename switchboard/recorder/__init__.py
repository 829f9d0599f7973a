"""The recorder: events from the bus into the database (calls, turns, conversations, messages)."""
