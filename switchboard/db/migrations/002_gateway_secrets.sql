-- Secrets shared by every replica (the stream-token signing key). Only the owner role can read
-- them; the application role receives them at start, never through a query of its own.
CREATE TABLE gateway_secrets (
    name        text PRIMARY KEY,
    value       bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON gateway_secrets FROM PUBLIC;
