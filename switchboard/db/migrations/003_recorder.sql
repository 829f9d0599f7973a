-- The recorder's memory of what it has written: one row per event_id, written in the same
-- transaction as the event's effects, so a redelivered event changes nothing.
CREATE TABLE processed_events (
    event_id      text PRIMARY KEY,
    workspace_id  text NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    event_type    text NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE processed_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY workspace_isolation ON processed_events
    USING (workspace_id = app_workspace_id()) WITH CHECK (workspace_id = app_workspace_id());
GRANT SELECT, INSERT ON processed_events TO switchboard_app;

-- What the media plane measured at the end of a call (call.quality).
ALTER TABLE calls ADD COLUMN quality jsonb;
