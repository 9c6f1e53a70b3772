//! The HTTP API in process, over real HTTP: Files and Uploads (local store + SQLite), auth,
//! errors, limits, metrics, shutdown. Every exchange is checked against `/openapi.json`
//! (`common::Client::conform`). Execution over HTTP with real VMs is in the CLI's `api_vm`
//! tests.

mod common;

use common::{create, md5_of, upload_form, TestServer};
use reqwest::multipart::{Form, Part};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn health_openapi_and_unknown_routes() {
    let s = TestServer::start("{}").await;
    let c = &s.client;
    let h = c.get("/health").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "healthy");
    let doc = c.get("/openapi.json").await.json();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    for p in [
        "/api/v1/execute",
        "/api/v1/execute/stream",
        "/api/v1/run",
        "/api/v1/languages",
        "/api/v1/rootfs",
        "/v1/files",
        "/v1/files/{file_id}/content",
        "/v1/uploads/{upload_id}/complete",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} is documented");
    }
    let r = c.get("/v2/nothing").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error().0, "invalid_request_error");
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn files_round_trip_with_range_and_delete() {
    let s = TestServer::start("{}").await;
    let c = &s.client;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let f = create(c, "data.bin", &data, "assistants").await;
    let id = f["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("file-"));
    assert_eq!(f["object"], "file");
    assert_eq!(f["bytes"], 100_000);
    assert_eq!(f["filename"], "data.bin");
    assert_eq!(f["purpose"], "assistants");
    assert_eq!(f["status"], "processed");

    let got = c.get(&format!("/v1/files/{id}")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), f);

    let whole = c.get(&format!("/v1/files/{id}/content")).await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, data);
    assert_eq!(whole.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(
        whole.header("content-disposition").as_deref(),
        Some("attachment; filename=\"data.bin\"")
    );

    let part = c
        .send(
            c.req(Method::GET, &format!("/v1/files/{id}/content"))
                .header("range", "bytes=10-19"),
        )
        .await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, &data[10..20]);
    assert_eq!(
        part.header("content-range").as_deref(),
        Some("bytes 10-19/100000")
    );
    let tail = c
        .send(
            c.req(Method::GET, &format!("/v1/files/{id}/content"))
                .header("range", "bytes=-5"),
        )
        .await;
    assert_eq!(tail.body, &data[data.len() - 5..]);
    let bad = c
        .send(
            c.req(Method::GET, &format!("/v1/files/{id}/content"))
                .header("range", "bytes=100000-"),
        )
        .await;
    assert_eq!(bad.status, 416);
    assert_eq!(
        bad.header("content-range").as_deref(),
        Some("bytes */100000")
    );

    let del = c.delete(&format!("/v1/files/{id}")).await;
    assert_eq!(del.status, 200);
    assert_eq!(
        del.json(),
        json!({"id": id, "object": "file", "deleted": true})
    );
    let gone = c.get(&format!("/v1/files/{id}")).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.error().2.as_deref(), Some("not_found"));
    let gone = c.get(&format!("/v1/files/{id}/content")).await;
    assert_eq!(gone.status, 404);
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn listing_pages_are_exact_and_filtered() {
    let s = TestServer::start("{}").await;
    let c = &s.client;
    let mut ids = Vec::new();
    for i in 0..7 {
        let purpose = if i % 2 == 0 { "assistants" } else { "batch" };
        ids.push(
            create(c, &format!("f{i}.txt"), b"x", purpose).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Oldest first, pages of 3, with a file added between pages.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/files?order=asc&limit=3&after={a}"),
            None => "/v1/files?order=asc&limit=3".into(),
        };
        let page = c.get(&q).await.json();
        assert_eq!(page["object"], "list");
        for f in page["data"].as_array().unwrap() {
            seen.push(f["id"].as_str().unwrap().to_string());
        }
        if seen.len() == 3 {
            ids.push(
                create(c, "late.txt", b"y", "assistants").await["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        after = page["last_id"].as_str().map(str::to_string);
    }
    // Every file that existed when the walk began, exactly once, in (created_at, id) order.
    // (Ids order files created within the same second; the file added mid-walk shows up
    // only when it sorts after the cursor.)
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), seen.len(), "no file twice: {seen:?}");
    for id in &ids[..7] {
        assert!(seen.contains(id), "{id} missing from {seen:?}");
    }
    let all = c.get("/v1/files?order=asc").await.json();
    let order: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    let by_time: Vec<(i64, String)> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["created_at"].as_i64().unwrap(),
                f["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let sorted = {
        let mut v = by_time.clone();
        v.sort();
        v
    };
    assert_eq!(by_time, sorted, "ascending by (created_at, id)");
    let batch = c.get("/v1/files?purpose=batch").await.json();
    assert_eq!(batch["data"].as_array().unwrap().len(), 3);
    let newest = c.get("/v1/files?limit=1").await.json();
    assert_eq!(newest["data"][0]["id"].as_str(), order.last().copied());
    assert_eq!(newest["has_more"], true);

    for (q, param) in [
        ("/v1/files?limit=0", "limit"),
        ("/v1/files?limit=ten", "limit"),
        ("/v1/files?order=up", "order"),
        ("/v1/files?purpose=nope", "purpose"),
        ("/v1/files?after=file-zz", "after"),
        ("/v1/files?colour=red", "colour"),
    ] {
        let r = c.get(q).await;
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.error().1.as_deref(), Some(param), "{q}");
    }
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn hostile_and_malformed_uploads_are_refused_cleanly() {
    let s = TestServer::start("{}").await;
    let c = &s.client;
    for name in [
        "../../etc/passwd",
        "a/b.txt",
        "x\u{0}y",
        "evil\r\nSet-Cookie: a=b",
    ] {
        let r = c
            .send(c.req(Method::POST, "/v1/files").multipart(upload_form(
                name,
                b"data".to_vec(),
                "assistants",
            )))
            .await;
        assert_eq!(r.status, 400, "{name:?}");
        assert_eq!(r.error().1.as_deref(), Some("file"), "{name:?}");
    }
    let r = c
        .send(c.req(Method::POST, "/v1/files").multipart(upload_form(
            "a.txt",
            b"data".to_vec(),
            "world-domination",
        )))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error().1.as_deref(), Some("purpose"));
    // No purpose at all; a JSON body where multipart is expected.
    let r = c
        .send(
            c.req(Method::POST, "/v1/files")
                .multipart(Form::new().part("file", Part::bytes(b"x".to_vec()).file_name("a.txt"))),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error().1.as_deref(), Some("purpose"));
    let r = c.post_json("/v1/uploads", &json!({"filename": 3})).await;
    assert_eq!(r.status, 400);
    let r = c
        .send(
            c.req(Method::POST, "/v1/uploads")
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert_eq!(r.status, 400);
    // File part first, purpose after: spooled, then stored.
    let r = c
        .send(
            c.req(Method::POST, "/v1/files").multipart(
                Form::new()
                    .part(
                        "file",
                        Part::bytes(b"late purpose".to_vec()).file_name("p.txt"),
                    )
                    .text("purpose", "user_data"),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        c.get(&format!("/v1/files/{id}/content")).await.body,
        b"late purpose"
    );
    // Nothing of the refused uploads is listed.
    let all = c.get("/v1/files").await.json();
    assert_eq!(all["data"].as_array().unwrap().len(), 1);
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn file_over_the_size_limit_is_413_and_leaves_nothing() {
    let cfg = "files: {provider_type: inline::localfs, config: {max_file_size: 65536, storage_dir: STORE, metadata_store: {type: sqlite, db_path: DB}}}";
    let home = tempfile::tempdir().unwrap();
    let cfg = cfg
        .replace("STORE", &home.path().join("store").display().to_string())
        .replace("DB", &home.path().join("files.db").display().to_string());
    let s = TestServer::start_in(home, &cfg).await;
    let c = &s.client;
    let r = c
        .send(c.req(Method::POST, "/v1/files").multipart(upload_form(
            "big.bin",
            vec![7u8; 200_000],
            "assistants",
        )))
        .await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    r.error();
    assert_eq!(c.get("/v1/files").await.json()["data"], json!([]));
    let objects: Vec<_> = walk(&s.home.path().join("store"));
    assert!(objects.is_empty(), "no object left: {objects:?}");
    s.shutdown().await.unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn uploads_in_parts_become_one_file() {
    let s = TestServer::start("{}").await;
    let c = &s.client;
    let part_a: Vec<u8> = vec![b'a'; 5 << 20];
    let part_b: Vec<u8> = b"the end".to_vec();
    let total = part_a.len() + part_b.len();
    let up = c
        .post_json(
            "/v1/uploads",
            &json!({"filename": "big.txt", "purpose": "assistants", "bytes": total, "mime_type": "text/plain"}),
        )
        .await;
    assert_eq!(up.status, 200, "{}", String::from_utf8_lossy(&up.body));
    let up = up.json();
    assert_eq!(up["status"], "pending");
    let uid = up["id"].as_str().unwrap().to_string();
    let mut part_ids = Vec::new();
    for data in [part_a.clone(), part_b.clone()] {
        let r = c
            .send(
                c.req(Method::POST, &format!("/v1/uploads/{uid}/parts"))
                    .multipart(Form::new().part("data", Part::bytes(data).file_name("blob"))),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["object"], "upload.part");
        part_ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let mut whole = part_a.clone();
    whole.extend_from_slice(&part_b);
    let md5 = md5_of(&whole);
    let done = c
        .post_json(
            &format!("/v1/uploads/{uid}/complete"),
            &json!({"part_ids": part_ids, "md5": md5}),
        )
        .await;
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    let done = done.json();
    assert_eq!(done["status"], "completed");
    let fid = done["file"]["id"].as_str().unwrap();
    let body = c.get(&format!("/v1/files/{fid}/content")).await.body;
    assert_eq!(body.len(), total);
    assert!(body == whole);
    // A completed upload cannot be cancelled; an unknown one is 404.
    let r = c
        .send(c.req(Method::POST, &format!("/v1/uploads/{uid}/cancel")))
        .await;
    assert_eq!(r.status, 409);
    let r = c
        .send(c.req(Method::POST, "/v1/uploads/upload_nope/cancel"))
        .await;
    assert_eq!(r.status, 404);
    // Cancel a fresh one.
    let up2 = c
        .post_json(
            "/v1/uploads",
            &json!({"filename": "x.txt", "purpose": "assistants", "bytes": 3, "mime_type": "text/plain"}),
        )
        .await
        .json();
    let r = c
        .send(c.req(
            Method::POST,
            &format!("/v1/uploads/{}/cancel", up2["id"].as_str().unwrap()),
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "cancelled");
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn keys_are_required_when_asked_and_revocation_is_immediate() {
    let home = tempfile::tempdir().unwrap();
    let keys = infra_api::KeyStore::new(home.path());
    let (key, token) = keys.create("test").unwrap();
    let s = TestServer::start_in(home, "server: {require_auth: true}").await;
    let anon = &s.client;
    let r = anon.get("/v1/files").await;
    assert_eq!(r.status, 401);
    let (kind, _, code, msg) = r.error();
    assert_eq!(kind, "authentication_error");
    assert_eq!(code.as_deref(), Some("invalid_api_key"));
    assert!(msg.contains("api keys create"), "{msg}");
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(anon.get("/health").await.status, 200, "health needs no key");
    let wrong = anon.with_token(Some("sk-io-0000"));
    assert_eq!(wrong.get("/v1/files").await.status, 401);
    let good = anon.with_token(Some(&token));
    assert_eq!(good.get("/v1/files").await.status, 200);
    assert_eq!(good.get("/metrics").await.status, 200);
    keys.revoke(&key.id).unwrap();
    assert_eq!(good.get("/v1/files").await.status, 401, "revoked at once");
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_public_bind_without_keys_refuses_to_start() {
    let home = tempfile::tempdir().unwrap();
    let paths = common::paths_in(home.path());
    let mut config = infra_api::ApiConfig::parse("server: {host: 0.0.0.0}").unwrap();
    config.server.port = 0;
    let r = infra_api::Server::bind(infra_api::ServerParts {
        config,
        paths: paths.clone(),
        runner: infra_runner::Runner::new(
            infra_runner::RunnerOptions::for_host().unwrap(),
            &paths.cache,
        ),
        overrides: Default::default(),
    })
    .await;
    let e = r.err().expect("refused").to_string();
    assert!(e.contains("api keys create"), "{e}");
}

#[tokio::test]
async fn execution_requests_are_checked_before_any_vm() {
    let s = TestServer::start("runs: {max_timeout: 60}").await;
    let c = &s.client;
    for (body, param) in [
        (json!({"language": "klingon", "code": "x"}), "language"),
        (json!({"language": "python"}), "code"),
        (json!({"language": "python", "code": "   "}), "code"),
        (
            json!({"language": "python", "code": "print(1)", "timeout": 0}),
            "timeout",
        ),
        (
            json!({"language": "python", "code": "print(1)", "timeout": 61}),
            "timeout",
        ),
        (
            json!({"language": "python", "code": "print(1)", "env": {"A=B": "x"}}),
            "env",
        ),
        (
            json!({"language": "python", "code": "print(1)", "args": ["a\u{0}b"]}),
            "args",
        ),
    ] {
        for route in ["/api/v1/execute", "/api/v1/execute/stream", "/api/v1/run"] {
            let r = c.post_json(route, &body).await;
            assert_eq!(r.status, 400, "{route} {body}");
            assert_eq!(r.error().1.as_deref(), Some(param), "{route} {body}");
        }
    }
    let r = c
        .post_json(
            "/api/v1/execute",
            &json!({"language": "python", "code": "x", "colour": 1}),
        )
        .await;
    assert_eq!(r.status, 400, "unknown fields are refused");
    let big = "x".repeat(4 << 20);
    let r = c
        .post_json(
            "/api/v1/execute",
            &json!({"language": "python", "code": big}),
        )
        .await;
    assert!(r.status == 400 || r.status == 413, "{}", r.status);
    r.error();
    let r = c
        .post_json(
            "/api/v1/run",
            &json!({"language": "python", "code": "x", "stdin": []}),
        )
        .await;
    assert_eq!(r.error().1.as_deref(), Some("stdin"));
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn languages_and_images() {
    let s = TestServer::start("{}").await;
    let c = &s.client;
    let all = c.get("/api/v1/languages").await.json();
    let keys: Vec<&str> = all["languages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"python"));
    let py = c.get("/api/v1/languages/py").await;
    assert_eq!(py.status, 200);
    assert_eq!(py.json()["key"], "python");
    assert_eq!(py.json()["image_present"], false);
    assert_eq!(c.get("/api/v1/languages/klingon").await.status, 404);
    let local = c.get("/api/v1/rootfs").await.json();
    assert_eq!(local["source"], "local");
    assert_eq!(local["rootfs"], json!([]));
    let r = c
        .send(c.req(Method::POST, "/api/v1/rootfs/..%2Fetc/upload"))
        .await;
    assert!(r.status == 400 || r.status == 404, "{}", r.status);
    let r = c
        .send(c.req(Method::POST, "/api/v1/rootfs/python/upload"))
        .await;
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_count_requests_by_route_template() {
    let s = TestServer::start("{}").await;
    let c = &s.client;
    let f = create(c, "m.txt", b"metrics", "assistants").await;
    let id = f["id"].as_str().unwrap();
    c.get(&format!("/v1/files/{id}")).await;
    c.get("/v1/files/file-nope").await;
    let text = String::from_utf8(c.get("/metrics").await.body).unwrap();
    assert!(
        text.contains("infra_operator_http_requests_total{method=\"GET\",route=\"/v1/files/{file_id}\",status=\"200\"} 1"),
        "{text}"
    );
    assert!(text.contains("route=\"/v1/files/{file_id}\",status=\"404\"} 1"));
    assert!(!text.contains(id), "ids never become labels");
    assert!(text.contains("infra_operator_queue_depth"));
    assert!(text.contains("infra_operator_vms_live"));
    assert!(text.contains("infra_operator_http_body_bytes_total{direction=\"in\"}"));
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_an_upload_in_flight() {
    let s = TestServer::start("server: {shutdown_grace: 20}").await;
    let c = s.client.clone();
    // A body that trickles in over ~1.5 s.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) });
    let body = reqwest::Body::wrap_stream(stream);
    let form = Form::new()
        .text("purpose", "assistants")
        .part("file", Part::stream(body).file_name("slow.bin"));
    let upload = tokio::spawn(async move {
        c.send(c.req(Method::POST, "/v1/files").multipart(form))
            .await
    });
    tx.send(Ok(vec![1u8; 1000])).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let addr = s.url();
    let stopping = tokio::spawn(s.shutdown());
    for _ in 0..4 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        tx.send(Ok(vec![2u8; 1000])).await.unwrap();
    }
    drop(tx);
    let r = upload.await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["bytes"], 5000);
    stopping.await.unwrap().unwrap();
    // New connections are refused once it stopped.
    assert!(reqwest::get(format!("{addr}/health")).await.is_err());
}
