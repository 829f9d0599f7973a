-- Webhooks (SPEC section 8): endpoints with their own signing secrets, one delivery row per
-- (endpoint, event), and every attempt. Deliveries are claimed across workspaces only through
-- claim_deliveries(), the one narrow path around RLS for the senders.
CREATE TABLE webhook_endpoints (
    id                    text PRIMARY KEY,
    workspace_id          text NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    url                   text NOT NULL,
    event_types           text[],            -- NULL: every event
    enabled               boolean NOT NULL DEFAULT true,
    secret                text NOT NULL,
    previous_secret       text,              -- still signs until previous_expires_at
    previous_expires_at   timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    seq                   bigserial UNIQUE,
    UNIQUE (workspace_id, id)
);
CREATE INDEX webhook_endpoints_workspace ON webhook_endpoints (workspace_id, seq);

CREATE TABLE webhook_deliveries (
    id               text PRIMARY KEY,
    workspace_id     text NOT NULL,
    endpoint_id      text NOT NULL,
    event_id         text NOT NULL,
    event_type       text NOT NULL,
    body             bytea NOT NULL,         -- the exact bytes signed and sent
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    first_attempt_at timestamptz,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    seq              bigserial UNIQUE,
    UNIQUE (endpoint_id, event_id),
    FOREIGN KEY (workspace_id, endpoint_id) REFERENCES webhook_endpoints (workspace_id, id) ON DELETE CASCADE
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, seq);

CREATE TABLE webhook_attempts (
    id               bigserial PRIMARY KEY,
    workspace_id     text NOT NULL,
    delivery_id      text NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    attempted_at     timestamptz NOT NULL DEFAULT now(),
    status_code      integer,
    latency_ms       double precision,
    error            text,
    next_attempt_at  timestamptz
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);

SELECT enable_workspace_isolation(t::regclass)
FROM unnest(ARRAY['webhook_endpoints', 'webhook_deliveries', 'webhook_attempts']) AS t;
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_endpoints, webhook_deliveries, webhook_attempts
    TO switchboard_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO switchboard_app;

-- Leases due deliveries to one sender: FOR UPDATE SKIP LOCKED, so senders never take the same
-- row; a lease, so a sender that dies mid-delivery gives its rows back when the lease ends.
CREATE FUNCTION claim_deliveries(p_now timestamptz, p_limit integer, p_lease_seconds integer,
                                 p_busy text[])
RETURNS TABLE (delivery_id text, workspace_id text)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    UPDATE public.webhook_deliveries d
       SET lease_until = p_now + make_interval(secs => p_lease_seconds)
     WHERE d.id IN (
           SELECT id FROM public.webhook_deliveries
            WHERE status = 'pending' AND next_attempt_at <= p_now
              AND (lease_until IS NULL OR lease_until < p_now)
              AND NOT (endpoint_id = ANY (coalesce(p_busy, ARRAY[]::text[])))
              AND endpoint_id IN (SELECT id FROM public.webhook_endpoints WHERE enabled)
            ORDER BY next_attempt_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED)
    RETURNING d.id, d.workspace_id
$$;
REVOKE ALL ON FUNCTION claim_deliveries(timestamptz, integer, integer, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION claim_deliveries(timestamptz, integer, integer, text[])
    TO switchboard_app;
