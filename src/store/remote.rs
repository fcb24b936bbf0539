//! Artifacts in an S3-compatible object store (`s3://bucket/prefix`), through the `object_store`
//! crate: endpoint, region and credentials come from the standard AWS environment variables
//! (`AWS_ENDPOINT`, `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP` for a plain-HTTP endpoint).
//! Objects are `<prefix>/jobs/<job id>/<file>`, the same relative paths the local backend uses,
//! so rows stay valid whichever backend wrote them. A PUT is atomic, so no reader ever sees a
//! half object. The store's calls are async; the artifact interface is blocking (it runs on
//! blocking threads), so calls run on a small runtime of the backend's own.
use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use super::{StoreError, StoreResult};

/// A bucket (and key prefix) of an S3-compatible store.
pub(super) struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// Where the async calls run; shut down in the background when the backend is dropped.
    runtime: Option<tokio::runtime::Runtime>,
    url: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.url)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn remote_error(url: &str) -> impl FnOnce(object_store::Error) -> StoreError + '_ {
    move |e| StoreError::Remote(format!("{url}: {e}"))
}

impl Remote {
    /// The store of `url` (`s3://bucket` or `s3://bucket/prefix`), configured from the AWS
    /// environment variables, then `settings` (pairs such as `("aws_endpoint", ...)`, the
    /// variables' names in lower case). Does not touch the network; [`Remote::probe`] does.
    pub(super) fn open(url: &str, settings: &[(&str, &str)]) -> StoreResult<Self> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| StoreError::Remote(format!("'{url}' is not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Remote(format!("'{url}' names no bucket")));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (key, value) in settings {
            let key: AmazonS3ConfigKey = key
                .parse()
                .map_err(|e| StoreError::Remote(format!("{url}: setting {key}: {e}")))?;
            builder = builder.with_config(key, *value);
        }
        let store = builder.build().map_err(remote_error(url))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("afa-artifacts")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Remote(format!("{url}: runtime: {e}")))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            runtime: Some(runtime),
            url: url.to_string(),
        })
    }

    /// Runs `fut` on the backend's runtime from any thread (async context or not).
    fn run<T: Send>(
        &self,
        fut: impl std::future::Future<Output = Result<T, object_store::Error>> + Send,
    ) -> StoreResult<T> {
        let Some(rt) = &self.runtime else {
            return Err(StoreError::Remote(format!("{}: closed", self.url)));
        };
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(fut))
                .join()
                .map_err(|_| StoreError::Remote(format!("{}: a call panicked", self.url)))
        })?
        .map_err(remote_error(&self.url))
    }

    fn key(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Writes one object at `rel` (a relative artifact path).
    pub(super) fn put(&self, rel: &str, bytes: &[u8]) -> StoreResult<()> {
        let key = self.key(rel);
        let payload = PutPayload::from(bytes.to_vec());
        self.run(async { self.store.put(&key, payload).await.map(|_| ()) })
    }

    /// The bytes at `rel`, or `None` when there is no such object.
    pub(super) fn get(&self, rel: &str) -> StoreResult<Option<Vec<u8>>> {
        let key = self.key(rel);
        self.run(async {
            match self.store.get(&key).await {
                Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// Deletes every object under `dir` (a relative folder such as `jobs/<id>`).
    pub(super) fn delete_under(&self, dir: &str) -> StoreResult<()> {
        use futures_util::TryStreamExt;
        let prefix = self.key(dir);
        self.run(async {
            let listed: Vec<ObjectPath> = self
                .store
                .list(Some(&prefix))
                .map_ok(|meta| meta.location)
                .try_collect()
                .await?;
            for key in listed {
                match self.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    }

    /// Writes, reads back and deletes a probe object: a missing bucket, wrong credentials or
    /// an unreachable endpoint fail here, at start-up, with the store's reason.
    pub(super) fn probe(&self) -> StoreResult<()> {
        let rel = format!(".afa-probe-{}", super::random_hex(8)?);
        self.put(&rel, b"probe")?;
        let back = self.get(&rel)?;
        let key = self.key(&rel);
        self.run(async { self.store.delete(&key).await })?;
        match back.as_deref() {
            Some(b"probe") => Ok(()),
            _ => Err(StoreError::Remote(format!(
                "{}: a probe object did not read back",
                self.url
            ))),
        }
    }
}
