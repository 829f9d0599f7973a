-- The transactional outbox (SPEC section 6, "No phantom writes"): a REST write inserts its
-- event here in the same transaction as its rows, and the relay publishes committed events to
-- JetStream with Nats-Msg-Id = event_id, then deletes them. A write that rolls back leaves no
-- event; a write that commits has its event published exactly once, however long the bus is
-- down. Rows are read across workspaces only through the two functions below.
CREATE TABLE event_outbox (
    seq           bigserial PRIMARY KEY,      -- commit order per call and conversation (see relay)
    workspace_id  text NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    event_id      text NOT NULL UNIQUE,
    subject       text NOT NULL,
    body          bytea NOT NULL,             -- the exact bytes published
    created_at    timestamptz NOT NULL DEFAULT now()
);

SELECT enable_workspace_isolation('event_outbox'::regclass);
GRANT INSERT ON event_outbox TO switchboard_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO switchboard_app;

-- Wakes the relay when a write commits (NOTIFY is delivered at commit, and only then).
CREATE FUNCTION event_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('switchboard_event_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER event_outbox_notify AFTER INSERT ON event_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION event_outbox_notify();

-- The oldest committed events, in insertion order, for the relay, with their age (by the
-- database's clock, so replicas' clocks do not matter).
CREATE FUNCTION relay_outbox_batch(p_limit integer)
RETURNS TABLE (seq bigint, event_id text, subject text, body bytea, created_at timestamptz,
               age_seconds double precision)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT o.seq, o.event_id, o.subject, o.body, o.created_at,
           extract(epoch FROM clock_timestamp() - o.created_at)::double precision
      FROM public.event_outbox o ORDER BY o.seq LIMIT p_limit
$$;

-- Forgets events the bus has stored.
CREATE FUNCTION relay_outbox_done(p_seqs bigint[]) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    DELETE FROM public.event_outbox WHERE seq = ANY (p_seqs)
$$;

REVOKE ALL ON FUNCTION relay_outbox_batch(integer), relay_outbox_done(bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay_outbox_batch(integer), relay_outbox_done(bigint[])
    TO switchboard_app;
