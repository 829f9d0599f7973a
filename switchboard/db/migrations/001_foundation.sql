-- The foundation schema: workspaces, API keys, agents, calls, turns, conversations, messages,
-- conversation mode history. Every workspace-owned table carries workspace_id and a row-level
-- security policy keyed on the transaction setting app.workspace_id; the application role
-- (switchboard_app) owns nothing and cannot bypass it.

DO $$
BEGIN
    CREATE ROLE switchboard_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOBYPASSRLS;
EXCEPTION WHEN duplicate_object THEN
    NULL;  -- roles are cluster-wide: another database of this cluster may have made it
END
$$;

CREATE FUNCTION app_workspace_id() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT nullif(current_setting('app.workspace_id', true), '') $$;

CREATE TABLE workspaces (
    id          text PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    seq         bigserial UNIQUE
);

CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    workspace_id  text NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    name          text NOT NULL DEFAULT '',
    mode          text NOT NULL CHECK (mode IN ('live', 'test')),
    -- The first characters of the secret, shown in listings and used to find candidate rows;
    -- the secret itself is never stored, only its SHA-256.
    display_prefix text NOT NULL,
    secret_hash   bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    seq           bigserial UNIQUE
);
CREATE INDEX api_keys_display_prefix ON api_keys (display_prefix) WHERE revoked_at IS NULL;
CREATE INDEX api_keys_workspace_seq ON api_keys (workspace_id, seq);

CREATE TABLE agents (
    id            text PRIMARY KEY,
    workspace_id  text NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    name          text NOT NULL,
    instructions  text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    seq           bigserial UNIQUE,
    UNIQUE (workspace_id, id)
);
CREATE INDEX agents_workspace_seq ON agents (workspace_id, seq);

CREATE TABLE calls (
    id                text PRIMARY KEY,
    workspace_id      text NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    agent_id          text,
    direction         text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    transport         text NOT NULL CHECK (transport IN ('esl', 'sip', 'webrtc')),
    from_number       text NOT NULL,
    to_number         text NOT NULL,
    status            text NOT NULL
        CHECK (status IN ('in_progress', 'completed', 'failed', 'no_answer', 'busy')),
    started_at        timestamptz NOT NULL DEFAULT now(),
    ended_at          timestamptz,
    ended_by          text,
    duration_seconds  double precision,
    seq               bigserial UNIQUE,
    UNIQUE (workspace_id, id),
    -- A composite key, so a call can never point at another workspace's agent.
    FOREIGN KEY (workspace_id, agent_id) REFERENCES agents (workspace_id, id)
);
CREATE INDEX calls_workspace_seq ON calls (workspace_id, seq);

CREATE TABLE turns (
    id            text PRIMARY KEY,
    workspace_id  text NOT NULL,
    call_id       text NOT NULL,
    role          text NOT NULL CHECK (role IN ('user', 'agent')),
    text          text NOT NULL,
    spoken_at     timestamptz NOT NULL DEFAULT now(),
    seq           bigserial UNIQUE,
    FOREIGN KEY (workspace_id, call_id) REFERENCES calls (workspace_id, id) ON DELETE CASCADE
);
CREATE INDEX turns_call_seq ON turns (call_id, seq);

CREATE TABLE conversations (
    id               text PRIMARY KEY,
    workspace_id     text NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    agent_id         text,
    channel          text NOT NULL CHECK (channel IN ('sms', 'whatsapp')),
    customer_number  text NOT NULL,
    business_number  text NOT NULL,
    ai_mode          text NOT NULL DEFAULT 'ai' CHECK (ai_mode IN ('ai', 'human', 'closed')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_message_at  timestamptz,
    seq              bigserial UNIQUE,
    UNIQUE (workspace_id, id),
    UNIQUE (workspace_id, channel, customer_number, business_number),
    FOREIGN KEY (workspace_id, agent_id) REFERENCES agents (workspace_id, id)
);
CREATE INDEX conversations_workspace_seq ON conversations (workspace_id, seq);

CREATE TABLE messages (
    id               text PRIMARY KEY,
    workspace_id     text NOT NULL,
    conversation_id  text NOT NULL,
    direction        text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    text             text NOT NULL,
    status           text NOT NULL
        CHECK (status IN ('received', 'sent', 'delivered', 'read', 'failed')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    seq              bigserial UNIQUE,
    FOREIGN KEY (workspace_id, conversation_id)
        REFERENCES conversations (workspace_id, id) ON DELETE CASCADE
);
CREATE INDEX messages_conversation_seq ON messages (conversation_id, seq);

CREATE TABLE conversation_mode_changes (
    id               bigserial PRIMARY KEY,
    workspace_id     text NOT NULL,
    conversation_id  text NOT NULL,
    event_id         text NOT NULL UNIQUE,
    from_mode        text NOT NULL,
    to_mode          text NOT NULL,
    actor_user_id    text NOT NULL,
    changed_at       timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (workspace_id, conversation_id)
        REFERENCES conversations (workspace_id, id) ON DELETE CASCADE
);
CREATE INDEX conversation_mode_changes_conversation ON conversation_mode_changes (conversation_id, id);

-- Row-level security: one policy per table, the same predicate everywhere.
ALTER TABLE workspaces ENABLE ROW LEVEL SECURITY;
CREATE POLICY workspace_isolation ON workspaces
    USING (id = app_workspace_id()) WITH CHECK (id = app_workspace_id());

-- Every later workspace-owned table gets the same policy through this one function.
CREATE FUNCTION enable_workspace_isolation(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', p_table);
    EXECUTE format(
        'CREATE POLICY workspace_isolation ON %s '
        'USING (workspace_id = app_workspace_id()) '
        'WITH CHECK (workspace_id = app_workspace_id())', p_table);
END
$$;
REVOKE ALL ON FUNCTION enable_workspace_isolation(regclass) FROM PUBLIC;

SELECT enable_workspace_isolation(t::regclass)
FROM unnest(ARRAY['api_keys', 'agents', 'calls', 'turns', 'conversations', 'messages',
                  'conversation_mode_changes']) AS t;

-- Key lookup happens before any workspace is known, so it is the one path around RLS: a
-- SECURITY DEFINER function that answers only "which live keys start with this prefix".
CREATE FUNCTION lookup_api_key(p_display_prefix text)
RETURNS TABLE (key_id text, workspace_id text, mode text, secret_hash bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT id, workspace_id, mode, secret_hash
    FROM public.api_keys
    WHERE display_prefix = p_display_prefix AND revoked_at IS NULL
$$;
REVOKE ALL ON FUNCTION lookup_api_key(text) FROM PUBLIC;

GRANT USAGE ON SCHEMA public TO switchboard_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON
    workspaces, api_keys, agents, calls, turns, conversations, messages, conversation_mode_changes
    TO switchboard_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO switchboard_app;
GRANT EXECUTE ON FUNCTION lookup_api_key(text), app_workspace_id() TO switchboard_app;
