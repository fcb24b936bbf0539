//! Bad configuration is a clear error, never a panic, and never shows a password: an unknown
//! scheme, an unreachable server, refused credentials, a missing database.
use crate::store::{JobStore, StoreError};

fn err(r: Result<JobStore, StoreError>) -> StoreError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn unknown_schemes_are_refused() {
    for url in ["mysql://u:hunter2@db/afa", "afa.db", ""] {
        let e = err(JobStore::open(url).await);
        let msg = e.to_string();
        assert!(matches!(e, StoreError::Config(_)), "{url}: {e:?}");
        assert!(msg.contains("postgres://"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
    }
}

#[tokio::test]
async fn an_unreachable_server_is_reported_without_its_password() {
    // Port 1 on localhost: nothing listens there. The cause is named, at once.
    let t = std::time::Instant::now();
    let e = err(JobStore::open("postgres://afa:hunter2@127.0.0.1:1/afa").await);
    let msg = format!("{e} / {e:?}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5), "{msg}");
    assert!(matches!(e, StoreError::Connect { .. }), "{e:?}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(msg.contains("127.0.0.1:1"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
}

#[tokio::test]
async fn wrong_credentials_and_missing_databases_are_reported() {
    let Some(server) = tokio::task::spawn_blocking(super::pg::server)
        .await
        .unwrap()
    else {
        eprintln!("skipped: no PostgreSQL");
        return;
    };
    let e = err(JobStore::open(&server.url("postgres", "not-the-pw", "postgres")).await);
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Connect { .. }), "{e:?}");
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(!msg.contains("not-the-pw"), "{msg}");
    let e = err(JobStore::open(&server.url("postgres", super::pg::PASSWORD, "no_such_db")).await);
    assert!(e.to_string().contains("no_such_db"), "{e}");
    assert!(!e.to_string().contains(super::pg::PASSWORD), "{e}");
}
