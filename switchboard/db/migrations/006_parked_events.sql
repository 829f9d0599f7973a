-- Events a durable consumer could not apply now (status 'waiting': the call or conversation it
-- refers to has not been recorded yet) or gave up on (status 'parked': it waited too long, or
-- failed every attempt). Acknowledging them on the bus and keeping them here means one
-- workspace's poison never holds up another's events, and an operator can see and replay them.
CREATE TABLE parked_events (
    consumer      text NOT NULL,             -- the durable consumer: recorder, webhooks-router
    event_id      text NOT NULL,
    workspace_id  text NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    status        text NOT NULL CHECK (status IN ('waiting', 'parked')),
    waits_for     text,                      -- the call_ or conv_ id a waiting event needs
    event_type    text NOT NULL,
    body          bytea NOT NULL,            -- the envelope as it came off the bus
    reason        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    parked_at     timestamptz,
    seq           bigserial UNIQUE,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX parked_events_waiting ON parked_events (waits_for, seq) WHERE status = 'waiting';
CREATE INDEX parked_events_waiting_age ON parked_events (created_at) WHERE status = 'waiting';
CREATE INDEX parked_events_workspace ON parked_events (workspace_id, seq);

SELECT enable_workspace_isolation('parked_events'::regclass);
GRANT SELECT, INSERT, UPDATE, DELETE ON parked_events TO switchboard_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO switchboard_app;

-- Gives up on events that have waited longer than p_seconds, in every workspace (the sweep
-- runs before any workspace is known); returns what it parked, for the log and the metric.
CREATE FUNCTION park_stale_waiting(p_seconds double precision)
RETURNS TABLE (workspace_id text, event_id text, event_type text, waits_for text)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    UPDATE public.parked_events p
       SET status = 'parked', parked_at = now(),
           reason = p.reason || '; gave up waiting after ' || round(p_seconds) || ' s'
     WHERE p.status = 'waiting' AND p.created_at < now() - make_interval(secs => p_seconds)
    RETURNING p.workspace_id, p.event_id, p.event_type, p.waits_for
$$;
REVOKE ALL ON FUNCTION park_stale_waiting(double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION park_stale_waiting(double precision) TO switchboard_app;
