//! Job artifacts in an S3-compatible bucket (moto_server, tests/s3_support): what one replica
//! writes another reads, hashes are checked, a job's objects go with it, and a missing bucket
//! or an unreachable endpoint is a clear error at open, never a panic.
mod http_support;
mod s3_support;

use afa::store::{ArtifactFile, Artifacts, StoreError};

fn open(url: &str, server: &s3_support::MotoServer) -> Result<Artifacts, StoreError> {
    let settings = server.settings();
    let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Artifacts::open_spec_with(url, &pairs)
}

#[test]
fn replicas_share_artifacts_through_the_bucket() {
    let Some(server) = s3_support::server() else {
        return;
    };
    server.create_bucket("afa-shared");
    let writer = open("s3://afa-shared/replicas", server).unwrap();
    let reader = open("s3://afa-shared/replicas", server).unwrap();
    assert!(writer.is_shared());
    let files = [
        ArtifactFile {
            index: 0,
            kind: "png",
            bytes: b"\x89PNG first".to_vec(),
        },
        ArtifactFile {
            index: 0,
            kind: "maps",
            bytes: b"{\"maps\": []}".to_vec(),
        },
        ArtifactFile {
            index: 1,
            kind: "webp",
            bytes: b"RIFF second".to_vec(),
        },
    ];
    let rows = writer.write("job_0001", &files).unwrap();
    assert_eq!(rows[2].path, "jobs/job_0001/1.webp");
    for (row, file) in rows.iter().zip(&files) {
        assert_eq!(reader.read(row).unwrap(), file.bytes, "{}", row.path);
    }
    // A row whose hash no longer matches what is stored is corrupt, not served.
    let mut tampered = rows[0].clone();
    tampered.sha256 = afa::store::sha256_hex(b"something else");
    assert!(matches!(
        reader.read(&tampered),
        Err(StoreError::Corrupt(_))
    ));
    // Another job under the same prefix survives the first one's removal.
    let other = writer.write("job_0002", &files[..1]).unwrap();
    reader.remove_job("job_0001").unwrap();
    assert!(matches!(
        reader.read(&rows[0]),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(writer.read(&other[0]).unwrap(), files[0].bytes);
    reader.remove_job("job_0001").unwrap(); // again: nothing left, still fine
    // Paths from a row never leave the prefix.
    let mut escape = other[0].clone();
    escape.path = "../outside/0.png".into();
    assert!(reader.read(&escape).is_err());
}

#[test]
fn bad_configuration_fails_at_open_with_the_reason() {
    let Some(server) = s3_support::server() else {
        return;
    };
    let missing = open("s3://no-such-bucket", server).unwrap_err();
    assert!(matches!(missing, StoreError::Remote(_)), "{missing}");
    assert!(missing.to_string().contains("no-such-bucket"), "{missing}");
    let no_bucket = open("s3://", server).unwrap_err();
    assert!(
        no_bucket.to_string().contains("names no bucket"),
        "{no_bucket}"
    );
    let dead = Artifacts::open_spec_with(
        "s3://afa-shared",
        &[
            ("aws_endpoint", "http://127.0.0.1:9"),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
            ("aws_region", "us-east-1"),
        ],
    )
    .unwrap_err();
    assert!(matches!(dead, StoreError::Remote(_)), "{dead}");
}

/// `afa serve` flags (beyond `http_support::spawn_serve`'s) for artifacts in `store`, with
/// its database and data dir under `dir`.
fn serve_args(store: &str, dir: &std::path::Path) -> Vec<String> {
    vec![
        "--artifact-store".into(),
        store.into(),
        "--database-url".into(),
        format!("sqlite://{}", dir.join("jobs.db").display()),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
    ]
}

/// The AWS_* variables that point a server at `server`.
fn aws_env(server: &s3_support::MotoServer) -> Vec<(String, String)> {
    server
        .settings()
        .into_iter()
        .map(|(k, v)| (k.to_uppercase(), v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_job_writes_its_images_to_the_bucket() {
    let Some(server) = s3_support::server() else {
        return;
    };
    server.create_bucket("afa-serve");
    let dir = std::env::temp_dir().join(format!("afa-s3-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // A bucket that does not exist stops the start with the reason (exit 1, no panic).
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_afa"))
        .args([
            "serve",
            "--config",
            &format!("{root}/tests/fixtures/tiny-models.toml"),
        ])
        .args(serve_args("s3://afa-absent/x", &dir))
        .envs(aws_env(server))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("artifact store") && !stderr.contains("panicked"),
        "{stderr}"
    );

    let (mut child, addr) = http_support::spawn_serve_with_env(
        &serve_args("s3://afa-serve/replicas", &dir),
        &aws_env(server),
    );
    let client = reqwest::Client::new();
    http_support::wait_ready_at(&client, &addr).await;
    let started = std::time::Instant::now();
    let job: serde_json::Value = client
        .post(format!("http://{addr}/v1/jobs"))
        .json(&serde_json::json!({"prompt": "a boat", "steps": 1, "size": "64x64", "seed": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let done = loop {
        let v: serde_json::Value = client
            .get(format!("http://{addr}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "succeeded" || v["status"] == "failed" {
            break v;
        }
        assert!(started.elapsed().as_secs() < 300, "job never finished: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    let served = client
        .get(format!("http://{addr}/v1/jobs/{id}/images/0"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(served.starts_with(b"\x89PNG"));
    // The object is in the bucket, byte for byte, and nothing went to the local data dir.
    let row = afa::store::ArtifactRow {
        job_id: id.clone(),
        index: 0,
        kind: "png".into(),
        path: format!("jobs/{id}/0.png"),
        sha256: afa::store::sha256_hex(&served),
        bytes: served.len() as u64,
    };
    let bucket = open("s3://afa-serve/replicas", server).unwrap();
    let object = tokio::task::spawn_blocking(move || bucket.read(&row))
        .await
        .unwrap();
    assert_eq!(object.unwrap(), served);
    assert!(!dir.join("data").join("jobs").join(&id).exists());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
