-- Images may also be JPEG or WebP files (`output_format`): the artifact kind names the image's
-- format. SQLite cannot alter a CHECK constraint, so the table is rebuilt with its rows.
CREATE TABLE artifacts_new (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx    INTEGER NOT NULL,
    -- 'png', 'jpeg', 'webp' (the image, in the requested format) or 'maps' (the
    -- attention-map bundle, JSON).
    kind   TEXT NOT NULL CHECK (kind IN ('png', 'jpeg', 'webp', 'maps')),
    -- Relative to the data dir.
    path   TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes  INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx, kind)
);
INSERT INTO artifacts_new (job_id, idx, kind, path, sha256, bytes)
    SELECT job_id, idx, kind, path, sha256, bytes FROM artifacts;
DROP TABLE artifacts;
ALTER TABLE artifacts_new RENAME TO artifacts;
