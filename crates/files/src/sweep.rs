//! The sweeper: expired files, stale uploads, orphans both ways.

use std::collections::HashSet;
use std::time::Duration;

use crate::error::{FilesError, Result};
use crate::model::SweepReport;
use crate::{ids, Files};

impl Files {
    /// Removes expired files (row, then object), expires uploads pending past their hour
    /// (aborting their multipart uploads), deletes objects under `files/` without a row that
    /// are older than `grace`, and removes rows whose object is gone. Safe to run from several
    /// instances at once.
    #[tracing::instrument(skip_all)]
    pub async fn sweep(&self, grace: Duration) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        let db = &self.inner.db;
        let store = &self.inner.store;
        let now = self.now();

        // Expired files.
        loop {
            let batch = db.expired_files(now, 500).await?;
            if batch.is_empty() {
                break;
            }
            for f in &batch {
                if db.delete_file(&f.id).await? {
                    report.expired_files += 1;
                }
                self.delete_object_quietly(&f.object_key).await;
            }
            if batch.len() < 500 {
                break;
            }
        }

        // Stale uploads.
        for up in db.stale_uploads(now).await? {
            if db
                .set_upload_status(&up.id, &["pending", "completing"], "expired")
                .await?
            {
                if let Err(e) = store
                    .abort_multipart(&up.object_key, &up.multipart_id)
                    .await
                {
                    tracing::debug!(upload = up.id, error = %e, "abort of an expired upload failed (already gone?)");
                }
                db.delete_parts(&up.id).await?;
                report.expired_uploads += 1;
            }
        }

        // Orphans. Rows are read before the bucket is listed: a row exists only once its
        // object was written, so a row missing from the listing lost its object (confirmed
        // with a HEAD, as a delete may be under way).
        let rows = db.all_file_keys().await?;
        let live_uploads: HashSet<String> = db.live_upload_keys().await?.into_iter().collect();
        let objects = store
            .list("files/")
            .await
            .map_err(|e| FilesError::store("ListObjectsV2", e))?;
        let row_keys: HashSet<&str> = rows.iter().map(|(_, k, _)| k.as_str()).collect();
        let listed: HashSet<&str> = objects.iter().map(|o| o.key.as_str()).collect();
        let cutoff = now - grace.as_secs() as i64;
        for o in &objects {
            let ours = infra_store::check_key(&o.key).is_ok()
                && o.key.strip_prefix("files/").is_some_and(ids::is_file_id);
            if !ours {
                report.foreign_keys += 1;
                continue;
            }
            if row_keys.contains(o.key.as_str()) || live_uploads.contains(&o.key) {
                continue;
            }
            let modified = o.last_modified.map(|t| t.timestamp()).unwrap_or(now);
            if modified > cutoff {
                continue;
            }
            // Re-check: the row may have been inserted since the snapshot.
            let id = &o.key["files/".len()..];
            if db.get_file(id).await?.is_some() {
                continue;
            }
            self.delete_object_quietly(&o.key).await;
            report.orphan_objects += 1;
        }
        for (id, key, _) in &rows {
            if listed.contains(key.as_str()) {
                continue;
            }
            match store.head(key, None).await {
                Err(infra_store::Error::NoSuchKey { .. }) => {
                    if db.delete_file(id).await? {
                        report.orphan_rows += 1;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(FilesError::store("HeadObject", e)),
            }
        }
        tracing::info!(?report, "files sweep done");
        Ok(report)
    }

    async fn delete_object_quietly(&self, key: &str) {
        if let Err(e) = self.inner.store.delete(key).await {
            tracing::warn!(key, error = %e, "deleting an object failed; the next sweep retries");
        }
    }
}
