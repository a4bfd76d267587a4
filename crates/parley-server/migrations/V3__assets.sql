-- Encrypted attachments uploaded by local users; the bytes are files in DATA/assets/<asset_id>.
CREATE TABLE assets (
    asset_id   TEXT    PRIMARY KEY,
    uploader   TEXT    NOT NULL,  -- user id
    size       INTEGER NOT NULL,
    sha256     BLOB    NOT NULL,  -- of the stored (encrypted) bytes
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX assets_by_expiry ON assets (expires_at);
