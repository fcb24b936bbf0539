//! Graceful shutdown of the real `afa serve` binary: on SIGTERM `/ready` turns 503, new work
//! is refused with 503 + Retry-After, the in-flight job still completes, and the exit code is 0.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

#[tokio::test]
async fn sigterm_drains_in_flight_work_and_exits_zero() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new(env!("CARGO_BIN_EXE_afa"))
        .args([
            "serve",
            "--config",
            &format!("{root}/models.toml"),
            "--bind",
            "127.0.0.1:0",
        ])
        .args([
            "--device",
            "cpu",
            "--shutdown-grace-s",
            "60",
            "--max-batch",
            "1",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server did not start");
    let url = |p: &str| format!("http://{addr}{p}");
    let client = reqwest::Client::new();
    let t = Instant::now();
    while client
        .get(url("/ready"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(t.elapsed() < Duration::from_secs(120), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A job long enough to be running when the signal arrives.
    let mut stream = client
        .post(url("/generate/stream"))
        .json(&json!({"prompt": "a slow one", "steps": 30, "seed": 4, "n": 2}))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("event: progress") {
        let chunk = stream
            .chunk()
            .await
            .unwrap()
            .expect("events before the end");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // SAFETY: sending a signal to our own child process, whose id we hold.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t = Instant::now();
    loop {
        let r = client.get(url("/ready")).send().await.unwrap();
        if r.status() == 503 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "/ready stayed 200 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = client
        .post(url("/generate"))
        .json(&json!({"prompt": "late"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    while let Some(chunk) = stream.chunk().await.unwrap() {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        seen.contains("event: result"),
        "the in-flight job did not finish: {seen}"
    );
    assert!(seen.contains("\"seeds\":[4,5]"), "{seen}");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
