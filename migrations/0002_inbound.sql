-- Inbound: where each IMAP mailbox is (UIDVALIDITY and the last UID handled), and what each
-- mailbox has already published, so re-syncs and restarts publish nothing twice.
CREATE TABLE IF NOT EXISTS mailbox_state (
    mailbox_id   text        PRIMARY KEY,
    uidvalidity  bigint      NOT NULL,
    last_uid     bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS inbound_published (
    mailbox_id    text        NOT NULL,
    -- "mid:<Message-ID>", "sha256:<hex of the message>" or (POP3) "uidl:<UIDL>"
    dedup_key     text        NOT NULL,
    message_id    text,
    -- 'published', or 'dead-lettered' when it went to the inbound DLQ instead
    outcome       text        NOT NULL DEFAULT 'published',
    published_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox_id, dedup_key)
);
