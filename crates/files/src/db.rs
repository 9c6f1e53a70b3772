//! The metadata database: one set of queries for SQLite and PostgreSQL through `sqlx::Any`.
//!
//! Why `Any` rather than a generic layer over `Sqlite`/`Postgres`: the queries are few and
//! plain (TEXT/BIGINT columns, `$n` placeholders, which SQLite also understands, `RETURNING`
//! and `ON CONFLICT DO NOTHING`, which both have), so one runtime-dispatched pool keeps a single
//! code path and a single set of tests, and avoids monomorphizing every query twice. What `Any`
//! cannot express (SQLite's WAL and busy timeout, PostgreSQL's advisory lock around migrations)
//! is a few backend-specific statements chosen by `Backend`.

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Connection, Executor, Row};

use crate::config::MetadataStore;
use crate::error::{FilesError, Result};
use crate::model::{FileObject, Order, Purpose, UploadObject, UploadStatus};

/// Embedded migrations: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "files, uploads, upload_parts",
    include_str!("../migrations/0001_files.sql"),
)];

/// PostgreSQL advisory lock key held while migrating ("infiles" in ASCII).
const MIGRATION_LOCK: i64 = 0x0069_6e66_696c_6573;

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// The pool and its backend.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// A row of `files`.
#[derive(Debug, Clone)]
pub(crate) struct FileRow {
    pub id: String,
    pub filename: String,
    pub purpose: Purpose,
    pub bytes: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub sha256: Option<String>,
    pub object_key: String,
}

impl FileRow {
    fn from_row(r: &AnyRow) -> Result<Self> {
        let purpose: String = get(r, "purpose")?;
        Ok(Self {
            id: get(r, "id")?,
            filename: get(r, "filename")?,
            purpose: purpose.parse().map_err(|_| FilesError::BadRow {
                column: "files.purpose",
                value: purpose,
            })?,
            bytes: get(r, "bytes")?,
            created_at: get(r, "created_at")?,
            expires_at: get(r, "expires_at")?,
            sha256: get(r, "sha256")?,
            object_key: get(r, "object_key")?,
        })
    }

    pub fn to_object(&self) -> FileObject {
        FileObject {
            id: self.id.clone(),
            object: "file".into(),
            bytes: self.bytes.max(0) as u64,
            created_at: self.created_at,
            expires_at: self.expires_at,
            filename: self.filename.clone(),
            purpose: self.purpose,
            status: "processed".into(),
            status_details: None,
            sha256: self.sha256.clone(),
        }
    }

    /// Expired at `now` (not listed, not served).
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

/// A row of `uploads`.
#[derive(Debug, Clone)]
pub(crate) struct UploadRow {
    pub id: String,
    pub filename: String,
    pub purpose: Purpose,
    pub bytes: i64,
    pub mime_type: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub file_expires_after: Option<i64>,
    /// `pending`, `completing`, `completed`, `cancelled`, `expired`.
    pub status: String,
    pub file_id: String,
    pub object_key: String,
    pub multipart_id: String,
}

impl UploadRow {
    fn from_row(r: &AnyRow) -> Result<Self> {
        let purpose: String = get(r, "purpose")?;
        Ok(Self {
            id: get(r, "id")?,
            filename: get(r, "filename")?,
            purpose: purpose.parse().map_err(|_| FilesError::BadRow {
                column: "uploads.purpose",
                value: purpose,
            })?,
            bytes: get(r, "bytes")?,
            mime_type: get(r, "mime_type")?,
            created_at: get(r, "created_at")?,
            expires_at: get(r, "expires_at")?,
            file_expires_after: get(r, "file_expires_after")?,
            status: get(r, "status")?,
            file_id: get(r, "file_id")?,
            object_key: get(r, "object_key")?,
            multipart_id: get(r, "multipart_id")?,
        })
    }

    /// The status as the API shows it at `now` (`completing` shows as pending; a pending
    /// upload past its hour as expired).
    pub fn status_at(&self, now: i64) -> Result<UploadStatus> {
        Ok(match self.status.as_str() {
            "pending" | "completing" if self.expires_at <= now => UploadStatus::Expired,
            "pending" | "completing" => UploadStatus::Pending,
            "completed" => UploadStatus::Completed,
            "cancelled" => UploadStatus::Cancelled,
            "expired" => UploadStatus::Expired,
            other => {
                return Err(FilesError::BadRow {
                    column: "uploads.status",
                    value: other.into(),
                })
            }
        })
    }

    pub fn to_object(&self, now: i64, file: Option<FileObject>) -> Result<UploadObject> {
        Ok(UploadObject {
            id: self.id.clone(),
            object: "upload".into(),
            bytes: self.bytes.max(0) as u64,
            created_at: self.created_at,
            expires_at: self.expires_at,
            filename: self.filename.clone(),
            purpose: self.purpose,
            status: self.status_at(now)?,
            file,
        })
    }
}

/// A row of `upload_parts`.
#[derive(Debug, Clone)]
pub(crate) struct PartRow {
    pub id: String,
    pub number: i64,
    pub etag: String,
    pub bytes: i64,
}

fn get<'r, T>(r: &'r AnyRow, col: &'static str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    r.try_get(col).map_err(|e| FilesError::db("decode row", e))
}

const FILE_COLS: &str = "id, filename, purpose, bytes, created_at, expires_at, sha256, object_key";
const UPLOAD_COLS: &str = "id, filename, purpose, bytes, mime_type, created_at, expires_at, \
     file_expires_after, status, file_id, object_key, multipart_id";

impl Db {
    /// Connects and migrates.
    pub async fn open(store: &MetadataStore) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (url, backend) = match store {
            MetadataStore::Sqlite { db_path } => {
                if let Some(dir) = db_path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| FilesError::io(dir, e))?;
                }
                (
                    format!("sqlite://{}?mode=rwc", db_path.display()),
                    Backend::Sqlite,
                )
            }
            MetadataStore::Postgres { dsn } => (dsn.0.clone(), Backend::Postgres),
        };
        let sqlite = backend == Backend::Sqlite;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    // In WAL mode NORMAL syncs at checkpoints, not at every commit: a crash of
                    // the process loses nothing, a power loss can lose the last commits. Here
                    // that is a row whose object exists (written first), i.e. an orphan the
                    // sweeper removes; never a row without its object.
                    if sqlite {
                        sqlx::Executor::execute(&mut *conn, "PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| FilesError::db("connect", e))?;
        if backend == Backend::Sqlite {
            // WAL is a property of the database file (readers do not block the writer), set
            // once; the busy timeout (wait for the writer's lock instead of failing with
            // SQLITE_BUSY) is sqlx's per-connection default of 5 s.
            sqlx::raw_sql("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(|e| FilesError::db("enable WAL", e))?;
        }
        let db = Self { pool, backend };
        db.migrate().await?;
        Ok(db)
    }

    /// Applies the embedded migrations not applied yet (PostgreSQL: under an advisory lock, so
    /// concurrent starts do not race; SQLite: each in a transaction, statements idempotent).
    async fn migrate(&self) -> Result<()> {
        let err = |e| FilesError::db("migrate", e);
        let mut conn = self.pool.acquire().await.map_err(err)?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await
                .map_err(err)?;
        }
        let r = async {
            conn.execute(
                "CREATE TABLE IF NOT EXISTS infra_files_migrations (version BIGINT PRIMARY KEY, \
                 description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
            )
            .await
            .map_err(err)?;
            for (version, description, sql) in MIGRATIONS {
                let mut tx = conn.begin().await.map_err(err)?;
                let done: Option<i64> = sqlx::query_scalar(
                    "SELECT version FROM infra_files_migrations WHERE version = $1",
                )
                .bind(*version)
                .fetch_optional(&mut *tx)
                .await
                .map_err(err)?;
                if done.is_some() {
                    continue;
                }
                for stmt in statements(sql) {
                    tx.execute(stmt.as_str()).await.map_err(err)?;
                }
                sqlx::query(
                    "INSERT INTO infra_files_migrations (version, description, applied_at) \
                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(*version)
                .bind(*description)
                .bind(crate::now())
                .execute(&mut *tx)
                .await
                .map_err(err)?;
                tx.commit().await.map_err(err)?;
                tracing::info!(version, description, "files metadata migrated");
            }
            Ok::<(), FilesError>(())
        }
        .await;
        if self.backend == Backend::Postgres {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await;
        }
        r
    }

    // ---- files ----

    pub async fn insert_file(&self, f: &FileRow) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO files ({FILE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&f.id)
        .bind(&f.filename)
        .bind(f.purpose.as_str())
        .bind(f.bytes)
        .bind(f.created_at)
        .bind(f.expires_at)
        .bind(f.sha256.as_deref())
        .bind(&f.object_key)
        .execute(&self.pool)
        .await
        .map_err(|e| FilesError::db("insert file", e))?;
        Ok(())
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRow>> {
        let r = sqlx::query(&format!("SELECT {FILE_COLS} FROM files WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| FilesError::db("read file", e))?;
        r.as_ref().map(FileRow::from_row).transpose()
    }

    /// Deletes a row; true when there was one.
    pub async fn delete_file(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| FilesError::db("delete file", e))?;
        Ok(r.rows_affected() > 0)
    }

    /// One page (`limit + 1` rows to know whether more follow) after the keyset position
    /// `cursor`, unexpired at `now`.
    pub async fn list_files(
        &self,
        cursor: Option<(i64, &str)>,
        order: Order,
        purpose: Option<Purpose>,
        now: i64,
        limit: i64,
    ) -> Result<Vec<FileRow>> {
        let (cmp, dir) = match order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        let mut sql =
            format!("SELECT {FILE_COLS} FROM files WHERE (expires_at IS NULL OR expires_at > $1)");
        let mut n = 1;
        if purpose.is_some() {
            n += 1;
            sql.push_str(&format!(" AND purpose = ${n}"));
        }
        if cursor.is_some() {
            sql.push_str(&format!(
                " AND (created_at {cmp} ${a} OR (created_at = ${a} AND id {cmp} ${b}))",
                a = n + 1,
                b = n + 2
            ));
            n += 2;
        }
        sql.push_str(&format!(
            " ORDER BY created_at {dir}, id {dir} LIMIT ${}",
            n + 1
        ));
        let mut q = sqlx::query(&sql).bind(now);
        if let Some(p) = purpose {
            q = q.bind(p.as_str());
        }
        if let Some((c, id)) = cursor {
            q = q.bind(c).bind(id);
        }
        let rows = q
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| FilesError::db("list files", e))?;
        rows.iter().map(FileRow::from_row).collect()
    }

    /// Up to `limit` files expired at `now`.
    pub async fn expired_files(&self, now: i64, limit: i64) -> Result<Vec<FileRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {FILE_COLS} FROM files WHERE expires_at IS NOT NULL AND expires_at <= $1 \
             ORDER BY expires_at LIMIT $2"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| FilesError::db("list expired files", e))?;
        rows.iter().map(FileRow::from_row).collect()
    }

    /// Ids and keys of all files.
    pub async fn all_file_keys(&self) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query("SELECT id, object_key, created_at FROM files")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| FilesError::db("list file keys", e))?;
        rows.iter()
            .map(|r| Ok((get(r, "id")?, get(r, "object_key")?, get(r, "created_at")?)))
            .collect()
    }

    /// Object keys of uploads still being written (pending or completing): not orphans.
    pub async fn live_upload_keys(&self) -> Result<Vec<String>> {
        let rows =
            sqlx::query("SELECT object_key FROM uploads WHERE status IN ('pending', 'completing')")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| FilesError::db("list upload keys", e))?;
        rows.iter().map(|r| get(r, "object_key")).collect()
    }

    // ---- uploads ----

    pub async fn insert_upload(&self, u: &UploadRow) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO uploads ({UPLOAD_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&u.id)
        .bind(&u.filename)
        .bind(u.purpose.as_str())
        .bind(u.bytes)
        .bind(&u.mime_type)
        .bind(u.created_at)
        .bind(u.expires_at)
        .bind(u.file_expires_after)
        .bind(&u.status)
        .bind(&u.file_id)
        .bind(&u.object_key)
        .bind(&u.multipart_id)
        .execute(&self.pool)
        .await
        .map_err(|e| FilesError::db("insert upload", e))?;
        Ok(())
    }

    pub async fn get_upload(&self, id: &str) -> Result<Option<UploadRow>> {
        let r = sqlx::query(&format!("SELECT {UPLOAD_COLS} FROM uploads WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| FilesError::db("read upload", e))?;
        r.as_ref().map(UploadRow::from_row).transpose()
    }

    /// Allocates the next S3 part number of a pending, unexpired upload (atomic, so parallel
    /// `add_part`s get distinct numbers); `None` when the upload is not pending.
    pub async fn next_part_number(&self, id: &str, now: i64) -> Result<Option<i64>> {
        sqlx::query_scalar(
            "UPDATE uploads SET next_part = next_part + 1 \
             WHERE id = $1 AND status = 'pending' AND expires_at > $2 RETURNING next_part",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| FilesError::db("allocate part number", e))
    }

    /// Records a part, only while its upload is pending; false otherwise.
    pub async fn insert_part(&self, upload_id: &str, p: &PartRow, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO upload_parts (id, upload_id, number, etag, bytes, created_at) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS \
             (SELECT 1 FROM uploads WHERE id = $2 AND status = 'pending')",
        )
        .bind(&p.id)
        .bind(upload_id)
        .bind(p.number)
        .bind(&p.etag)
        .bind(p.bytes)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| FilesError::db("insert part", e))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn parts_of(&self, upload_id: &str) -> Result<Vec<PartRow>> {
        let rows = sqlx::query(
            "SELECT id, number, etag, bytes FROM upload_parts WHERE upload_id = $1 ORDER BY number",
        )
        .bind(upload_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| FilesError::db("list parts", e))?;
        rows.iter()
            .map(|r| {
                Ok(PartRow {
                    id: get(r, "id")?,
                    number: get(r, "number")?,
                    etag: get(r, "etag")?,
                    bytes: get(r, "bytes")?,
                })
            })
            .collect()
    }

    /// Moves an upload from `from` to `to`; false when it was not in `from`.
    pub async fn set_upload_status(&self, id: &str, from: &[&str], to: &str) -> Result<bool> {
        // `from` has at most three fixed words of ours; they are bound, not formatted.
        let mut sql = String::from("UPDATE uploads SET status = $1 WHERE id = $2 AND status IN (");
        for i in 0..from.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", i + 3));
        }
        sql.push(')');
        let mut q = sqlx::query(&sql).bind(to).bind(id);
        for f in from {
            q = q.bind(*f);
        }
        let r = q
            .execute(&self.pool)
            .await
            .map_err(|e| FilesError::db("update upload", e))?;
        Ok(r.rows_affected() > 0)
    }

    /// Inserts the file and marks the upload completed, in one transaction.
    pub async fn complete_upload(&self, upload_id: &str, f: &FileRow) -> Result<()> {
        let err = |e| FilesError::db("complete upload", e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        sqlx::query(&format!(
            "INSERT INTO files ({FILE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&f.id)
        .bind(&f.filename)
        .bind(f.purpose.as_str())
        .bind(f.bytes)
        .bind(f.created_at)
        .bind(f.expires_at)
        .bind(f.sha256.as_deref())
        .bind(&f.object_key)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        sqlx::query("UPDATE uploads SET status = 'completed' WHERE id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query("DELETE FROM upload_parts WHERE upload_id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)
    }

    pub async fn delete_parts(&self, upload_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM upload_parts WHERE upload_id = $1")
            .bind(upload_id)
            .execute(&self.pool)
            .await
            .map_err(|e| FilesError::db("delete parts", e))?;
        Ok(())
    }

    /// Pending (or stuck completing) uploads whose hour is over at `now`.
    pub async fn stale_uploads(&self, now: i64) -> Result<Vec<UploadRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {UPLOAD_COLS} FROM uploads \
             WHERE status IN ('pending', 'completing') AND expires_at <= $1"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| FilesError::db("list stale uploads", e))?;
        rows.iter().map(UploadRow::from_row).collect()
    }
}

/// The statements of a migration file (split at `;` ending a line; `--` comments dropped).
fn statements(sql: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(";\n")
        .map(|s| s.trim().trim_end_matches(';').trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn migration_statements() {
        let s = super::statements(super::MIGRATIONS[0].2);
        assert_eq!(s.len(), 8, "{s:#?}");
        assert!(s.iter().all(|x| !x.contains(';')));
    }
}
