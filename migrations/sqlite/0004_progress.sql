-- Progress of a running job, written by the replica holding its lease at a bounded rate
-- (docs/jobs.md, "Progress across replicas"), so the job view and the event stream are right
-- from any replica. `worker_position`: images ahead of it in the holder's worker queue (NULL once
-- it runs); `progress_step` of `progress_total` denoising steps; `progress_at` unix ms. A claim
-- clears them (a new attempt starts from step 0).
ALTER TABLE jobs ADD COLUMN worker_position INTEGER;
ALTER TABLE jobs ADD COLUMN progress_step INTEGER;
ALTER TABLE jobs ADD COLUMN progress_total INTEGER;
ALTER TABLE jobs ADD COLUMN progress_at INTEGER;
