//! Artifact files: `jobs/<job id>/<index>.png` (or `.jpg`, `.webp`) and `<index>.maps.json`,
//! under the data dir or, shared by every replica, in an S3-compatible bucket
//! (`--artifact-store s3://bucket/prefix`, see `remote`). Local files are written to a
//! temporary name and renamed, so a crash never leaves a half file under a final name (an
//! object PUT is atomic). Paths come from the store (never from a request) and are checked to
//! stay inside the data dir (or the prefix) before any read or delete. Reads check the SHA-256
//! the row holds.
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::remote::Remote;
use super::{ArtifactRow, StoreError, StoreResult, sha256_hex};

/// Where a server's artifacts live. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Artifacts {
    root: PathBuf,
    /// `Some` for an object store; `root` is then only a label.
    remote: Option<Arc<Remote>>,
}

/// One file to write for a job.
#[derive(Debug, Clone)]
pub struct ArtifactFile {
    pub index: usize,
    /// `png`, `jpeg`, `webp` (the image) or `maps`.
    pub kind: &'static str,
    pub bytes: Vec<u8>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Job ids are `job_` + hex; anything else never names a folder.
fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Artifacts {
    /// Uses (creating) the local folder `root`.
    pub fn open(root: impl Into<PathBuf>) -> StoreResult<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("jobs")).map_err(io(&root))?;
        Ok(Self { root, remote: None })
    }

    /// `spec` is an `s3://bucket[/prefix]` URL (configured from the AWS environment variables
    /// and probed with one small object, so a missing bucket or wrong credentials fail here),
    /// or a local folder. Blocking: call before serving or from a blocking thread.
    pub fn open_spec(spec: &str) -> StoreResult<Self> {
        Self::open_spec_with(spec, &[])
    }

    /// [`Artifacts::open_spec`] with object-store settings over the environment's (pairs like
    /// `("aws_endpoint", "http://...")`; ignored for a local folder).
    pub fn open_spec_with(spec: &str, settings: &[(&str, &str)]) -> StoreResult<Self> {
        if !spec.starts_with("s3://") {
            return Self::open(spec);
        }
        let remote = Remote::open(spec, settings)?;
        remote.probe()?;
        Ok(Self {
            root: PathBuf::from(spec),
            remote: Some(Arc::new(remote)),
        })
    }

    /// Whether the artifacts are in an object store shared by replicas.
    pub fn is_shared(&self) -> bool {
        self.remote.is_some()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn job_dir(&self, job_id: &str) -> StoreResult<PathBuf> {
        if !safe_id(job_id) {
            return Err(StoreError::NotFound(format!(
                "no job folder for '{job_id}'"
            )));
        }
        Ok(self.root.join("jobs").join(job_id))
    }

    /// Writes `files` of `job_id` (blocking I/O: call from a blocking thread).
    pub fn write(&self, job_id: &str, files: &[ArtifactFile]) -> StoreResult<Vec<ArtifactRow>> {
        let dir = self.job_dir(job_id)?;
        if self.remote.is_none() {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        files
            .iter()
            .map(|f| {
                let name = match f.kind {
                    "maps" => format!("{}.maps.json", f.index),
                    "jpeg" => format!("{}.jpg", f.index),
                    "webp" => format!("{}.webp", f.index),
                    _ => format!("{}.png", f.index),
                };
                match &self.remote {
                    Some(remote) => remote.put(&format!("jobs/{job_id}/{name}"), &f.bytes)?,
                    None => {
                        let path = dir.join(&name);
                        let tmp = dir.join(format!("{name}.tmp"));
                        std::fs::write(&tmp, &f.bytes).map_err(io(&tmp))?;
                        std::fs::rename(&tmp, &path).map_err(io(&path))?;
                    }
                }
                Ok(ArtifactRow {
                    job_id: job_id.to_string(),
                    index: f.index,
                    kind: f.kind.to_string(),
                    path: format!("jobs/{job_id}/{name}"),
                    sha256: sha256_hex(&f.bytes),
                    bytes: f.bytes.len() as u64,
                })
            })
            .collect()
    }

    /// The absolute path of a stored relative path, refusing anything that leaves the root.
    fn resolve(&self, rel: &str) -> StoreResult<PathBuf> {
        let p = Path::new(rel);
        if p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(StoreError::Corrupt(format!("artifact path '{rel}'")));
        }
        Ok(self.root.join(p))
    }

    /// Reads an artifact and checks its content hash (blocking I/O).
    pub fn read(&self, artifact: &ArtifactRow) -> StoreResult<Vec<u8>> {
        let path = self.resolve(&artifact.path)?;
        let gone = || {
            StoreError::NotFound(format!(
                "the file of {} image {} is gone (expired?)",
                artifact.job_id, artifact.index
            ))
        };
        let bytes = match &self.remote {
            Some(remote) => remote.get(&artifact.path)?.ok_or_else(gone)?,
            None => match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(gone()),
                Err(e) => return Err(io(&path)(e)),
            },
        };
        if sha256_hex(&bytes) != artifact.sha256 {
            return Err(StoreError::Corrupt(format!(
                "{} does not match its stored hash",
                artifact.path
            )));
        }
        Ok(bytes)
    }

    /// Removes the folder of `job_id` (missing is fine; blocking I/O).
    pub fn remove_job(&self, job_id: &str) -> StoreResult<()> {
        let dir = self.job_dir(job_id)?;
        if let Some(remote) = &self.remote {
            return remote.delete_under(&format!("jobs/{job_id}"));
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&dir)(e)),
        }
    }
}
