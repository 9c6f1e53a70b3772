//! Several API hosts on one bucket (Garage) and one PostgreSQL, each running its sweeper every
//! second: what one server writes, the other serves; concurrent uploads through both are all
//! listed, exactly once; an upload begun on one completes on the other; a delete on one is a
//! 404 on the other. Then the sweeper, in the server: expired files, rows without objects and
//! objects without rows go, a foreign key stays.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{create, md5_of, Client, TestServer};
use infra_files::testing::Postgres;
use infra_store::testing::{Garage, GARAGE_REGION};
use infra_store::{Body, Metadata, ObjectStore};
use reqwest::multipart::{Form, Part};
use reqwest::Method;
use serde_json::{json, Value};

const PREFIX: &str = "hosts/";

fn config(garage: &Garage, dsn: &str, grace: u64) -> String {
    format!(
        r#"
server: {{sweep_interval: 1, sweep_grace: {grace}}}
files:
  provider_type: remote::s3
  config:
    bucket_name: shared
    region: {GARAGE_REGION}
    endpoint_url: {endpoint}
    aws_access_key_id: {key}
    aws_secret_access_key: {secret}
    key_prefix: {PREFIX}
    metadata_store: {{type: postgres, dsn: "{dsn}"}}
"#,
        endpoint = garage.endpoint(),
        key = garage.key_id,
        secret = garage.secret,
    )
}

/// Every id the server lists, paging `limit` at a time (asserting no id comes twice).
async fn list_all(c: &Client, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/files?limit={limit}&order=asc&after={a}"),
            None => format!("/v1/files?limit={limit}&order=asc"),
        };
        let page = c.get(&q).await;
        assert_eq!(page.status, 200, "{}", String::from_utf8_lossy(&page.body));
        let page = page.json();
        for f in page["data"].as_array().unwrap() {
            let id = f["id"].as_str().unwrap().to_string();
            assert!(!ids.contains(&id), "{id} listed twice");
            ids.push(id);
        }
        if !page["has_more"].as_bool().unwrap() {
            return ids;
        }
        after = Some(page["last_id"].as_str().unwrap().to_string());
    }
}

/// Waits (up to 30 s) until `probe` returns true.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !probe().await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not done within 30 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_one_bucket_and_one_postgres() {
    let garage = Garage::start().await;
    garage.create_bucket("shared").await;
    let pg = Postgres::start();
    let dsn = pg.create_database("hosts");
    // Both sweep every second (grace 5 s) while everything below happens: nothing in flight
    // may be taken for an orphan.
    let a = TestServer::start(&config(&garage, &dsn, 5)).await;
    let b = TestServer::start(&config(&garage, &dsn, 5)).await;
    let (ca, cb) = (&a.client, &b.client);

    // Written through A, served by B.
    let f = create(ca, "from-a.txt", b"written through A", "assistants").await;
    let id = f["id"].as_str().unwrap().to_string();
    let seen = cb.get(&format!("/v1/files/{id}")).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.json(), f, "both servers describe the file alike");
    let body = cb.get(&format!("/v1/files/{id}/content")).await;
    assert_eq!(body.body, b"written through A");

    // 2 × 24 concurrent uploads, half through each server; then each server lists all 49,
    // in pages of 7, each exactly once, with the right bytes behind each id.
    let mut tasks = Vec::new();
    for i in 0..48usize {
        let c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        tasks.push(tokio::spawn(async move {
            let data = format!("file {i} ").repeat(i + 1).into_bytes();
            let f = create(&c, &format!("f{i}.txt"), &data, "batch").await;
            (f["id"].as_str().unwrap().to_string(), data)
        }));
    }
    let mut written = vec![(id.clone(), b"written through A".to_vec())];
    for t in tasks {
        written.push(t.await.unwrap());
    }
    let want: BTreeSet<String> = written.iter().map(|(id, _)| id.clone()).collect();
    for c in [ca, cb] {
        let got = list_all(c, 7).await;
        assert_eq!(got.len(), 49);
        assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want);
    }
    for (i, (fid, data)) in written.iter().enumerate() {
        let c = if i % 2 == 0 { cb } else { ca };
        let got = c.get(&format!("/v1/files/{fid}/content")).await;
        assert_eq!(got.status, 200);
        assert!(&got.body == data, "content of {fid}");
    }

    // An upload created on A, parts through A and B, completed on B.
    let part_a = vec![b'a'; 5 << 20];
    let part_b = b"and the tail".to_vec();
    let up = ca
        .post_json(
            "/v1/uploads",
            &json!({"filename": "split.bin", "purpose": "assistants",
                    "bytes": part_a.len() + part_b.len(), "mime_type": "application/octet-stream"}),
        )
        .await;
    assert_eq!(up.status, 200, "{}", String::from_utf8_lossy(&up.body));
    let uid = up.json()["id"].as_str().unwrap().to_string();
    let mut part_ids = Vec::new();
    for (c, data) in [(ca, part_a.clone()), (cb, part_b.clone())] {
        let r = c
            .send(
                c.req(Method::POST, &format!("/v1/uploads/{uid}/parts"))
                    .multipart(Form::new().part("data", Part::bytes(data).file_name("blob"))),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        part_ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let whole = [part_a, part_b].concat();
    let done = cb
        .post_json(
            &format!("/v1/uploads/{uid}/complete"),
            &json!({"part_ids": part_ids, "md5": md5_of(&whole)}),
        )
        .await;
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    let big = done.json()["file"]["id"].as_str().unwrap().to_string();
    let got = ca.get(&format!("/v1/files/{big}/content")).await;
    assert!(got.body == whole, "the upload reads back whole through A");

    // Deleted through B: gone for A too, and from the bucket.
    let r = cb.delete(&format!("/v1/files/{id}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(ca.get(&format!("/v1/files/{id}")).await.status, 404);
    assert_eq!(ca.get(&format!("/v1/files/{id}/content")).await.status, 404);
    assert_eq!(ca.delete(&format!("/v1/files/{id}")).await.status, 404);

    // Several sweeps ran on both servers during all this; wait for a few more, then check
    // nothing was lost: the bucket holds exactly one object per live file.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let live = list_all(ca, 100).await;
    assert_eq!(live.len(), 49, "48 small files and the upload");
    let store = garage.store("shared", "").await;
    let objects: BTreeSet<String> = store
        .list(&format!("{PREFIX}files/"))
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let expected: BTreeSet<String> = live.iter().map(|i| format!("{PREFIX}files/{i}")).collect();
    assert_eq!(objects, expected);

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sweeps_expired_files_and_orphans() {
    let garage = Garage::start().await;
    garage.create_bucket("shared").await;
    let pg = Postgres::start();
    let dsn = pg.create_database("sweep");
    let s = TestServer::start(&config(&garage, &dsn, 2)).await;
    let c = &s.client;
    let store = garage.store("shared", "").await;
    let key = |id: &str| format!("{PREFIX}files/{id}");
    let exists = |k: String| {
        let store = &store;
        async move { store.head(&k, None).await.is_ok() }
    };

    let keep = create(c, "keep.txt", b"stays", "assistants").await;
    let keep = keep["id"].as_str().unwrap().to_string();
    // An expired file: its expiry moved into the past behind the server's back.
    let expired = c
        .send(
            c.req(Method::POST, "/v1/files").multipart(
                Form::new()
                    .text("purpose", "assistants")
                    .text("expires_after[anchor]", "created_at")
                    .text("expires_after[seconds]", "3600")
                    .part("file", Part::bytes(b"old".to_vec()).file_name("old.txt")),
            ),
        )
        .await;
    assert_eq!(
        expired.status,
        200,
        "{}",
        String::from_utf8_lossy(&expired.body)
    );
    let expired = expired.json()["id"].as_str().unwrap().to_string();
    // A row whose object was lost, and an object whose row was lost.
    let lost_object = create(c, "lost-object.txt", b"object lost", "assistants").await;
    let lost_object = lost_object["id"].as_str().unwrap().to_string();
    let lost_row = create(c, "lost-row.txt", b"row lost", "assistants").await;
    let lost_row = lost_row["id"].as_str().unwrap().to_string();
    pg.sql(
        "sweep",
        &format!("UPDATE files SET expires_at = 1 WHERE id = '{expired}'"),
    );
    store.delete(&key(&lost_object)).await.unwrap();
    pg.sql(
        "sweep",
        &format!("DELETE FROM files WHERE id = '{lost_row}'"),
    );
    // Not ours: a key under files/ that is no file id.
    store
        .put(
            &format!("{PREFIX}files/README.txt"),
            Body::Bytes(bytes::Bytes::from_static(b"someone else's")),
            &Metadata::default(),
        )
        .await
        .unwrap();

    eventually("the expired file's object is deleted", || async {
        !exists(key(&expired)).await
    })
    .await;
    eventually(
        "the object without a row is deleted after the grace",
        || async { !exists(key(&lost_row)).await },
    )
    .await;
    eventually("the row without an object is deleted", || async {
        pg.sql(
            "sweep",
            &format!("SELECT count(*) FROM files WHERE id = '{lost_object}'"),
        ) == "0"
    })
    .await;
    assert_eq!(c.get(&format!("/v1/files/{expired}")).await.status, 404);
    assert_eq!(c.get(&format!("/v1/files/{lost_object}")).await.status, 404);
    assert_eq!(
        pg.sql(
            "sweep",
            &format!("SELECT count(*) FROM files WHERE id = '{expired}'")
        ),
        "0"
    );
    // The live file and the foreign key are untouched.
    assert!(exists(key(&keep)).await);
    assert!(exists(format!("{PREFIX}files/README.txt")).await);
    let ids: Vec<String> = c.get("/v1/files").await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f: &Value| f["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![keep]);
    s.shutdown().await.unwrap();
}
