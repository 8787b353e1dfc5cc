-- The outbox: one row per outbound request, keyed by (tenant_id, message_id) (contract §5).
CREATE TABLE IF NOT EXISTS outbox (
    tenant_id            text        NOT NULL,
    message_id           text        NOT NULL,
    provider_id          text        NOT NULL,
    user_id              text,
    template_id          text,
    campaign_id          text,
    status               text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'sending', 'retrying', 'sent', 'failed')),
    attempts             integer     NOT NULL DEFAULT 0,
    -- deliveries of the request since its last recorded outcome; a request that keeps
    -- coming back without one (the service crashes on it) is dead-lettered as poison
    deliveries           integer     NOT NULL DEFAULT 0,
    last_error           text,
    provider_message_id  text,
    rfc_message_id       text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    sent_at              timestamptz,
    -- set once the result for this row is confirmed on the result queue
    result_published_at  timestamptz,
    PRIMARY KEY (tenant_id, message_id)
);

CREATE INDEX IF NOT EXISTS outbox_status_idx ON outbox (status, updated_at);
CREATE INDEX IF NOT EXISTS outbox_rfc_message_id_idx ON outbox (rfc_message_id);
