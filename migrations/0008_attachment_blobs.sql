-- Issue 13: inbound attachments (and the raw bytes of dead-lettered inbound emails) stored
-- where every instance can serve them. Content-addressed: the id is the SHA-256 of the bytes,
-- so the same file received by any instance is stored once.
--
-- The bytes are kept in parts of at most 1 MiB (`attachment_parts`), so a large email is
-- written and served piece by piece; the `attachment_blobs` row is written last, in the same
-- transaction, and is what says the bytes are complete.
CREATE TABLE IF NOT EXISTS attachment_parts (
    id    text    NOT NULL,
    part  integer NOT NULL,
    bytes bytea   NOT NULL,
    PRIMARY KEY (id, part)
);

CREATE TABLE IF NOT EXISTS attachment_blobs (
    id        text PRIMARY KEY,
    size      bigint      NOT NULL,
    parts     integer     NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
);
