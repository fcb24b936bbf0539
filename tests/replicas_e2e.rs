//! End to end across replicas, on real servers: two `afa serve` processes on one PostgreSQL
//! (`common/postgres.rs`) and one S3 bucket (moto, `s3_support`), behind Debian's nginx running
//! the shipped `deploy/nginx.conf` (upstream addresses and port filled in). A cancel sent to the
//! replica that does not run a job stops it; 20 jobs (mixed `n`, seeds, idempotency keys) go in
//! through nginx, one replica is SIGKILLed while it runs some of them, and every job still
//! completes exactly once (one "job succeeded" in all the logs) with its own seeds; every image
//! is served byte for byte through nginx and by each replica (the killed one restarted), and
//! equals the same job run alone on a fresh single server; idempotent retries return the same
//! job from either replica.
//!
//! Needs PostgreSQL's binaries, moto (`scripts/s3_test_server.sh`) and nginx (`apt-get install
//! nginx`): skipped with a note when one is missing, a failure when `CI` is set.
mod http_support;
#[path = "common/postgres.rs"]
mod postgres;
mod s3_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afa::store::{JobStatus, JobStore};
use serde_json::{Value, json};

const LEASE_S: &str = "2";

/// A running `afa serve` with its log lines.
struct Replica {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Drops ANSI colour codes (the log is written for a terminal).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Replica {
    /// Starts `afa serve` on the tiny test ensemble with `args` and `env`; waits for its address.
    fn start(args: &[String], env: &[(String, String)]) -> Self {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut child = Command::new(env!("CARGO_BIN_EXE_afa"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .args(["serve", "--config"])
            .arg(format!("{root}/tests/fixtures/tiny-models.toml"))
            .args([
                "--bind",
                "127.0.0.1:0",
                "--device",
                "cpu",
                "--max-batch",
                "2",
            ])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let line = plain(&line);
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap().to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server did not start");
        Self { child, addr, log }
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Its lease-owner name (from its "job dispatched" lines).
    fn name(&self) -> Option<String> {
        self.lines().iter().find_map(|l| {
            let at = l.find("replica=")?;
            Some(l[at + 8..].split_whitespace().next()?.to_string())
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// nginx running `deploy/nginx.conf` in front of `upstreams`, in `dir`.
struct Nginx {
    child: Child,
    addr: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nginx {
    fn start(bin: &Path, upstreams: [&str; 2], dir: &Path) -> Self {
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
                .unwrap();
        let port = free_port();
        let d = dir.display();
        // Only what a test needs changed: addresses, port, and files in the temp folder.
        let local = format!(
            "http {{\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    \
             fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    \
             scgi_temp_path {d}/scgi;\n    access_log {d}/access.log;\n"
        );
        let conf = shipped
            .replace("127.0.0.1:8081", upstreams[0])
            .replace("127.0.0.1:8082", upstreams[1])
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"))
            .replacen("http {\n", &local, 1);
        assert!(conf.contains(upstreams[0]) && conf.contains(upstreams[1]));
        let user = if running_as_root() {
            "user root;\n"
        } else {
            ""
        };
        let conf =
            format!("{user}daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n{conf}");
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(bin)
            .args(["-e", &format!("{d}/error.log"), "-p"])
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nginx never listened: {log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Whether this process runs as root (nginx's workers then need `user root` to write the temp
/// folder this test made).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

/// The 20 jobs: mixed image counts, steps, explicit and server-drawn seeds, some with an
/// idempotency key.
fn job_specs() -> Vec<(Value, Option<String>)> {
    (0..20u64)
        .map(|i| {
            let mut body = json!({
                "prompt": format!("a lighthouse number {i}"),
                "n": 1 + i % 3,
                "steps": 6 + 2 * (i % 3),
                "size": "64x64",
            });
            if i % 5 != 4 {
                body["seed"] = json!(1000 + 7 * i);
            }
            let key = (i % 4 == 0).then(|| format!("e2e-{i}"));
            (body, key)
        })
        .collect()
}

async fn post_job(client: &reqwest::Client, url: &str, body: &Value, key: Option<&str>) -> Value {
    let mut req = client.post(url).json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    r.json().await.unwrap()
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.json().await.unwrap()
}

/// Waits until every job in `ids` is finished (asked at `base`); their views.
async fn all_finished(
    client: &reqwest::Client,
    base: &str,
    ids: &[String],
    limit: Duration,
) -> Vec<Value> {
    let t = Instant::now();
    let mut views = Vec::new();
    for id in ids {
        loop {
            let v = get_json(client, &format!("{base}/v1/jobs/{id}")).await;
            if v["status"] != "queued" && v["status"] != "running" {
                views.push(v);
                break;
            }
            assert!(t.elapsed() < limit, "job {id} never finished: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    views
}

/// The jobs whose "job succeeded" line each log has.
fn successes(logs: &[Vec<String>]) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for line in logs.iter().flatten() {
        if line.contains("job succeeded")
            && let Some(at) = line.find("job=")
        {
            let id = line[at + 4..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
            *n.entry(id).or_insert(0) += 1;
        }
    }
    n
}

/// The sha256 of each image of a finished job view.
fn hashes(view: &Value) -> Vec<String> {
    view["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sha256"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_nginx_lose_nothing_when_one_is_killed() {
    let Some(nginx) = nginx_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but nginx is not installed (apt-get install nginx)"
        );
        eprintln!("note: nginx is not installed; the replicas end-to-end test is skipped");
        return;
    };
    let Some(s3) = s3_support::server() else {
        return;
    };
    let Some(pg) = tokio::task::spawn_blocking(postgres::fresh_database)
        .await
        .unwrap()
    else {
        return;
    };
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("afa-e2e-{}", afa::store::random_hex(6).unwrap()));
    std::fs::create_dir_all(&dir).unwrap();
    s3.create_bucket("afa-e2e");
    let env: Vec<(String, String)> = s3
        .settings()
        .into_iter()
        .map(|(k, v)| (k.to_uppercase(), v))
        .collect();
    let args = |name: &str| -> Vec<String> {
        [
            "--database-url",
            &pg,
            "--artifact-store",
            "s3://afa-e2e/jobs",
            "--data-dir",
            &dir.join(name).display().to_string(),
            "--job-lease-s",
            LEASE_S,
            "--job-progress-ms",
            "100",
            "--shutdown-grace-s",
            "1",
        ]
        .map(String::from)
        .to_vec()
    };
    let client = reqwest::Client::new();
    let mut a = Replica::start(&args("a"), &env);
    let b = Replica::start(&args("b"), &env);
    http_support::wait_ready_at(&client, &a.addr).await;
    http_support::wait_ready_at(&client, &b.addr).await;
    let proxy = Nginx::start(&nginx, [&a.addr, &b.addr], &dir);
    let store = JobStore::connect(&pg).await.unwrap();

    // A cancel sent to the replica that does not run the job stops it where it runs.
    let long = json!({"prompt": "a long one", "steps": 400, "size": "64x64", "seed": 5});
    let long = post_job(&client, &a.url("/v1/jobs"), &long, None).await;
    let long = long["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let holder = loop {
        let row = store.job(&long).await.unwrap().unwrap();
        if row.status == JobStatus::Running && row.progress.is_some_and(|p| p.step > 0) {
            break row.lease_owner.unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the long job never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (running_on, other) = if a.name().as_deref() == Some(&holder) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(running_on.name().as_deref(), Some(holder.as_str()));
    let r = client
        .delete(other.url(&format!("/v1/jobs/{long}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let t = Instant::now();
    while !running_on
        .lines()
        .iter()
        .any(|l| l.contains("job cancelled in the store") && l.contains(&long))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the holder never stopped the job"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("cancel reached the holder in {:?}", t.elapsed());

    // 20 jobs through nginx (the keyed ones also re-sent to each replica: the same job).
    let specs = job_specs();
    let mut ids = Vec::new();
    for (body, key) in &specs {
        let v = post_job(&client, &proxy.url("/v1/jobs"), body, key.as_deref()).await;
        let id = v["id"].as_str().unwrap().to_string();
        if let Some(k) = key {
            for replica in [&a, &b] {
                let again = post_job(&client, &replica.url("/v1/jobs"), body, Some(k)).await;
                assert_eq!(again["id"], id.as_str());
            }
        }
        ids.push(id);
    }

    // SIGKILL the replica that runs a job with progress, while it runs it.
    let a_name = a.name();
    let t = Instant::now();
    let (victim_jobs, killed_at) = loop {
        let mut held = Vec::new();
        let mut stepping = false;
        for id in &ids {
            let row = store.job(id).await.unwrap().unwrap();
            if row.status == JobStatus::Running && row.lease_owner == a_name {
                stepping |= row.progress.is_some_and(|p| p.step > 0);
                held.push(id.clone());
            }
        }
        if stepping {
            a.child.kill().unwrap(); // SIGKILL
            a.child.wait().unwrap();
            // What it held when it died (claimed in the meantime too).
            let mut held = Vec::new();
            for id in &ids {
                let row = store.job(id).await.unwrap().unwrap();
                if row.status == JobStatus::Running && row.lease_owner == a_name {
                    held.push(id.clone());
                }
            }
            break (held, Instant::now());
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "replica a never ran a job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Its jobs run elsewhere once their leases expire.
    let t = Instant::now();
    loop {
        let mut moved = 0;
        for id in &victim_jobs {
            let row = store.job(id).await.unwrap().unwrap();
            if row.lease_owner != a_name || row.status.is_terminal() {
                moved += 1;
            }
        }
        if moved == victim_jobs.len() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the killed replica's jobs never moved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "killed replica a while it ran {victim_jobs:?}; they were claimed elsewhere {:?} later",
        killed_at.elapsed()
    );

    // Every job completes once, with its own seeds.
    let views = all_finished(&client, &proxy.url(""), &ids, Duration::from_secs(600)).await;
    let restarted = Replica::start(&args("a2"), &env);
    http_support::wait_ready_at(&client, &restarted.addr).await;
    let counts = successes(&[a.lines(), b.lines(), restarted.lines()]);
    for (((body, key), id), view) in specs.iter().zip(&ids).zip(&views) {
        assert_eq!(view["status"], "succeeded", "{view}");
        let n = body["n"].as_u64().unwrap() as usize;
        let seeds = view["seeds"].as_array().unwrap();
        assert_eq!(seeds.len(), n);
        if let Some(seed) = body.get("seed") {
            assert_eq!(&seeds[0], seed, "{view}");
        }
        assert_eq!(view["images"].as_array().unwrap().len(), n);
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} completed {:?} times",
            counts.get(id)
        );
        let row = store.job(id).await.unwrap().unwrap();
        let expected_attempts = if victim_jobs.contains(id) { 2 } else { 1 };
        assert_eq!(row.attempts, expected_attempts, "{id}");
        // The same image from nginx and from each live replica, matching its hash.
        for (index, sha) in hashes(view).iter().enumerate() {
            let path = format!("/v1/jobs/{id}/images/{index}");
            for url in [proxy.url(&path), b.url(&path), restarted.url(&path)] {
                let bytes = client
                    .get(&url)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                assert_eq!(&afa::store::sha256_hex(&bytes), sha, "{url}");
            }
        }
        // A retry with the key answers the same job from either replica.
        if let Some(k) = key {
            for replica in [&b, &restarted] {
                let again = post_job(&client, &replica.url("/v1/jobs"), body, Some(k)).await;
                assert_eq!(again["id"], id.as_str());
            }
        }
    }
    assert_eq!(
        store.job(&long).await.unwrap().unwrap().status,
        JobStatus::Cancelled
    );
    eprintln!(
        "the replicas ran everything {:?} after the start",
        started.elapsed()
    );
    drop(proxy);
    drop(restarted);
    drop(b);

    // The same jobs, each alone on a fresh single server: the same bytes.
    let alone = Replica::start(
        &[
            "--database-url".to_string(),
            format!("sqlite://{}", dir.join("alone.db").display()),
            "--data-dir".into(),
            dir.join("alone").display().to_string(),
        ],
        &[],
    );
    http_support::wait_ready_at(&client, &alone.addr).await;
    for ((body, _), view) in specs.iter().zip(&views) {
        let mut body = body.clone();
        body["seed"] = view["seeds"][0].clone();
        let v = post_job(&client, &alone.url("/v1/jobs"), &body, None).await;
        let id = v["id"].as_str().unwrap().to_string();
        let done = all_finished(&client, &alone.url(""), &[id], Duration::from_secs(300)).await;
        assert_eq!(hashes(&done[0]), hashes(view), "{body}");
    }
    eprintln!("end to end in {:?}", started.elapsed());
    drop(alone);
    let _ = std::fs::remove_dir_all(&dir);
}
