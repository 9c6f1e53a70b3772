//! Scenarios shared by the local (directory store + SQLite) and the Garage + PostgreSQL runs.
//! Each scenario gets an [`Env`] of its own (fresh database, fresh key prefix or directory).

#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures::{stream, Stream, StreamExt};
use infra_files::*;
use sha2::{Digest, Sha256};

pub const MIB: usize = 1024 * 1024;

/// Where a scenario runs.
pub struct Env {
    pub cfg: FilesConfig,
    pub paths: infra_config::Paths,
}

impl Env {
    pub async fn open(&self) -> Files {
        Files::open(&self.cfg, &self.paths).await.expect("open")
    }

    pub async fn open_with_max(&self, max: u64) -> Files {
        let mut cfg = self.cfg.clone();
        cfg.config.max_file_size = Some(max);
        Files::open(&cfg, &self.paths).await.expect("open")
    }
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

type BodyStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// `data` in chunks of `chunk` bytes.
pub fn body(data: &[u8], chunk: usize) -> BodyStream {
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(chunk.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    stream::iter(chunks).boxed()
}

/// `ok` bytes, then an error (a client that went away).
pub fn failing_body(ok: usize) -> BodyStream {
    let mut chunks: Vec<Result<Bytes, std::io::Error>> = noise(7, ok)
        .chunks(MIB)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    chunks.push(Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "client went away",
    )));
    stream::iter(chunks).boxed()
}

pub fn new_file(name: &str, purpose: Purpose) -> NewFile {
    NewFile {
        filename: name.into(),
        purpose,
        expires_after: None,
    }
}

pub async fn read_all(c: Content) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = c.body;
    while let Some(chunk) = b.next().await {
        out.extend_from_slice(&chunk.expect("content chunk"));
    }
    out
}

/// Keys under `files/` in the store.
pub async fn object_keys(files: &Files) -> Vec<String> {
    files
        .store()
        .list("files/")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect()
}

pub async fn all_ids(files: &Files) -> Vec<String> {
    files
        .list(&ListQuery::default())
        .await
        .unwrap()
        .data
        .into_iter()
        .map(|f| f.id)
        .collect()
}

pub async fn round_trip(env: &Env) {
    let files = env.open().await;
    let data = noise(1, 100_000);
    let f = files
        .create(new_file("data.jsonl", Purpose::FineTune), body(&data, 4096))
        .await
        .unwrap();
    assert!(f.id.starts_with("file-") && f.id.len() >= 29, "{}", f.id);
    assert_eq!(f.object, "file");
    assert_eq!(f.bytes, data.len() as u64);
    assert_eq!(f.status, "processed");
    assert_eq!(f.expires_at, None);
    assert_eq!(f.sha256.as_deref(), Some(sha(&data).as_str()));
    assert_eq!(files.get(&f.id).await.unwrap(), f);
    let list = files.list(&ListQuery::default()).await.unwrap();
    assert_eq!(list.object, "list");
    assert_eq!(list.data, vec![f.clone()]);
    assert_eq!(list.first_id.as_deref(), Some(f.id.as_str()));
    assert!(!list.has_more);
    // Whole content, a range, a suffix, an open range; an unsatisfiable one.
    let c = files.content(&f.id, None).await.unwrap();
    assert!(!c.partial);
    assert_eq!(c.range, 0..data.len() as u64);
    assert_eq!(read_all(c).await, data);
    let c = files
        .content(&f.id, Some(ByteRange::new(10, Some(19))))
        .await
        .unwrap();
    assert!(c.partial);
    assert_eq!(c.range, 10..20);
    assert_eq!(read_all(c).await, &data[10..20]);
    let c = files
        .content(&f.id, Some(ByteRange::Suffix(5)))
        .await
        .unwrap();
    assert_eq!(read_all(c).await, &data[data.len() - 5..]);
    let c = files
        .content(&f.id, Some(ByteRange::new(99_990, None)))
        .await
        .unwrap();
    assert_eq!(read_all(c).await, &data[99_990..]);
    let e = files
        .content(&f.id, Some(ByteRange::new(100_000, None)))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidRequest {
            param: Some("range".into())
        }
    );
    // Object key derives from the id.
    assert_eq!(object_keys(&files).await, vec![format!("files/{}", f.id)]);
    // Empty files work too.
    let empty = files
        .create(new_file("empty.txt", Purpose::UserData), body(&[], 1))
        .await
        .unwrap();
    assert_eq!(empty.bytes, 0);
    assert!(read_all(files.content(&empty.id, None).await.unwrap())
        .await
        .is_empty());
    // Hostile names and purposes are refused before anything is stored.
    for name in ["../x", "a/b", "", "a\nb", "..", "x\0"] {
        let e = files
            .create(new_file(name, Purpose::UserData), body(b"abc", 1))
            .await
            .unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidRequest {
                param: Some("file".into())
            },
            "{name:?}"
        );
    }
    // Delete; everything answers NotFound after.
    let d = files.delete(&f.id).await.unwrap();
    assert_eq!(
        serde_json::to_value(&d).unwrap(),
        serde_json::json!({"id": f.id, "object": "file", "deleted": true})
    );
    for e in [
        files.get(&f.id).await.unwrap_err(),
        files.delete(&f.id).await.unwrap_err(),
        files.content(&f.id, None).await.unwrap_err(),
        files.get("file-nope").await.unwrap_err(),
        files.get("../../etc/passwd").await.unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    }
    files.delete(&empty.id).await.unwrap();
    assert!(object_keys(&files).await.is_empty());
    assert!(all_ids(&files).await.is_empty());
}

pub async fn large_multipart(env: &Env) {
    let files = env.open().await;
    let data = noise(2, 40 * MIB + 123);
    let f = files
        .create(new_file("big.bin", Purpose::Batch), body(&data, 256 * 1024))
        .await
        .unwrap();
    assert_eq!(f.bytes, data.len() as u64);
    assert_eq!(f.sha256.as_deref(), Some(sha(&data).as_str()));
    // batch files expire after 30 days by default.
    assert_eq!(f.expires_at, Some(f.created_at + 2_592_000));
    let back = read_all(files.content(&f.id, None).await.unwrap()).await;
    assert_eq!(back.len(), data.len());
    assert_eq!(sha(&back), sha(&data));
    // A range across a part boundary (8 MiB).
    let c = files
        .content(
            &f.id,
            Some(ByteRange::new(
                8 * MIB as u64 - 10,
                Some(8 * MIB as u64 + 9),
            )),
        )
        .await
        .unwrap();
    assert_eq!(read_all(c).await, &data[8 * MIB - 10..8 * MIB + 10]);
    let info = files
        .store()
        .head(&format!("files/{}", f.id), None)
        .await
        .unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert!(
        info.etag.as_deref().unwrap_or("").contains('-'),
        "multipart etag expected: {:?}",
        info.etag
    );
}

pub async fn too_large_and_broken_bodies(env: &Env) {
    let files = env.open_with_max(10 * MIB as u64).await;
    // Over the limit in the multipart path (one 8 MiB part already uploaded).
    let e = files
        .create(
            new_file("big.bin", Purpose::UserData),
            body(&noise(3, 12 * MIB), MIB),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
    // Over the limit in the single-put path.
    let small = env.open_with_max(MIB as u64).await;
    let e = small
        .create(
            new_file("b.bin", Purpose::UserData),
            body(&noise(3, 2 * MIB), 64 * 1024),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
    // Exactly the limit is fine.
    let ok = small
        .create(
            new_file("b.bin", Purpose::UserData),
            body(&noise(3, MIB), 64 * 1024),
        )
        .await
        .unwrap();
    small.delete(&ok.id).await.unwrap();
    // A body that errors midway: after one part, and before any.
    for ok_bytes in [9 * MIB, 100] {
        let e = files
            .create(new_file("x.bin", Purpose::UserData), failing_body(ok_bytes))
            .await
            .unwrap_err();
        assert!(matches!(e, FilesError::BodyRead { .. }), "{e}");
    }
    assert!(object_keys(&files).await.is_empty());
    assert!(all_ids(&files).await.is_empty());
}

/// Pages through everything while another task inserts: every file that existed before is
/// seen exactly once, and nothing is seen twice.
pub async fn pagination_with_concurrent_inserts(env: &Env) {
    let files = env.open().await;
    let mut before = HashSet::new();
    for i in 0..40 {
        let f = files
            .create(
                new_file(&format!("f{i}.txt"), Purpose::Assistants),
                body(format!("{i}").as_bytes(), 1),
            )
            .await
            .unwrap();
        before.insert(f.id);
    }
    // Other purposes are filtered out.
    files
        .create(new_file("v.png", Purpose::Vision), body(b"png", 1))
        .await
        .unwrap();
    for order in [Order::Asc, Order::Desc] {
        let writer = {
            let files = files.clone();
            tokio::spawn(async move {
                for i in 0..30 {
                    files
                        .create(
                            new_file(&format!("new{i}.txt"), Purpose::Assistants),
                            body(b"new", 1),
                        )
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = files
                .list(&ListQuery {
                    after: after.clone(),
                    limit: Some(7),
                    order,
                    purpose: Some(Purpose::Assistants),
                })
                .await
                .unwrap();
            assert!(page.data.len() <= 7);
            assert!(page.data.iter().all(|f| f.purpose == Purpose::Assistants));
            // Sorted by (created_at, id) in the order asked.
            for w in page.data.windows(2) {
                let (a, b) = ((w[0].created_at, &w[0].id), (w[1].created_at, &w[1].id));
                match order {
                    Order::Asc => assert!(a < b),
                    Order::Desc => assert!(a > b),
                }
            }
            seen.extend(page.data.iter().map(|f| f.id.clone()));
            if !page.has_more {
                break;
            }
            after = page.last_id.clone();
            tokio::task::yield_now().await;
        }
        writer.await.unwrap();
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "{order:?}: a file was listed twice"
        );
        for id in &before {
            assert!(unique.contains(id), "{order:?}: {id} was lost");
        }
        before = files
            .list(&ListQuery {
                purpose: Some(Purpose::Assistants),
                ..Default::default()
            })
            .await
            .unwrap()
            .data
            .into_iter()
            .map(|f| f.id)
            .collect();
    }
    assert_eq!(before.len(), 100);
    // A cursor whose file was deleted still works; a foreign cursor and a bad limit do not.
    let page = files
        .list(&ListQuery {
            limit: Some(3),
            order: Order::Asc,
            ..Default::default()
        })
        .await
        .unwrap();
    let last = page.last_id.clone().unwrap();
    files.delete(&last).await.unwrap();
    let next = files
        .list(&ListQuery {
            after: Some(last.clone()),
            limit: Some(3),
            order: Order::Asc,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next.data.len(), 3);
    assert!(next.data.iter().all(|f| !page.data.contains(f)));
    for (after, limit, param) in [
        (Some("x".to_string()), None, "after"),
        (None, Some(0), "limit"),
        (None, Some(10_001), "limit"),
    ] {
        let e = files
            .list(&ListQuery {
                after,
                limit,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidRequest {
                param: Some(param.into())
            }
        );
    }
}

pub async fn expiry(env: &Env) {
    let files = env.open().await;
    let mut req = new_file("short.txt", Purpose::UserData);
    req.expires_after = Some(ExpiresAfter {
        anchor: "created_at".into(),
        seconds: 3600,
    });
    let f = files
        .create(req.clone(), body(b"soon gone", 3))
        .await
        .unwrap();
    assert_eq!(f.expires_at, Some(f.created_at + 3600));
    let keep = files
        .create(new_file("keep.txt", Purpose::UserData), body(b"stays", 3))
        .await
        .unwrap();
    for bad in [3599, 2_592_001] {
        let mut r = req.clone();
        r.expires_after = Some(ExpiresAfter {
            anchor: "created_at".into(),
            seconds: bad,
        });
        let e = files.create(r, body(b"x", 1)).await.unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::InvalidRequest { .. }));
    }
    files.advance_clock(3601);
    for e in [
        files.get(&f.id).await.unwrap_err(),
        files.content(&f.id, None).await.unwrap_err(),
        files.delete(&f.id).await.unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
    assert_eq!(all_ids(&files).await, vec![keep.id.clone()]);
    // Still in the bucket until the sweeper runs.
    assert_eq!(object_keys(&files).await.len(), 2);
    let r = files.sweep(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(r.expired_files, 1, "{r:?}");
    assert_eq!(
        object_keys(&files).await,
        vec![format!("files/{}", keep.id)]
    );
}

fn new_upload(bytes: usize) -> NewUpload {
    NewUpload {
        filename: "training.jsonl".into(),
        purpose: Purpose::FineTune,
        bytes: bytes as i64,
        mime_type: "text/jsonl".into(),
        expires_after: None,
    }
}

pub async fn uploads(env: &Env) {
    let files = env.open().await;
    let parts = [noise(10, 5 * MIB), noise(11, 5 * MIB + 7), noise(12, 1234)];
    let whole: Vec<u8> = parts.concat();
    let up = files.create_upload(new_upload(whole.len())).await.unwrap();
    assert!(
        up.id.starts_with("upload_") && up.id.len() >= 31,
        "{}",
        up.id
    );
    assert_eq!(up.status, UploadStatus::Pending);
    assert_eq!(up.expires_at, up.created_at + 3600);
    let mut ids = Vec::new();
    for p in &parts {
        let part = files.add_part(&up.id, body(p, 300_000)).await.unwrap();
        assert!(part.id.starts_with("part_"));
        assert_eq!(part.object, "upload.part");
        assert_eq!(part.upload_id, up.id);
        ids.push(part.id);
    }
    // Wrong orders and lists are refused, and the upload stays usable.
    let reversed: Vec<String> = ids.iter().rev().cloned().collect();
    for (list, param) in [
        (reversed, "part_ids"),
        (vec![ids[0].clone(), ids[0].clone()], "part_ids"),
        (vec!["part_unknown".to_string()], "part_ids"),
        (vec![], "part_ids"),
        (vec![ids[0].clone(), ids[1].clone()], "bytes"),
        (vec![ids[2].clone()], "bytes"),
    ] {
        let e = files
            .complete_upload(&up.id, &list, None)
            .await
            .unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidRequest {
                param: Some(param.into())
            },
            "{list:?}: {e}"
        );
    }
    let e = files
        .complete_upload(&up.id, &ids, Some("not-md5"))
        .await
        .unwrap_err();
    assert!(matches!(e, FilesError::BadMd5 { .. }));
    let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(&whole));
    let done = files
        .complete_upload(&up.id, &ids, Some(&md5))
        .await
        .unwrap();
    assert_eq!(done.status, UploadStatus::Completed);
    let file = done.file.clone().expect("nested file");
    assert_eq!(file.bytes, whole.len() as u64);
    assert_eq!(file.filename, "training.jsonl");
    assert_eq!(file.purpose, Purpose::FineTune);
    assert_eq!(file.sha256.as_deref(), Some(sha(&whole).as_str()));
    assert_eq!(files.get(&file.id).await.unwrap(), file);
    let back = read_all(files.content(&file.id, None).await.unwrap()).await;
    assert_eq!(sha(&back), sha(&whole));
    // A completed upload takes no more parts and cannot be completed again.
    let e = files.add_part(&up.id, body(b"x", 1)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    let e = files.complete_upload(&up.id, &ids, None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);

    // Wrong md5: refused, nothing kept, upload cancelled.
    let up2 = files.create_upload(new_upload(6 * MIB)).await.unwrap();
    let p = files
        .add_part(&up2.id, body(&noise(20, 6 * MIB), MIB))
        .await
        .unwrap();
    let e = files
        .complete_upload(&up2.id, &[p.id], Some(&"0".repeat(32)))
        .await
        .unwrap_err();
    assert!(matches!(e, FilesError::Md5Mismatch { .. }), "{e}");
    // Cancel; then it takes nothing.
    let up3 = files.create_upload(new_upload(100)).await.unwrap();
    files.add_part(&up3.id, body(b"abc", 1)).await.unwrap();
    let c = files.cancel_upload(&up3.id).await.unwrap();
    assert_eq!(c.status, UploadStatus::Cancelled);
    assert!(c.file.is_none());
    let e = files.add_part(&up3.id, body(b"x", 1)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(
        files.cancel_upload("upload_nope").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // Parts added in parallel get distinct part numbers: exactly one order of them (the order
    // they were numbered in) completes; the others are refused before anything happens.
    let same = noise(30, 5 * MIB);
    let tail = b"tail".to_vec();
    let mut whole = same.repeat(3);
    whole.extend_from_slice(&tail);
    let up5 = files.create_upload(new_upload(whole.len())).await.unwrap();
    let adds = (0..3).map(|_| {
        let files = files.clone();
        let id = up5.id.clone();
        let data = same.clone();
        tokio::spawn(async move { files.add_part(&id, body(&data, MIB)).await.unwrap().id })
    });
    let mut par = Vec::new();
    for a in adds {
        par.push(a.await.unwrap());
    }
    let last = files.add_part(&up5.id, body(&tail, 2)).await.unwrap().id;
    let mut completed = 0;
    for perm in [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ] {
        let mut list: Vec<String> = perm.iter().map(|&i| par[i].clone()).collect();
        list.push(last.clone());
        match files.complete_upload(&up5.id, &list, None).await {
            Ok(done) => {
                completed += 1;
                let f = done.file.unwrap();
                assert_eq!(f.sha256.as_deref(), Some(sha(&whole).as_str()));
                files.delete(&f.id).await.unwrap();
            }
            Err(FilesError::PartOrder { .. }) => {}
            Err(FilesError::UploadState { .. }) => {}
            Err(e) => panic!("{perm:?}: {e}"),
        }
    }
    assert_eq!(completed, 1);
    // A part over the declared size is refused.
    let up4 = files.create_upload(new_upload(10)).await.unwrap();
    let e = files
        .add_part(&up4.id, body(&noise(1, 11), 4))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge);
    // Bad declarations.
    for (req, param) in [
        (new_upload(0), "bytes"),
        (
            NewUpload {
                filename: "a/b".into(),
                ..new_upload(1)
            },
            "filename",
        ),
        (
            NewUpload {
                mime_type: "text/plain\r\nX: y".into(),
                ..new_upload(1)
            },
            "mime_type",
        ),
    ] {
        let e = files.create_upload(req).await.unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidRequest {
                param: Some(param.into())
            }
        );
    }
    let e = files
        .create_upload(new_upload(9 * 1024 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge);
    // Only the completed file is in the bucket.
    assert_eq!(
        object_keys(&files).await,
        vec![format!("files/{}", file.id)]
    );
    assert_eq!(all_ids(&files).await, vec![file.id.clone()]);
}

pub async fn sweeper(env: &Env) {
    let files = env.open().await;
    let store = files.store();
    let kept = files
        .create(new_file("kept.txt", Purpose::UserData), body(b"kept", 2))
        .await
        .unwrap();
    let vanished = files
        .create(new_file("gone.txt", Purpose::UserData), body(b"gone", 2))
        .await
        .unwrap();
    store
        .delete(&format!("files/{}", vanished.id))
        .await
        .unwrap();
    // An orphan object (a create that crashed between the object and the row) and a key that
    // is not ours.
    let orphan = format!("files/file-00000000a{}", "B".repeat(24));
    store
        .put(
            &orphan,
            infra_store::Body::Bytes(Bytes::from_static(b"orphan")),
            &Default::default(),
        )
        .await
        .unwrap();
    store
        .put(
            "files/not-a-file-id",
            infra_store::Body::Bytes(Bytes::from_static(b"foreign")),
            &Default::default(),
        )
        .await
        .unwrap();
    let stale = files.create_upload(new_upload(10 * MIB)).await.unwrap();
    files
        .add_part(&stale.id, body(&noise(5, 5 * MIB), MIB))
        .await
        .unwrap();
    // Within the grace period the orphan stays; the row whose object vanished goes.
    let r = files.sweep(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(r.orphan_objects, 0, "{r:?}");
    assert_eq!(r.orphan_rows, 1, "{r:?}");
    assert_eq!(r.foreign_keys, 1, "{r:?}");
    assert_eq!(r.expired_uploads, 0, "{r:?}");
    assert!(object_keys(&files).await.contains(&orphan));
    assert_eq!(
        files.get(&vanished.id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // Past the grace period (and the upload's hour).
    files.advance_clock(2 * 3600);
    let r = files.sweep(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(r.orphan_objects, 1, "{r:?}");
    assert_eq!(r.expired_uploads, 1, "{r:?}");
    assert_eq!(r.foreign_keys, 1, "{r:?}");
    let keys = object_keys(&files).await;
    assert_eq!(
        keys,
        vec![
            format!("files/{}", kept.id),
            "files/not-a-file-id".to_string()
        ]
    );
    assert_eq!(
        files
            .add_part(&stale.id, body(b"x", 1))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(files.get(&kept.id).await.unwrap(), kept);
}

/// Two instances on one store and one database see each other's files.
pub async fn two_instances(env: &Env) {
    let a = env.open().await;
    let b = env.open().await;
    let f = a
        .create(new_file("shared.txt", Purpose::Evals), body(b"shared", 2))
        .await
        .unwrap();
    assert_eq!(b.get(&f.id).await.unwrap(), f);
    assert_eq!(all_ids(&b).await, vec![f.id.clone()]);
    assert_eq!(
        read_all(b.content(&f.id, None).await.unwrap()).await,
        b"shared"
    );
    let up = b.create_upload(new_upload(3)).await.unwrap();
    let p = a.add_part(&up.id, body(b"abc", 1)).await.unwrap();
    let done = a.complete_upload(&up.id, &[p.id], None).await.unwrap();
    let g = done.file.unwrap();
    assert_eq!(b.get(&g.id).await.unwrap(), g);
    b.delete(&f.id).await.unwrap();
    assert_eq!(a.get(&f.id).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(all_ids(&a).await, vec![g.id]);
}
