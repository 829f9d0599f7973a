-- The recorder's memory of what it has written: one row per event_id, written in the same
-- transaction as the event's effects, so a redelivered event changes nothing.
CREATE TABLE processed_events (
    event_id      text PRIMARY KEY,
    workspace_id  text NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    event_type    text NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
SELECT enable_workspace_isolation('processed_events');
GRANT SELECT, INSERT ON processed_events TO switchboard_app;

-- What the media plane measured at the end of a call (call.quality).
ALTER TABLE calls ADD COLUMN quality jsonb;
