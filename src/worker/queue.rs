//! The queue: image-level work items in arrival order, bounded by a capacity counted in
//! images, and the batching rule. A plain struct (no threads, no async) so its rules are unit
//! tested directly: the oldest waiting image decides the next batch's key (FIFO across keys, so
//! no key starves), and up to `max_batch` images with that key join it, in arrival order.
use std::collections::VecDeque;
use std::time::Instant;

use super::contract::BatchKey;
use crate::pipeline::ImageSpec;

/// One image waiting to run.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub job_id: u64,
    /// Position of the image in its job.
    pub image_index: usize,
    pub key: BatchKey,
    pub spec: ImageSpec,
    pub enqueued_at: Instant,
}

/// Why an enqueue was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub queued: usize,
    pub capacity: usize,
}

/// The bounded FIFO of work items.
#[derive(Debug)]
pub struct Queue {
    items: VecDeque<WorkItem>,
    capacity: usize,
}

impl Queue {
    /// An empty queue holding at most `capacity` images.
    pub fn new(capacity: usize) -> Self {
        Self {
            items: VecDeque::new(),
            capacity,
        }
    }

    /// Images waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Capacity in images.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds all images of a job, or none of them when they do not fit.
    pub fn push_job(&mut self, items: Vec<WorkItem>) -> Result<(), QueueFull> {
        if self.items.len() + items.len() > self.capacity {
            return Err(QueueFull {
                queued: self.items.len(),
                capacity: self.capacity,
            });
        }
        self.items.extend(items);
        Ok(())
    }

    /// Images ahead of `job_id`'s first waiting image, or `None` when it has none waiting.
    pub fn position(&self, job_id: u64) -> Option<usize> {
        self.items.iter().position(|i| i.job_id == job_id)
    }

    /// Job ids with images waiting, in queue order (each once).
    pub fn waiting_jobs(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = Vec::new();
        for item in &self.items {
            if !ids.contains(&item.job_id) {
                ids.push(item.job_id);
            }
        }
        ids
    }

    /// Removes every waiting image of `job_id`; returns how many.
    pub fn remove_job(&mut self, job_id: u64) -> usize {
        let before = self.items.len();
        self.items.retain(|i| i.job_id != job_id);
        before - self.items.len()
    }

    /// The key the next batch would have (that of the oldest waiting image).
    pub fn next_key(&self) -> Option<&BatchKey> {
        self.items.front().map(|i| &i.key)
    }

    /// How many waiting images share the oldest image's key (capped at `max_batch`).
    pub fn ready_for_next(&self, max_batch: usize) -> usize {
        match self.next_key() {
            None => 0,
            Some(key) => self
                .items
                .iter()
                .filter(|i| &i.key == key)
                .take(max_batch)
                .count(),
        }
    }

    /// Takes the next batch: the oldest image and up to `max_batch - 1` more with its key, in
    /// arrival order.
    pub fn take_batch(&mut self, max_batch: usize) -> Vec<WorkItem> {
        let Some(key) = self.next_key().cloned() else {
            return Vec::new();
        };
        let mut batch = Vec::new();
        let mut rest = VecDeque::with_capacity(self.items.len());
        while let Some(item) = self.items.pop_front() {
            if batch.len() < max_batch.max(1) && item.key == key {
                batch.push(item);
            } else {
                rest.push_back(item);
            }
        }
        self.items = rest;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::MapsRequest;
    use crate::schedulers::SchedulerKind;

    fn key(ensemble: &str, steps: usize) -> BatchKey {
        BatchKey {
            ensemble: ensemble.into(),
            mode: "afa".into(),
            width: 64,
            height: 64,
            steps,
            scheduler: SchedulerKind::Ddim,
            strength: None,
            attention_maps: MapsRequest::Off,
        }
    }

    fn job(id: u64, k: &BatchKey, n: usize) -> Vec<WorkItem> {
        (0..n)
            .map(|i| WorkItem {
                job_id: id,
                image_index: i,
                key: k.clone(),
                spec: ImageSpec {
                    prompt: format!("job {id}"),
                    negative_prompt: String::new(),
                    seed: i as u64,
                    guidance_scale: 7.5,
                    init: None,
                },
                enqueued_at: Instant::now(),
            })
            .collect()
    }

    #[test]
    fn capacity_is_counted_in_images_and_jobs_are_all_or_nothing() {
        let k = key("a", 10);
        let mut q = Queue::new(4);
        q.push_job(job(1, &k, 3)).unwrap();
        assert_eq!(
            q.push_job(job(2, &k, 2)),
            Err(QueueFull {
                queued: 3,
                capacity: 4
            })
        );
        assert_eq!(q.len(), 3);
        q.push_job(job(3, &k, 1)).unwrap();
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn batches_group_by_key_fifo_across_keys() {
        let (a, b) = (key("a", 10), key("b", 10));
        let mut q = Queue::new(100);
        q.push_job(job(1, &a, 1)).unwrap();
        q.push_job(job(2, &b, 2)).unwrap();
        q.push_job(job(3, &a, 2)).unwrap();
        let first = q.take_batch(4);
        assert_eq!(
            first.iter().map(|i| i.job_id).collect::<Vec<_>>(),
            vec![1, 3, 3]
        );
        let second = q.take_batch(4);
        assert_eq!(
            second.iter().map(|i| i.job_id).collect::<Vec<_>>(),
            vec![2, 2]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn large_jobs_are_split_and_later_keys_do_not_starve() {
        let (a, b) = (key("a", 10), key("a", 20));
        let mut q = Queue::new(100);
        q.push_job(job(1, &a, 5)).unwrap();
        q.push_job(job(2, &b, 1)).unwrap();
        q.push_job(job(3, &a, 1)).unwrap();
        assert_eq!(q.take_batch(2).len(), 2);
        assert_eq!(q.take_batch(2).len(), 2);
        // Job 1's last image is still the oldest; job 3 joins it.
        let third: Vec<u64> = q.take_batch(2).iter().map(|i| i.job_id).collect();
        assert_eq!(third, vec![1, 3]);
        assert_eq!(q.take_batch(2)[0].job_id, 2);
    }

    #[test]
    fn positions_and_removal() {
        let k = key("a", 10);
        let mut q = Queue::new(100);
        q.push_job(job(1, &k, 2)).unwrap();
        q.push_job(job(2, &k, 1)).unwrap();
        assert_eq!(q.position(2), Some(2));
        assert_eq!(q.remove_job(1), 2);
        assert_eq!(q.position(2), Some(0));
        assert_eq!(q.waiting_jobs(), vec![2]);
        assert_eq!(q.ready_for_next(8), 1);
    }
}
