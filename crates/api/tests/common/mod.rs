//! Test harness: an in-process server on 127.0.0.1:0, an HTTP client that checks every request
//! and response against the server's own OpenAPI document.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use infra_api::{ApiConfig, Server, ServerParts};
use serde_json::Value;

/// A running server and its home.
pub struct TestServer {
    pub addr: SocketAddr,
    pub home: tempfile::TempDir,
    pub paths: infra_config::Paths,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub client: Client,
}

impl TestServer {
    /// Starts a server with `config` (YAML) in a fresh home.
    pub async fn start(config: &str) -> Self {
        let home = tempfile::tempdir().unwrap();
        Self::start_in(home, config).await
    }

    /// Starts a server in `home`.
    pub async fn start_in(home: tempfile::TempDir, config: &str) -> Self {
        let paths = paths_in(home.path());
        let mut config = ApiConfig::parse(config).expect("test config parses");
        config.server.port = 0;
        let runner = infra_runner::Runner::new(
            infra_runner::RunnerOptions::for_host().unwrap(),
            &paths.cache,
        );
        let server = Server::bind(ServerParts {
            config,
            paths: paths.clone(),
            runner,
            overrides: Default::default(),
        })
        .await
        .expect("server binds");
        let addr = server.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        let client = Client::new(&format!("http://{addr}"));
        client.doc().await;
        Self {
            addr,
            home,
            paths,
            stop: Some(tx),
            task: Some(task),
            client,
        }
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends the shutdown signal and waits for the server to return.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

/// A home laid out like the CLI's, under `dir`.
pub fn paths_in(dir: &std::path::Path) -> infra_config::Paths {
    infra_config::Paths::resolve(Some(dir.as_os_str().to_owned()), false, None, None)
}

/// An HTTP response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
    /// OpenAI's error body: returns (type, param, code, message).
    pub fn error(&self) -> (String, Option<String>, Option<String>, String) {
        let v = self.json();
        let e = &v["error"];
        assert!(e.is_object(), "not an OpenAI error body: {v}");
        let s = |k: &str| e[k].as_str().map(str::to_string);
        let msg = s("message").expect("message");
        assert!(!msg.contains('\n'), "one-line message: {msg}");
        (s("type").expect("type"), s("param"), s("code"), msg)
    }
}

/// A client that checks each exchange against `/openapi.json`.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    pub token: Option<String>,
    doc: Arc<Mutex<Option<Value>>>,
    pub seen: Arc<Mutex<BTreeSet<String>>>,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_string(),
            http: reqwest::Client::new(),
            token: None,
            doc: Arc::new(Mutex::new(None)),
            seen: Arc::new(Mutex::new(BTreeSet::new())),
        }
    }

    pub fn with_token(&self, t: Option<&str>) -> Self {
        let mut c = self.clone();
        c.token = t.map(str::to_string);
        c
    }

    async fn doc(&self) -> Value {
        if let Some(d) = self.doc.lock().unwrap().clone() {
            return d;
        }
        let d: Value = self
            .http
            .get(format!("{}/openapi.json", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        *self.doc.lock().unwrap() = Some(d.clone());
        d
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let b = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => b.bearer_auth(t),
            None => b,
        }
    }

    /// Sends, reads, and checks the exchange against the OpenAPI document.
    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Resp {
        let req = rb.build().unwrap();
        let method = req.method().as_str().to_lowercase();
        let path = req.url().path().to_string();
        let req_json: Option<Value> = req
            .body()
            .and_then(|b| b.as_bytes())
            .and_then(|b| serde_json::from_slice(b).ok())
            .filter(|_| {
                req.headers()
                    .get("content-type")
                    .is_some_and(|v| v.to_str().unwrap().starts_with("application/json"))
            });
        let r = self.http.execute(req).await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap().to_vec();
        let resp = Resp {
            status,
            headers,
            body,
        };
        self.conform(&method, &path, req_json.as_ref(), &resp).await;
        resp
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.req(reqwest::Method::GET, path)).await
    }

    pub async fn post_json(&self, path: &str, v: &Value) -> Resp {
        self.send(self.req(reqwest::Method::POST, path).json(v))
            .await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(self.req(reqwest::Method::DELETE, path)).await
    }

    /// Checks a request and response against the document: the route and the status are
    /// documented, JSON bodies validate against their schemas.
    async fn conform(&self, method: &str, path: &str, req: Option<&Value>, resp: &Resp) {
        let doc = self.doc().await;
        let Some(template) = find_template(&doc, path) else {
            assert_eq!(
                resp.status, 404,
                "{method} {path}: undocumented route answered {}",
                resp.status
            );
            return;
        };
        let op = &doc["paths"][&template][method];
        if op.is_null() {
            assert!(
                resp.status == 405 || resp.status == 404,
                "{method} {template}: undocumented method answered {}",
                resp.status
            );
            return;
        }
        // A request the server accepted must match the document; refused ones are the
        // tests' deliberately bad requests.
        if let Some(body) = req.filter(|_| (200..300).contains(&resp.status)) {
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            assert!(
                !schema.is_null(),
                "{method} {template}: JSON body not documented"
            );
            validate(
                &doc,
                schema,
                body,
                &format!("request of {method} {template}"),
            );
        }
        // Statuses any route may answer: wrong method, the request timeout.
        let generic = [405u16, 408];
        let r = &op["responses"][resp.status.to_string()];
        if r.is_null() {
            assert!(
                generic.contains(&resp.status),
                "{method} {template}: status {} not documented; body {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            );
        } else {
            let ct = resp.header("content-type").unwrap_or_default();
            if ct.starts_with("application/json") {
                let schema = &r["content"]["application/json"]["schema"];
                assert!(
                    !schema.is_null(),
                    "{method} {template} {}: JSON body but no schema",
                    resp.status
                );
                let body: Value = serde_json::from_slice(&resp.body).unwrap();
                validate(
                    &doc,
                    schema,
                    &body,
                    &format!("{method} {template} {}", resp.status),
                );
            }
        }
        self.seen
            .lock()
            .unwrap()
            .insert(format!("{method} {template} {}", resp.status));
    }
}

/// The documented path template matching a concrete path.
pub fn find_template(doc: &Value, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut best: Option<(usize, String)> = None;
    for t in doc["paths"].as_object()?.keys() {
        let ts: Vec<&str> = t.split('/').collect();
        if ts.len() != segs.len() {
            continue;
        }
        let mut literal = 0;
        let ok = ts.iter().zip(&segs).all(|(a, b)| {
            if a.starts_with('{') {
                !b.is_empty()
            } else {
                literal += 1;
                a == b
            }
        });
        if ok && best.as_ref().is_none_or(|(l, _)| literal > *l) {
            best = Some((literal, t.clone()));
        }
    }
    best.map(|b| b.1)
}

/// Validates `value` against an OpenAPI 3.1 schema (JSON Schema 2020-12) whose `$ref`s point
/// into the document.
pub fn validate(doc: &Value, schema: &Value, value: &Value, what: &str) {
    let mut root = doc.clone();
    root["x-target"] = schema.clone();
    root["$ref"] = Value::String("#/x-target".into());
    let v = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .unwrap_or_else(|e| panic!("{what}: schema does not compile: {e}"));
    let errors: Vec<String> = v
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: does not match the OpenAPI schema: {errors:?}\n{value}"
    );
}

/// A multipart body for `POST /v1/files`.
pub fn upload_form(name: &str, data: Vec<u8>, purpose: &str) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .text("purpose", purpose.to_string())
        .part(
            "file",
            reqwest::multipart::Part::bytes(data).file_name(name.to_string()),
        )
}

/// Uploads `data` as `name` and returns the file object (asserting 200).
pub async fn create(c: &Client, name: &str, data: &[u8], purpose: &str) -> Value {
    let r = c
        .send(
            c.req(reqwest::Method::POST, "/v1/files")
                .multipart(upload_form(name, data.to_vec(), purpose)),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// Hex md5 of `b`.
pub fn md5_of(b: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(b))
}
