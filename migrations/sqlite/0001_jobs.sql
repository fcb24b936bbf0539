-- The durable job store (docs/jobs.md): API keys (hashes only), jobs, and their artifacts on disk.
CREATE TABLE api_keys (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    -- SHA-256 (hex) of the bearer token; the token itself is never stored.
    key_hash          TEXT NOT NULL UNIQUE,
    -- Most images this key may have queued or running at once (NULL: no limit).
    max_queued_images INTEGER,
    created_at        INTEGER NOT NULL,
    revoked_at        INTEGER
);

CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    -- Submission order; the dispatcher feeds queued jobs to the worker in this order.
    queue_order     INTEGER NOT NULL UNIQUE,
    status          TEXT NOT NULL
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    ensemble        TEXT NOT NULL,
    -- The validated request with every default and the seed resolved (JSON object).
    params          TEXT NOT NULL,
    -- One seed per image (JSON array).
    seeds           TEXT NOT NULL,
    images          INTEGER NOT NULL,
    owner_key_id    TEXT REFERENCES api_keys (id),
    idempotency_key TEXT,
    request_hash    TEXT,
    -- Times the job was handed to the worker.
    attempts        INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    -- Per-stage timings of the finished job (JSON object).
    timings         TEXT,
    -- Unix milliseconds.
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER
);

CREATE UNIQUE INDEX jobs_idempotency
    ON jobs (COALESCE(owner_key_id, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_status_order ON jobs (status, queue_order);
CREATE INDEX jobs_owner ON jobs (owner_key_id);

CREATE TABLE artifacts (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx    INTEGER NOT NULL,
    -- 'png' (the image) or 'maps' (the attention-map bundle, JSON).
    kind   TEXT NOT NULL CHECK (kind IN ('png', 'maps')),
    -- Relative to the data dir.
    path   TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes  INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx, kind)
);
