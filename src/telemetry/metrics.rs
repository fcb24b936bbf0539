//! Counters and histograms kept by the server, rendered in the Prometheus text format.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;

/// Bucket upper bounds in seconds, from a millisecond to ten minutes.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0,
];

/// A cumulative Prometheus histogram of seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds (integral so it can be atomic).
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (bound, c) in BUCKETS.iter().zip(&self.counts) {
            if s <= *bound {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines; `labels` is `""` or `k="v",`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (bound, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}le=\"{bound}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let trimmed = labels.trim_end_matches(',');
        let braces = if trimmed.is_empty() {
            String::new()
        } else {
            format!("{{{trimmed}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// What the worker reports at scrape time.
#[derive(Debug, Clone, Default)]
pub struct WorkerGauges {
    pub queued_images: usize,
    pub running_images: usize,
    pub queue_capacity: usize,
    pub images_per_second: f64,
    pub completed_images: u64,
    pub failed_jobs: u64,
    pub cancelled_images: u64,
    pub last_batch_size: usize,
    pub ready: bool,
    pub draining: bool,
    pub devices: Vec<DeviceGauges>,
}

/// One device's numbers at scrape time.
#[derive(Debug, Clone, Default)]
pub struct DeviceGauges {
    /// The `device` label: `cpu`, `cuda:0`, ...
    pub name: String,
    pub up: bool,
    pub running_images: usize,
    pub batches: u64,
    pub failed_batches: u64,
    pub completed_images: u64,
    pub images_per_second: f64,
}

impl DeviceGauges {
    /// Writes every per-device family, one sample per device.
    fn render_all(devices: &[DeviceGauges], out: &mut String) {
        type Value = fn(&DeviceGauges) -> f64;
        let families: [(&str, &str, &str, Value); 6] = [
            (
                DEVICE_UP,
                "gauge",
                "1 while the device takes batches",
                |d| f64::from(u8::from(d.up)),
            ),
            (
                DEVICE_RUNNING_IMAGES,
                "gauge",
                "Images in the batch the device runs",
                |d| d.running_images as f64,
            ),
            (
                DEVICE_BATCHES,
                "counter",
                "Batches run on the device",
                |d| d.batches as f64,
            ),
            (
                DEVICE_FAILED_BATCHES,
                "counter",
                "Batches that failed on the device",
                |d| d.failed_batches as f64,
            ),
            (
                DEVICE_IMAGES,
                "counter",
                "Images generated on the device",
                |d| d.completed_images as f64,
            ),
            (
                DEVICE_IMAGES_PER_SECOND,
                "gauge",
                "The device's measured throughput (moving average)",
                |d| d.images_per_second,
            ),
        ];
        for (name, kind, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for d in devices {
                let _ = writeln!(out, "{name}{{device=\"{}\"}} {}", d.name, value(d));
            }
        }
    }
}

/// Everything the HTTP layer measures itself. Shared by all requests (`Arc<Metrics>`).
#[derive(Debug, Default)]
pub struct Metrics {
    pub queue_wait: Histogram,
    /// One per entry of [`STAGES`].
    pub stages: [Histogram; 4],
    request_seconds: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
    rejections: Mutex<BTreeMap<String, u64>>,
    responses: Mutex<BTreeMap<(String, u16), u64>>,
    pub client_disconnects: AtomicU64,
}

impl Metrics {
    /// Records a refused generation request.
    pub fn reject(&self, reason: &str) {
        *self
            .rejections
            .lock()
            .unwrap()
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// Rejections so far for `reason`.
    pub fn rejections(&self, reason: &str) -> u64 {
        self.rejections
            .lock()
            .unwrap()
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    /// Records one HTTP response of `route` (the matched path template).
    pub fn response(&self, route: &str, status: u16) {
        *self
            .responses
            .lock()
            .unwrap()
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// Records the duration of one generation request of `route`.
    pub fn request_duration(&self, route: &str, d: Duration) {
        let h = self
            .request_seconds
            .lock()
            .unwrap()
            .entry(route.to_string())
            .or_default()
            .clone();
        h.observe(d);
    }

    /// Records the stage timings of one finished job (`stages` in [`STAGES`] order).
    pub fn job_finished(&self, queue: Duration, stages: [Duration; 4]) {
        self.queue_wait.observe(queue);
        for (h, d) in self.stages.iter().zip(stages) {
            h.observe(d);
        }
    }

    pub fn disconnect(&self) {
        self.client_disconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, w: &WorkerGauges) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            READY,
            "1 when models are loaded and not draining",
            f64::from(u8::from(w.ready && !w.draining)),
        );
        gauge(
            &mut out,
            DRAINING,
            "1 while draining for shutdown",
            f64::from(u8::from(w.draining)),
        );
        gauge(
            &mut out,
            QUEUE_DEPTH,
            "Images waiting in the queue",
            w.queued_images as f64,
        );
        gauge(
            &mut out,
            RUNNING_IMAGES,
            "Images in the running batch",
            w.running_images as f64,
        );
        gauge(
            &mut out,
            QUEUE_CAPACITY,
            "Queue capacity in images",
            w.queue_capacity as f64,
        );
        gauge(
            &mut out,
            BATCH_SIZE,
            "Images in the last batch",
            w.last_batch_size as f64,
        );
        gauge(
            &mut out,
            IMAGES_PER_SECOND,
            "Measured throughput (moving average)",
            w.images_per_second,
        );
        counter(
            &mut out,
            IMAGES_COMPLETED,
            "Images generated",
            w.completed_images,
        );
        counter(
            &mut out,
            JOBS_FAILED,
            "Accepted jobs that failed",
            w.failed_jobs,
        );
        counter(
            &mut out,
            CANCELLED_IMAGES,
            "Images cancelled",
            w.cancelled_images,
        );
        counter(
            &mut out,
            CLIENT_DISCONNECTS,
            "Generation requests whose client left before the result",
            self.client_disconnects.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP {REJECTIONS} Generation requests refused, by reason\n# TYPE {REJECTIONS} counter"
        );
        for (reason, n) in self.rejections.lock().unwrap().iter() {
            let _ = writeln!(out, "{REJECTIONS}{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP {QUEUE_WAIT} Seconds a job waited in the queue\n# TYPE {QUEUE_WAIT} histogram"
        );
        self.queue_wait.render(&mut out, QUEUE_WAIT, "");
        let _ = writeln!(
            out,
            "# HELP {STAGE_SECONDS} Seconds per pipeline stage of a job\n# TYPE {STAGE_SECONDS} histogram"
        );
        for (stage, h) in STAGES.iter().zip(&self.stages) {
            h.render(&mut out, STAGE_SECONDS, &format!("stage=\"{stage}\","));
        }
        let _ = writeln!(
            out,
            "# HELP {REQUEST_SECONDS} Seconds per generation request\n# TYPE {REQUEST_SECONDS} histogram"
        );
        for (route, h) in self.request_seconds.lock().unwrap().iter() {
            h.render(&mut out, REQUEST_SECONDS, &format!("route=\"{route}\","));
        }
        DeviceGauges::render_all(&w.devices, &mut out);
        let _ = writeln!(
            out,
            "# HELP {HTTP_RESPONSES} HTTP responses by route and status\n# TYPE {HTTP_RESPONSES} counter"
        );
        for ((route, status), n) in self.responses.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "{HTTP_RESPONSES}{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(2));
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1"), "{out}");
        assert!(out.contains("x_bucket{le=\"2.5\"} 2"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("x_count 2"), "{out}");
    }

    #[test]
    fn render_names_every_family() {
        let m = Metrics::default();
        m.reject("queue_full");
        m.response("/generate", 200);
        m.request_duration("/generate", Duration::from_millis(20));
        m.job_finished(Duration::from_millis(1), [Duration::from_millis(2); 4]);
        let gauges = WorkerGauges {
            devices: vec![
                DeviceGauges {
                    name: "cuda:0".into(),
                    up: true,
                    batches: 3,
                    ..Default::default()
                },
                DeviceGauges {
                    name: "cuda:1".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = m.render(&gauges);
        for name in [
            QUEUE_DEPTH,
            QUEUE_WAIT,
            STAGE_SECONDS,
            BATCH_SIZE,
            IMAGES_PER_SECOND,
            REJECTIONS,
            CANCELLED_IMAGES,
            CLIENT_DISCONNECTS,
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        assert!(text.contains("afa_rejections_total{reason=\"queue_full\"} 1"));
        assert!(
            text.contains("afa_device_up{device=\"cuda:0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("afa_device_up{device=\"cuda:1\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("afa_device_batches_total{device=\"cuda:0\"} 3\n"));
        assert_eq!(
            text.matches("# TYPE afa_device_batches_total counter")
                .count(),
            1
        );
        assert!(text.contains("afa_stage_seconds_bucket{stage=\"denoise\",le=\"0.005\"} 1"));
    }
}
