-- Issue 12: OAuth2 accounts. A refresh token rotated by the token endpoint (Microsoft answers
-- a new one on every use) is kept here, encrypted (AES-256-GCM, nonce ‖ ciphertext ‖ tag,
-- bound to the account) under the key in `[attachments] dir`/.oauth2-key; never in clear.
-- `configured_mac` is an HMAC of the configured refresh token it descends from: once the
-- configuration gives another refresh token, this row is ignored (and replaced at the next
-- rotation).
CREATE TABLE IF NOT EXISTS oauth2_tokens (
    account        text PRIMARY KEY,
    configured_mac bytea NOT NULL,
    sealed         bytea NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
