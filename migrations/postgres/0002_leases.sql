-- Lease-based claiming (docs/jobs.md, "Leases"): a replica that claims a queued job holds it
-- until `lease_expires_at` (unix ms), renewing it while the job runs. `lease_id` is new at every
-- claim and fences completion: only the current holder's result is recorded.
-- `batch_key` groups jobs that may share a batch, so one claim takes several of them.
ALTER TABLE jobs ADD COLUMN batch_key TEXT;
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_id TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at BIGINT;

CREATE INDEX jobs_claim ON jobs (status, batch_key, queue_order);
CREATE INDEX jobs_lease ON jobs (status, lease_expires_at);
