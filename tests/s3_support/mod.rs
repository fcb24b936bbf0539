//! An S3-compatible server for tests: `moto_server` (PyPI `moto[server]`) on a free port, one
//! per test binary, with a fresh bucket per test. The binary is `$AFA_MOTO_SERVER`, else
//! `target/moto-venv/bin/moto_server` (`scripts/s3_test_server.sh` installs it). Missing: the
//! tests fail when `CI` is set and are skipped with a note otherwise. A watcher shell stops the
//! server when the test process ends.
#![allow(dead_code)]
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct MotoServer {
    pub endpoint: String,
    _child: ChildGuard,
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("AFA_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin/moto_server")
        });
    path.is_file().then_some(path)
}

/// The shared server, or `None` (after a note) when moto is not installed outside CI.
pub fn server() -> Option<&'static MotoServer> {
    static SERVER: OnceLock<Option<MotoServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let Some(bin) = binary() else {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "moto_server is missing (run scripts/s3_test_server.sh or set AFA_MOTO_SERVER)"
                );
                eprintln!("note: moto_server not installed; S3 tests skipped");
                return None;
            };
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            // Through a watcher shell that stops the server once this test process is gone: the
            // server lives in a static, which is never dropped, so a plain child would outlive
            // the tests (one stray moto per test binary).
            let script = format!(
                "'{bin}' -H 127.0.0.1 -p {port} >/dev/null 2>&1 & m=$!; \
                 while [ -d /proc/{me} ] && kill -0 $m 2>/dev/null; do sleep 0.5; done; \
                 kill $m 2>/dev/null; wait $m",
                bin = bin.display(),
                me = std::process::id(),
            );
            let child = Command::new("/bin/sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server starts");
            let guard = ChildGuard(child);
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "moto_server never listened"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(MotoServer {
                endpoint: format!("http://127.0.0.1:{port}"),
                _child: guard,
            })
        })
        .as_ref()
}

impl MotoServer {
    /// Creates bucket `name` (moto accepts an unsigned CreateBucket).
    pub fn create_bucket(&self, name: &str) {
        let url = format!("{}/{name}", self.endpoint);
        let status = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "PUT",
                &url,
            ])
            .output()
            .expect("curl runs");
        let code = String::from_utf8_lossy(&status.stdout).to_string();
        assert_eq!(code, "200", "CreateBucket {name}: HTTP {code}");
    }

    /// The object-store settings that point at this server.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint.clone()),
            ("aws_allow_http", "true".into()),
            ("aws_access_key_id", "test".into()),
            ("aws_secret_access_key", "test".into()),
            ("aws_region", "us-east-1".into()),
        ]
    }
}
