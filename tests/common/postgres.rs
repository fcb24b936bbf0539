//! A throwaway PostgreSQL server for tests, one per test binary, started on first use from the
//! binaries in `/usr/lib/postgresql/*/bin` (or `AFA_PG_BIN`): `initdb` into a temp dir owned by
//! the `postgres` user (postgres refuses to run as root), `postgres` on a free localhost port
//! with password authentication, each test in its own fresh database (`createdb`). A watcher
//! shell stops the server and removes its files once the test process is gone, whatever way it
//! ended. Missing binaries: with `CI` set the tests fail loudly, otherwise they are skipped with
//! a note. Shared by the store's unit tests (through `#[path]`) and the integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The superuser's password on the test server.
pub const PASSWORD: &str = "afa-test-pw";

/// A running test server.
pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    /// The watcher shell (it outlives this process by design: it stops the server after it).
    _watcher: std::process::Child,
}

/// `AFA_PG_BIN` when set (only it), else the newest `/usr/lib/postgresql/*/bin`; `None` when
/// it lacks `initdb` or `postgres`.
fn find_bin() -> Option<PathBuf> {
    let complete = |bin: &PathBuf| bin.join("initdb").exists() && bin.join("postgres").exists();
    if let Some(dir) = std::env::var_os("AFA_PG_BIN") {
        return Some(PathBuf::from(dir)).filter(complete);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(complete)
        .collect();
    found.sort();
    found.pop()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free localhost port")
}

/// Runs `cmd` as the `postgres` user (directly when not root).
fn as_postgres(program: &Path, args: &[&str]) -> Command {
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0\n"))
            .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start(bin: PathBuf) -> PgServer {
    let dir = std::env::temp_dir().join(format!(
        "afa-pg-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir for postgres");
    let d = dir.display().to_string();
    std::fs::write(dir.join("pw"), PASSWORD).expect("password file");
    // The server runs as `postgres`: it must own its folder (harmless when not root).
    let _ = Command::new("chown")
        .args(["-R", "postgres:postgres", &d])
        .status();
    let data = format!("{d}/data");
    let pwfile = format!("{d}/pw");
    run(
        as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                &pwfile,
                "--no-sync",
                "-E",
                "UTF8",
            ],
        ),
        "initdb",
    );
    let port = free_port();
    // Tests trade durability for speed; `AFA_PG_DURABLE=1` (the queue benchmark) keeps
    // PostgreSQL's defaults. pg_stat_statements is loaded when installed (Debian ships it), so a
    // benchmark can count statements.
    let mut settings = String::from("-c listen_addresses=127.0.0.1 -c max_connections=200");
    if std::env::var_os("AFA_PG_DURABLE").is_none() {
        settings.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
    }
    if bin.join("../lib/pg_stat_statements.so").exists() {
        settings.push_str(" -c shared_preload_libraries=pg_stat_statements");
    }
    // The watcher: stop the server (fast shutdown) once this process is gone, then clean up.
    let script = format!(
        "'{pg}' -D '{data}' -p {port} -k '{d}' {settings} \
         >'{d}/log' 2>&1 & pg=$!; \
         while [ -d /proc/{me} ] && kill -0 $pg 2>/dev/null; do sleep 0.5; done; \
         kill -INT $pg 2>/dev/null; wait $pg; rm -rf '{d}'",
        pg = bin.join("postgres").display(),
        me = std::process::id(),
    );
    let watcher = as_postgres(Path::new("/bin/sh"), &["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting postgres");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ready {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            panic!("postgres did not start on port {port} within 30 s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    PgServer {
        port,
        bin,
        _watcher: watcher,
    }
}

/// The shared server, or `None` (with a note) when PostgreSQL is not installed and `CI` is
/// not set.
pub fn server() -> Option<&'static PgServer> {
    static SERVER: OnceLock<Option<PgServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| match find_bin() {
            Some(bin) => Some(start(bin)),
            None if std::env::var_os("CI").is_some() => {
                panic!(
                    "CI is set but PostgreSQL is not installed (/usr/lib/postgresql/*/bin, \
                     or AFA_PG_BIN): the store tests need it"
                )
            }
            None => {
                // Straight to stderr: the test harness would capture `eprintln!` of a passing
                // test, and this note must be seen.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "note: PostgreSQL is not installed (/usr/lib/postgresql/*/bin, or \
                     AFA_PG_BIN): skipping the PostgreSQL tests (set CI to make this an error)"
                );
                None
            }
        })
        .as_ref()
}

impl PgServer {
    /// The URL of database `db` as `user` with `password`.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// A new empty database; its URL.
    pub fn fresh_database(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "afa_test_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut cmd = Command::new(self.bin.join("createdb"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", &name])
            .env("PGPASSWORD", PASSWORD);
        run(cmd, "createdb");
        self.url("postgres", PASSWORD, &name)
    }
}

/// A fresh database on the shared server, if there is one.
pub fn fresh_database() -> Option<String> {
    server().map(PgServer::fresh_database)
}
