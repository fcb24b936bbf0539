//! Graceful shutdown of the real `afa serve` binary: on SIGTERM `/ready` turns 503, new work
//! is refused with 503 + Retry-After, the in-flight job still completes, and the exit code is 0.
mod http_support;

use std::time::{Duration, Instant};

use serde_json::json;

#[tokio::test]
async fn sigterm_drains_in_flight_work_and_exits_zero() {
    let (mut child, addr) = http_support::spawn_serve(&["--shutdown-grace-s".into(), "60".into()]);
    let url = |p: &str| format!("http://{addr}{p}");
    let client = reqwest::Client::new();
    http_support::wait_ready_at(&client, &addr).await;
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
