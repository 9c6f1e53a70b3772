//! The official OpenAI Python SDK (`pip install openai`, see scripts/install-deps.sh) as the
//! client of a server whose Files provider is the seed's: `remote::s3` on Garage (a real S3
//! server) with PostgreSQL metadata, API keys required. The script is `openai_sdk.py`.

mod common;

use common::TestServer;
use infra_files::testing::Postgres;
use infra_store::testing::{Garage, GARAGE_REGION};
use infra_store::ObjectStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_against_garage_and_postgres() {
    let have_sdk = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_sdk,
        "the OpenAI Python SDK is missing: run scripts/install-deps.sh (pip install openai)"
    );
    let garage = Garage::start().await;
    garage.create_bucket("sdk-files").await;
    let pg = Postgres::start();
    let dsn = pg.create_database("sdk");
    let home = tempfile::tempdir().unwrap();
    let (_, token) = infra_api::KeyStore::new(home.path()).create("sdk").unwrap();
    let config = format!(
        r#"
server: {{require_auth: true}}
files:
  provider_type: remote::s3
  config:
    bucket_name: sdk-files
    region: {GARAGE_REGION}
    endpoint_url: {endpoint}
    aws_access_key_id: {key}
    aws_secret_access_key: {secret}
    key_prefix: tenants/a/
    metadata_store: {{type: postgres, dsn: "{dsn}"}}
"#,
        endpoint = garage.endpoint(),
        key = garage.key_id,
        secret = garage.secret,
    );
    let s = TestServer::start_in(home, &config).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk.py");
    let url = s.url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .env("BASE_URL", url)
            .env("API_KEY", token)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ok: openai"), "{stdout}");
    eprintln!("{}", stdout.trim());
    // The bytes are in the bucket, under the key prefix, one object per live file.
    let store = garage.store("sdk-files", "").await;
    let objects = store.list("tenants/a/files/").await.unwrap();
    assert!(
        objects.len() >= 7,
        "objects in Garage: {:?}",
        objects.iter().map(|o| &o.key).collect::<Vec<_>>()
    );
    assert!(
        objects.iter().any(|o| o.size > 12 << 20),
        "the chunked upload is one object"
    );
    s.shutdown().await.unwrap();
}
