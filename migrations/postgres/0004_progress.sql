-- Progress of a running job, written by the replica holding its lease at a bounded rate
-- (docs/jobs.md, "Progress across replicas"), so the job view and the event stream are right
-- from any replica. `worker_position`: images ahead of it in the holder's worker queue (NULL once
-- it runs); `progress_step` of `progress_total` denoising steps; `progress_at` unix ms. A claim
-- clears them (a new attempt starts from step 0).
ALTER TABLE jobs ADD COLUMN worker_position BIGINT;
ALTER TABLE jobs ADD COLUMN progress_step BIGINT;
ALTER TABLE jobs ADD COLUMN progress_total BIGINT;
ALTER TABLE jobs ADD COLUMN progress_at BIGINT;
