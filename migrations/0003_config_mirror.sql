-- A mirror of the configured tenants, providers and mailboxes (no secrets), kept in step on
-- every (re)load, for the CRM to join against the outbox and the inbound tables.
CREATE TABLE IF NOT EXISTS tenants (
    id          text        PRIMARY KEY,
    name        text        NOT NULL,
    file        text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS providers (
    id               text        PRIMARY KEY,
    tenant_id        text        NOT NULL,
    name             text        NOT NULL,
    kind             text        NOT NULL,
    host             text,
    port             integer,
    tls              text,
    username         text,
    max_connections  integer     NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS mailboxes (
    id                  text        PRIMARY KEY,
    tenant_id           text        NOT NULL,
    provider_id         text        NOT NULL,
    user_id             text        NOT NULL,
    protocol            text        NOT NULL,
    host                text        NOT NULL,
    port                integer     NOT NULL,
    tls                 text        NOT NULL,
    username            text        NOT NULL,
    folder              text        NOT NULL,
    idle                boolean     NOT NULL,
    poll_interval_secs  bigint      NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
