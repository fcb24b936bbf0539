//! API keys: a key is `afa_` + 64 hex digits (32 random bytes), shown once at creation; the
//! store keeps only its SHA-256. Revoked keys stay (jobs reference them) but stop working.
use super::db::{Cols, FromRow, Int, args};
use super::{JobStore, StoreResult, now_ms, random_hex, sha256_hex};

/// A stored key (never the token).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRow {
    pub id: String,
    pub name: String,
    pub max_queued_images: Option<u64>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// A new key: its row and the token, which exists only here.
pub struct CreatedKey {
    pub row: ApiKeyRow,
    pub token: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CreatedKey({:?}, token redacted)", self.row)
    }
}

/// The stored form of a bearer token.
pub fn hash_token(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

impl FromRow for ApiKeyRow {
    fn from_row(row: &dyn Cols) -> StoreResult<Self> {
        Ok(ApiKeyRow {
            id: row.text("id")?,
            name: row.text("name")?,
            max_queued_images: row.opt_int("max_queued_images")?.map(|n| n.max(0) as u64),
            created_at: row.int("created_at")?,
            revoked_at: row.opt_int("revoked_at")?,
        })
    }
}

impl JobStore {
    /// Creates a key named `name`; the token is returned once and stored only as a hash.
    pub async fn create_key(
        &self,
        name: &str,
        max_queued_images: Option<u64>,
    ) -> StoreResult<CreatedKey> {
        let id = format!("key_{}", random_hex(6)?);
        let token = format!("afa_{}", random_hex(32)?);
        let created_at = now_ms();
        self.db()
            .execute(
                "INSERT INTO api_keys (id, name, key_hash, max_queued_images, created_at) \
                 VALUES (?, ?, ?, ?, ?)",
                args![
                    &id,
                    name,
                    hash_token(&token),
                    max_queued_images.map(|n| n.min(i64::MAX as u64) as i64),
                    created_at,
                ],
            )
            .await?;
        let row = ApiKeyRow {
            id,
            name: name.to_string(),
            max_queued_images,
            created_at,
            revoked_at: None,
        };
        Ok(CreatedKey { row, token })
    }

    /// Every key, oldest first.
    pub async fn list_keys(&self) -> StoreResult<Vec<ApiKeyRow>> {
        self.db()
            .fetch_all(
                "SELECT id, name, max_queued_images, created_at, revoked_at FROM api_keys \
                 ORDER BY created_at, id",
                vec![],
            )
            .await
    }

    /// Revokes key `id`; false when there is no such key or it was already revoked.
    pub async fn revoke_key(&self, id: &str) -> StoreResult<bool> {
        let n = self
            .db()
            .execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                args![now_ms(), id],
            )
            .await?;
        Ok(n == 1)
    }

    /// Whether any key was ever created (then every non-probe route needs one).
    pub async fn has_keys(&self) -> StoreResult<bool> {
        let Int(n) = self
            .db()
            .fetch_one("SELECT COUNT(*) AS v FROM api_keys", vec![])
            .await?;
        Ok(n > 0)
    }

    /// The live (not revoked) key whose token is `token`.
    pub async fn key_for_token(&self, token: &str) -> StoreResult<Option<ApiKeyRow>> {
        self.db()
            .fetch_optional(
                "SELECT id, name, max_queued_images, created_at, revoked_at FROM api_keys \
                 WHERE key_hash = ? AND revoked_at IS NULL",
                args![hash_token(token)],
            )
            .await
    }
}
