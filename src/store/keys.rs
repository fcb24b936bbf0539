//! API keys: a key is `afa_` + 64 hex digits (32 random bytes), shown once at creation; the
//! store keeps only its SHA-256. Revoked keys stay (jobs reference them) but stop working.
use sqlx::Row;

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

fn key_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<ApiKeyRow> {
    Ok(ApiKeyRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        max_queued_images: row
            .try_get::<Option<i64>, _>("max_queued_images")?
            .map(|n| n.max(0) as u64),
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
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
        sqlx::query(
            "INSERT INTO api_keys (id, name, key_hash, max_queued_images, created_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(name)
        .bind(hash_token(&token))
        .bind(max_queued_images.map(|n| n as i64))
        .bind(created_at)
        .execute(self.pool())
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
        let rows = sqlx::query(
            "SELECT id, name, max_queued_images, created_at, revoked_at FROM api_keys \
             ORDER BY created_at, id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    /// Revokes key `id`; false when there is no such key or it was already revoked.
    pub async fn revoke_key(&self, id: &str) -> StoreResult<bool> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(self.pool())
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Whether any key was ever created (then every non-probe route needs one).
    pub async fn has_keys(&self) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(self.pool())
            .await?;
        Ok(n > 0)
    }

    /// The live (not revoked) key whose token is `token`.
    pub async fn key_for_token(&self, token: &str) -> StoreResult<Option<ApiKeyRow>> {
        let row = sqlx::query(
            "SELECT id, name, max_queued_images, created_at, revoked_at FROM api_keys \
             WHERE key_hash = ? AND revoked_at IS NULL",
        )
        .bind(hash_token(token))
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }
}
