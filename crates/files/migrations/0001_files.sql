-- Files and uploads. One schema for SQLite and PostgreSQL: TEXT and BIGINT only, times in unix
-- seconds, no backend-specific types. Statements are separated by ';' at line ends.
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    sha256 TEXT,
    object_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_created_id ON files (created_at, id);
CREATE INDEX IF NOT EXISTS files_purpose_created_id ON files (purpose, created_at, id);
CREATE INDEX IF NOT EXISTS files_expires_at ON files (expires_at);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    mime_type TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    file_expires_after BIGINT,
    status TEXT NOT NULL,
    file_id TEXT NOT NULL,
    object_key TEXT NOT NULL,
    multipart_id TEXT NOT NULL,
    next_part BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS uploads_status_expires ON uploads (status, expires_at);
CREATE TABLE IF NOT EXISTS upload_parts (
    id TEXT PRIMARY KEY,
    upload_id TEXT NOT NULL,
    number BIGINT NOT NULL,
    etag TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS upload_parts_upload ON upload_parts (upload_id, number);
