//! `afa serve`: flags (each with an `AFA_*` environment equivalent) -> `app::serve`, including
//! the job store (`--database-url`, `--data-dir`, `--result-ttl-s`, `--job-max-attempts`).
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::device::{DeviceArg, DtypeArg, select_devices};
use crate::api::ApiKeys;
use crate::app::{ServeSettings, serve};
use crate::jobs::JobsConfig;
use crate::store::DatabaseUrl;
use crate::worker::WorkerConfig;

/// A secret from the command line or environment; Debug never shows it.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err("an API key must not be empty".into());
        }
        Ok(Secret(s.trim().to_string()))
    }
}

/// `afa serve` flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The registry of members and served ensembles.
    #[arg(long, env = "AFA_CONFIG", default_value = "./models.toml")]
    pub config: PathBuf,
    /// Address and port to listen on.
    #[arg(long, env = "AFA_BIND", default_value = "0.0.0.0:8080")]
    pub bind: String,
    /// Most images per batch (1 turns batching off).
    #[arg(long, env = "AFA_MAX_BATCH", default_value_t = 4)]
    pub max_batch: usize,
    /// How long a batch waits for compatible work before it starts, in milliseconds.
    #[arg(long, env = "AFA_BATCH_WAIT_MS", default_value_t = 50)]
    pub batch_wait_ms: u64,
    /// Queue capacity, counted in images; beyond it requests get 429 + Retry-After.
    #[arg(long, env = "AFA_QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,
    /// A job unfinished after this many seconds fails (504).
    #[arg(long, env = "AFA_REQUEST_TIMEOUT_S", default_value_t = 600)]
    pub request_timeout_s: u64,
    /// On SIGTERM/SIGINT, how long in-flight work may take to finish.
    #[arg(long, env = "AFA_SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// Accepted bearer keys (repeatable; comma-separated in AFA_API_KEY). None: any key works.
    #[arg(
        long = "api-key",
        env = "AFA_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<Secret>,
    /// Where the models run (one device; `--devices` serves on several GPUs).
    #[arg(long, env = "AFA_DEVICE", value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// CUDA devices to serve on, e.g. `0,1,2,3`: one executor per device, each with its own
    /// resident copy of every ensemble, all fed by the one queue.
    #[arg(long, env = "AFA_DEVICES", value_delimiter = ',')]
    pub devices: Vec<usize>,
    /// Weight precision for every ensemble (default: each ensemble's `dtype` in models.toml).
    #[arg(long, env = "AFA_DTYPE", value_enum)]
    pub dtype: Option<DtypeArg>,
    /// The job database: `sqlite://path` (one machine; created when missing) or
    /// `postgres://user:password@host/db` (replicas sharing one queue); migrated at start-up.
    #[arg(
        long,
        env = "AFA_DATABASE_URL",
        default_value = "sqlite://afa.db",
        hide_env_values = true
    )]
    pub database_url: DatabaseUrl,
    /// Where job artifacts (images, attention-map bundles) are written.
    #[arg(long, env = "AFA_DATA_DIR", default_value = "./afa-data")]
    pub data_dir: PathBuf,
    /// Finished jobs and their files are removed this many seconds after they finished.
    #[arg(long, env = "AFA_RESULT_TTL_S", default_value_t = 86400)]
    pub result_ttl_s: u64,
    /// A job interrupted or failing this many times ends `failed`.
    #[arg(long, env = "AFA_JOB_MAX_ATTEMPTS", default_value_t = 3)]
    pub job_max_attempts: u32,
    /// Lease on a running job, in seconds: renewed every third of it; the jobs of a replica
    /// that stops renewing return to the queue this long after its last renewal.
    #[arg(long, env = "AFA_JOB_LEASE_S", default_value_t = 30)]
    pub job_lease_s: u64,
    /// A running job's progress (queue position, step) is written to the job database at most
    /// once per this many milliseconds, so every replica can show it.
    #[arg(long, env = "AFA_JOB_PROGRESS_MS", default_value_t = crate::jobs::PROGRESS_EVERY.as_millis() as u64)]
    pub job_progress_ms: u64,
    /// Body limit, in bytes, of the routes that carry pictures (`POST /generate`,
    /// `/generate/stream`, `/v1/jobs` with `init_image`, and `/v1/images/edits`).
    #[arg(long, env = "AFA_MAX_UPLOAD_BYTES", default_value_t = crate::api::DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: usize,
    /// Where job images are stored: a local folder (default: the `--data-dir`) or an S3-compatible
    /// bucket `s3://bucket[/prefix]` that every replica shares (endpoint, region and
    /// credentials from the standard AWS_* environment variables).
    #[arg(long, env = "AFA_ARTIFACT_STORE")]
    pub artifact_store: Option<String>,
}

/// Turns flags into settings (checks ranges; does not touch the network or models).
pub fn settings(args: &ServeArgs) -> anyhow::Result<ServeSettings> {
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if args.queue_capacity == 0 {
        bail!("--queue-capacity must be at least 1");
    }
    if args.request_timeout_s == 0 {
        bail!("--request-timeout-s must be at least 1");
    }
    if args.result_ttl_s == 0 || args.job_max_attempts == 0 || args.job_lease_s == 0 {
        bail!("--result-ttl-s, --job-max-attempts and --job-lease-s must be at least 1");
    }
    if args.job_progress_ms < 10 {
        bail!("--job-progress-ms must be at least 10");
    }
    if args.max_upload_bytes < 1024 {
        bail!("--max-upload-bytes must be at least 1024");
    }
    let devices = select_devices(args.device, &args.devices)?;
    let dtype = match args.dtype {
        Some(d) => Some(d.for_device(&devices[0])?),
        None => None,
    };
    Ok(ServeSettings {
        config: args.config.clone(),
        bind: args.bind.clone(),
        worker: WorkerConfig {
            max_batch: args.max_batch,
            batch_wait: Duration::from_millis(args.batch_wait_ms),
            queue_capacity: args.queue_capacity,
            request_timeout: Duration::from_secs(args.request_timeout_s),
        },
        shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
        api_keys: ApiKeys::new(args.api_keys.iter().map(|k| k.0.clone()).collect()),
        devices,
        dtype,
        database_url: args.database_url.clone(),
        data_dir: args.data_dir.clone(),
        jobs: JobsConfig {
            max_attempts: args.job_max_attempts,
            result_ttl: Duration::from_secs(args.result_ttl_s),
            url_wait: Duration::from_secs(args.request_timeout_s),
            lease: Duration::from_secs(args.job_lease_s),
            progress_every: Duration::from_millis(args.job_progress_ms),
        },
        max_upload_bytes: args.max_upload_bytes,
        artifact_store: args.artifact_store.clone().filter(|s| !s.is_empty()),
    })
}

/// Runs `afa serve`.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    crate::telemetry::init_tracing(false);
    serve(settings(args)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn defaults_and_redaction() {
        let t = T::try_parse_from([
            "t",
            "--api-key",
            "k1",
            "--api-key",
            "k2",
            "--max-batch",
            "1",
        ])
        .unwrap();
        assert_eq!(t.serve.bind, "0.0.0.0:8080");
        assert_eq!(t.serve.config, PathBuf::from("./models.toml"));
        assert_eq!(t.serve.api_keys.len(), 2);
        assert!(!format!("{t:?}").contains("k1"));
        let s = settings(&t.serve).unwrap();
        assert_eq!(s.worker.max_batch, 1);
        assert!(!format!("{s:?}").contains("k2"));
        assert_eq!(s.database_url.expose(), "sqlite://afa.db");
        assert_eq!(s.jobs.max_attempts, 3);
    }

    /// bf16 on the CPU is refused with the reason; f16 on the CPU is accepted.
    #[test]
    fn bf16_is_refused_on_the_cpu() {
        let args = |dtype: &str| {
            T::try_parse_from(["t", "--device", "cpu", "--dtype", dtype])
                .unwrap()
                .serve
        };
        let err = settings(&args("bf16")).unwrap_err().to_string();
        assert!(err.contains("bf16 needs a GPU"), "{err}");
        assert_eq!(
            settings(&args("f16")).unwrap().dtype,
            Some(candle_core::DType::F16)
        );
    }

    /// `--devices` lists CUDA ordinals; on a machine without CUDA (or a build without the
    /// feature) each is an error naming the device, and a repeated one is refused.
    #[test]
    fn devices_are_parsed_and_checked() {
        let t = T::try_parse_from(["t", "--devices", "0,1"]).unwrap();
        assert_eq!(t.serve.devices, vec![0, 1]);
        if !candle_core::utils::cuda_is_available() {
            let err = format!("{:#}", settings(&t.serve).unwrap_err());
            assert!(err.contains("CUDA device 0"), "{err}");
        }
        let t = T::try_parse_from(["t", "--devices", "1,1"]).unwrap();
        let err = format!("{:#}", settings(&t.serve).unwrap_err());
        assert!(err.contains("device 1 twice"), "{err}");
        let t = T::try_parse_from(["t", "--device", "cpu", "--devices", "0"]).unwrap();
        let err = settings(&t.serve).unwrap_err().to_string();
        assert!(err.contains("--device cpu"), "{err}");
        let s = settings(&T::try_parse_from(["t", "--device", "cpu"]).unwrap().serve).unwrap();
        assert_eq!(s.devices.len(), 1);
        assert!(s.devices[0].is_cpu());
    }
}
