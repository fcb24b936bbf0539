//! Durability of the real `afa serve` binary: jobs accepted with 202 survive a SIGKILL. The
//! server is killed while a job runs and others wait; a new process on the same database and
//! data dir re-queues them in order, runs the interrupted one again, and every job succeeds
//! with its seeds and the same PNG bytes as a synchronous reference run.
mod http_support;

use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Tmp(std::path::PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `afa serve` on the database and data dir in `tmp`; returns it and its address.
fn spawn(tmp: &std::path::Path) -> (Child, String) {
    http_support::spawn_serve(&[
        "--database-url".into(),
        format!("sqlite://{}", tmp.join("jobs.db").display()),
        "--data-dir".into(),
        tmp.join("data").display().to_string(),
    ])
}

async fn job(client: &reqwest::Client, addr: &str, id: &str) -> Value {
    let r = client
        .get(format!("http://{addr}/v1/jobs/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "job {id} is lost");
    r.json().await.unwrap()
}

fn kill(child: &mut Child) {
    // SAFETY: sending a signal to our own child process, whose id we hold.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    let _ = child.wait();
}

fn body(seed: u64) -> Value {
    json!({"prompt": format!("crash test {seed}"), "steps": 8, "seed": seed})
}

#[tokio::test]
async fn sigkill_mid_run_loses_no_job_and_reruns_the_interrupted_one() {
    let tmp = std::env::temp_dir().join(format!("afa-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let _guard = Tmp(tmp.clone());
    let client = reqwest::Client::new();
    let (mut first, addr) = spawn(&tmp);
    http_support::wait_ready_at(&client, &addr).await;
    let seeds = [11u64, 22, 33, 44];
    let mut ids = Vec::new();
    for seed in seeds {
        let r = client
            .post(format!("http://{addr}/v1/jobs"))
            .json(&body(seed))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Kill while the first job is in its denoising loop.
    let t = Instant::now();
    loop {
        let v = job(&client, &addr, &ids[0]).await;
        if v["status"] == "running" && v["progress"]["step"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert_ne!(
            v["status"], "succeeded",
            "too fast to interrupt: raise steps"
        );
        assert!(t.elapsed() < Duration::from_secs(60), "never ran: {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill(&mut first);

    let (mut second, addr) = spawn(&tmp);
    http_support::wait_ready_at(&client, &addr).await;
    let t = Instant::now();
    let mut done = Vec::new();
    for id in &ids {
        loop {
            let v = job(&client, &addr, id).await;
            if v["status"] == "succeeded" {
                done.push(v);
                break;
            }
            assert!(
                ["queued", "running"].contains(&v["status"].as_str().unwrap()),
                "{v}"
            );
            assert!(t.elapsed() < Duration::from_secs(240), "not finished: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(done[0]["attempts"].as_u64().unwrap() >= 2, "{}", done[0]);
    for (v, seed) in done.iter().zip(seeds) {
        assert_eq!(v["seeds"], json!([seed]));
        let url = format!("http://{addr}{}", v["images"][0]["url"].as_str().unwrap());
        let stored = client.get(url).send().await.unwrap().bytes().await.unwrap();
        let reference = client
            .post(format!("http://{addr}/generate"))
            .header("accept", "image/png")
            .json(&body(seed))
            .send()
            .await
            .unwrap();
        assert_eq!(reference.status(), 200);
        assert!(
            stored == reference.bytes().await.unwrap(),
            "seed {seed}: the stored image differs from a reference run"
        );
    }
    // The restarted queue ran in submission order.
    let started: Vec<i64> = done
        .iter()
        .map(|v| v["finished_at"].as_i64().unwrap())
        .collect();
    assert!(started.windows(2).all(|w| w[0] <= w[1]), "{started:?}");
    kill(&mut second);
}
