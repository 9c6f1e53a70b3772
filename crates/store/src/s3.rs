//! The S3 backend (AWS S3 and compatible servers: Garage, MinIO, Ceph) on aws-sdk-s3.
//!
//! TLS is rustls with the ring provider, like the rest of the workspace (the SDK's default
//! HTTPS client would build aws-lc-sys). Credentials come from aws-config's standard chain:
//! environment (with `AWS_SESSION_TOKEN`), shared config/credentials files and profiles, SSO,
//! web identity, ECS and EC2 instance roles.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{
    AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, BucketLocationConstraint,
    BucketVersioningStatus, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
    ExpirationStatus, LifecycleRule, LifecycleRuleFilter, NoncurrentVersionExpiration,
    ServerSideEncryption, ServerSideEncryptionByDefault, ServerSideEncryptionConfiguration,
    ServerSideEncryptionRule, VersioningConfiguration,
};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::error::{CredentialProblem, Error, Result};
use crate::object::{
    BackendKind, Body, GetOptions, GetResponse, InitOptions, InitStep, ListPage, Metadata,
    ObjectInfo, ObjectStore, PartInfo, PutResult, StepStatus, VersionInfo,
};

/// Region used when none is configured (the seed's bucket region).
pub const DEFAULT_REGION: &str = "us-east-1";

/// How to reach a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct S3Settings {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix (`dev/`, `prod/`), empty for the bucket root; normalised to end in `/`.
    pub prefix: String,
    /// Region to sign for; `None` = `AWS_REGION`, the profile's region, else `us-east-1`.
    pub region: Option<String>,
    /// Custom endpoint (Garage, MinIO, Ceph); implies path-style addressing.
    pub endpoint: Option<String>,
    /// Profile of the shared config files (else `AWS_PROFILE`, else `default`).
    pub profile: Option<String>,
    /// Static credentials (access key id, secret, optional session token) instead of the chain.
    pub static_credentials: Option<(String, String, Option<String>)>,
    /// Attempts per request, including the first (retries back off exponentially).
    pub max_attempts: u32,
    /// Server-side encryption requested on every object written (`None`: the bucket default).
    pub sse: Option<Sse>,
}

/// Server-side encryption of written objects (`x-amz-server-side-encryption`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    /// SSE-S3 (`AES256`).
    Aes256,
    /// SSE-KMS (`aws:kms`), with a key id or the account's default key.
    Kms {
        /// KMS key id, ARN or alias; `None` for the default key.
        key_id: Option<String>,
    },
}

impl S3Settings {
    /// Settings for `bucket` under `prefix` with everything else resolved from the environment.
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: normalize_prefix(&prefix.into()),
            max_attempts: 4,
            ..Default::default()
        }
    }
}

/// `a/b` → `a/b/`, `/` → ``.
pub(crate) fn normalize_prefix(p: &str) -> String {
    let p = p.trim_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}

/// A bucket (under a prefix) on S3 or a compatible server.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    region: String,
    endpoint: Option<String>,
    sse: Option<Sse>,
}

impl S3Store {
    /// Builds the client. Nothing is sent yet; credentials are loaded on the first request.
    pub async fn connect(settings: &S3Settings) -> Result<Self> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let region = match &settings.region {
            Some(r) => RegionProviderChain::first_try(Region::new(r.clone())),
            None => RegionProviderChain::first_try(
                aws_config::environment::region::EnvironmentVariableRegionProvider::new(),
            )
            .or_else({
                let mut b = aws_config::profile::region::ProfileFileRegionProvider::builder();
                if let Some(p) = &settings.profile {
                    b = b.profile_name(p);
                }
                b.build()
            })
            .or_else(Region::new(DEFAULT_REGION)),
        };
        let resolved_region = region
            .region()
            .await
            .map(|r| r.to_string())
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(resolved_region.clone()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(settings.max_attempts.max(1))
                    .with_initial_backoff(Duration::from_millis(300))
                    .with_max_backoff(Duration::from_secs(10)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(120))
                    .build(),
            );
        if let Some(p) = &settings.profile {
            loader = loader.profile_name(p);
        }
        if let Some((id, secret, token)) = &settings.static_credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id,
                secret,
                token.clone(),
                None,
                "infra-operator",
            ));
        }
        let sdk = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            // We verify a sha256 of the whole object ourselves; per-request CRCs would make the
            // SDK use aws-chunked trailers, which not every S3-compatible server accepts.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if let Some(ep) = &settings.endpoint {
            conf = conf.endpoint_url(ep).force_path_style(true);
        }
        Ok(Self {
            client: Client::from_conf(conf.build()),
            bucket: settings.bucket.clone(),
            prefix: normalize_prefix(&settings.prefix),
            region: resolved_region,
            endpoint: settings.endpoint.clone(),
            sse: settings.sse.clone(),
        })
    }

    /// Bucket name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Region requests are signed for.
    pub fn region(&self) -> &str {
        &self.region
    }

    fn sse_algorithm(&self) -> Option<ServerSideEncryption> {
        self.sse.as_ref().map(|s| match s {
            Sse::Aes256 => ServerSideEncryption::Aes256,
            Sse::Kms { .. } => ServerSideEncryption::AwsKms,
        })
    }

    fn sse_key_id(&self) -> Option<String> {
        match &self.sse {
            Some(Sse::Kms { key_id }) => key_id.clone(),
            _ => None,
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn endpoint_label(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("AWS S3 ({})", self.region))
    }

    fn backend_label(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("the server at {e}"),
            None => format!("AWS S3 ({})", self.region),
        }
    }

    /// Turns an SDK error into one of ours, by error code and HTTP status.
    fn map_err<E>(&self, op: &'static str, key: Option<&str>, err: SdkError<E>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let target = match key {
            Some(k) => self.url_of(k),
            None => format!("s3://{}", self.bucket),
        };
        if let Some(cred) = find_credentials_error(&err) {
            return Error::NoCredentials {
                source: cred.into(),
            };
        }
        match err {
            SdkError::ServiceError(ctx) => {
                let status = ctx.raw().status().as_u16();
                let region_header = ctx
                    .raw()
                    .headers()
                    .get("x-amz-bucket-region")
                    .map(str::to_string);
                let e = ctx.err();
                let code = e.code().unwrap_or("").to_string();
                let message = e.message().map(str::to_string);
                tracing::debug!(op, %target, status, %code, ?message, "S3 error");
                self.classify(op, target, key, status, code, message, region_header)
            }
            SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => Error::Unreachable {
                endpoint: self.endpoint_label(),
                source: Box::new(SdkError::<E>::DispatchFailure(d)),
            },
            SdkError::TimeoutError(t) => Error::Unreachable {
                endpoint: self.endpoint_label(),
                source: Box::new(SdkError::<E>::TimeoutError(t)),
            },
            SdkError::DispatchFailure(d) => Error::Unreachable {
                endpoint: self.endpoint_label(),
                source: Box::new(SdkError::<E>::DispatchFailure(d)),
            },
            other => Error::Request {
                op,
                target,
                source: Box::new(other),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn classify(
        &self,
        op: &'static str,
        target: String,
        key: Option<&str>,
        status: u16,
        code: String,
        message: Option<String>,
        region_header: Option<String>,
    ) -> Error {
        let bad = |problem| Error::BadCredentials {
            op,
            target: target.clone(),
            problem,
        };
        match code.as_str() {
            "NoSuchBucket" => Error::NoSuchBucket {
                bucket: self.bucket.clone(),
            },
            "NoSuchKey" | "NoSuchVersion" | "NoSuchUpload" => Error::NoSuchKey {
                target,
                version: None,
            },
            "InvalidAccessKeyId" => bad(CredentialProblem::UnknownAccessKey),
            "SignatureDoesNotMatch" => bad(CredentialProblem::WrongSecret),
            "ExpiredToken" | "TokenRefreshRequired" => bad(CredentialProblem::Expired),
            "InvalidToken" => bad(CredentialProblem::InvalidToken),
            "AccessDenied" | "AllAccessDisabled" => Error::AccessDenied {
                op,
                target,
                message,
            },
            "AuthorizationHeaderMalformed"
            | "PermanentRedirect"
            | "IllegalLocationConstraintException"
            | "InvalidRegion" => Error::WrongRegion {
                bucket: self.bucket.clone(),
                region: self.region.clone(),
                actual: region_header,
                message,
            },
            "PreconditionFailed" => Error::Changed { target },
            "NotImplemented" => Error::Unsupported {
                feature: op,
                backend: self.backend_label(),
                detail: message,
            },
            _ => match status {
                301 | 307 => Error::WrongRegion {
                    bucket: self.bucket.clone(),
                    region: self.region.clone(),
                    actual: region_header,
                    message,
                },
                // HEAD answers carry no body, hence no code.
                403 => Error::AccessDenied {
                    op,
                    target,
                    message,
                },
                404 if key.is_some() => Error::NoSuchKey {
                    target,
                    version: None,
                },
                404 => Error::NoSuchBucket {
                    bucket: self.bucket.clone(),
                },
                412 => Error::Changed { target },
                501 => Error::Unsupported {
                    feature: op,
                    backend: self.backend_label(),
                    detail: message,
                },
                _ => Error::Service {
                    op,
                    target,
                    status,
                    code: if code.is_empty() {
                        "error".into()
                    } else {
                        code
                    },
                    message,
                },
            },
        }
    }

    async fn byte_stream(&self, body: Body) -> Result<ByteStream> {
        match body {
            Body::Bytes(b) => Ok(ByteStream::from(b)),
            Body::File { path, offset, len } => ByteStream::read_from()
                .path(&path)
                .offset(offset)
                .length(Length::Exact(len))
                .buffer_size(256 * 1024)
                .build()
                .await
                .map_err(|e| Error::Io {
                    op: "read",
                    path,
                    source: std::io::Error::other(e),
                }),
        }
    }

    async fn init_bucket(&self) -> Result<InitStep> {
        let mut req = self.client.create_bucket().bucket(&self.bucket);
        if self.region != DEFAULT_REGION {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => Ok(InitStep {
                feature: "bucket",
                status: StepStatus::Done,
                detail: format!("created s3://{} in {}", self.bucket, self.region),
            }),
            Err(e) => {
                let code = e.code().unwrap_or("").to_string();
                if code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists" {
                    // BucketAlreadyExists may mean someone else owns it: a HEAD tells.
                    self.client
                        .head_bucket()
                        .bucket(&self.bucket)
                        .send()
                        .await
                        .map_err(|e| self.map_err("HeadBucket", None, e))?;
                    Ok(InitStep {
                        feature: "bucket",
                        status: StepStatus::AlreadyDone,
                        detail: format!("s3://{} exists", self.bucket),
                    })
                } else {
                    Err(self.map_err("CreateBucket", None, e))
                }
            }
        }
    }

    /// Runs one optional configuration step, turning "not implemented" into a report line.
    fn step_result<T>(&self, feature: &'static str, done: String, r: Result<T>) -> InitStep {
        match r {
            Ok(_) => InitStep {
                feature,
                status: StepStatus::Done,
                detail: done,
            },
            Err(Error::Unsupported { detail, .. }) => InitStep {
                feature,
                status: StepStatus::Unsupported,
                detail: format!(
                    "not supported by {}{}",
                    self.backend_label(),
                    detail.map(|d| format!(": {d}")).unwrap_or_default()
                ),
            },
            Err(Error::Service { code, message, .. })
                if matches!(
                    code.as_str(),
                    "MalformedXML" | "InvalidRequest" | "InvalidArgument" | "UnsupportedArgument"
                ) =>
            {
                InitStep {
                    feature,
                    status: StepStatus::Unsupported,
                    detail: format!(
                        "refused by {} ({code}{})",
                        self.backend_label(),
                        message.map(|m| format!(": {m}")).unwrap_or_default()
                    ),
                }
            }
            Err(e) => InitStep {
                feature,
                status: StepStatus::Failed,
                detail: e.to_string(),
            },
        }
    }

    async fn put_lifecycle(&self, rules: Vec<LifecycleRule>) -> Result<()> {
        let conf = BucketLifecycleConfiguration::builder()
            .set_rules(Some(rules))
            .build()
            .map_err(|e| Error::Request {
                op: "PutBucketLifecycleConfiguration",
                target: format!("s3://{}", self.bucket),
                source: Box::new(e),
            })?;
        self.client
            .put_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .lifecycle_configuration(conf)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.map_err("PutBucketLifecycleConfiguration", None, e))
    }
}

/// The credential chain's failure, as one line, when that is why the request failed.
fn find_credentials_error<E>(err: &SdkError<E>) -> Option<std::io::Error>
where
    E: std::error::Error + 'static,
{
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
        {
            return Some(std::io::Error::other(credentials_text(c)));
        }
        cur = e.source();
    }
    None
}

/// The chain's distinct messages on one line (the provider list joined with "; ").
fn credentials_text(c: &aws_credential_types::provider::error::CredentialsError) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(c);
    while let Some(e) = cur {
        let t = e
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
            .replace("Attempted:; ", "Attempted: ");
        if !parts
            .iter()
            .any(|p| p.contains(&t) || t.contains(p.as_str()))
        {
            parts.push(t);
        } else if let Some(p) = parts.iter_mut().find(|p| t.contains(p.as_str())) {
            *p = t;
        }
        cur = e.source();
    }
    parts.join(": ")
}

fn to_chrono(t: &aws_sdk_s3::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// User metadata as S3 returns it, with keys lower-cased (servers differ in case).
fn lowercase_metadata(m: Option<&std::collections::HashMap<String, String>>) -> Metadata {
    m.map(|m| {
        m.iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    })
    .unwrap_or_default()
}

fn unquote(etag: Option<&str>) -> Option<String> {
    etag.map(|e| e.trim_matches('"').to_string())
}

/// `x-amz-copy-source` value: `bucket/key` with the key percent-encoded (all but unreserved
/// characters and `/`), as S3 requires.
fn copy_source(bucket: &str, key: &str) -> String {
    let mut out = format!("{bucket}/");
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Total object size from `Content-Range: bytes a-b/total`.
fn total_from_content_range(v: &str) -> Option<u64> {
    v.rsplit('/').next()?.parse().ok()
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn url_of(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.full(key))
    }

    fn kind(&self) -> BackendKind {
        BackendKind::S3
    }

    #[tracing::instrument(skip_all, fields(bucket = %self.bucket, prefix = %prefix))]
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let resp = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full(prefix))
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| self.map_err("ListObjectsV2", None, e))?;
            for o in resp.contents() {
                let Some(key) = o.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                if crate::parts::is_sidecar_key(key) && !crate::parts::is_sidecar_key(prefix) {
                    continue;
                }
                out.push(ObjectInfo {
                    key: key.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    last_modified: o.last_modified().and_then(to_chrono),
                    etag: unquote(o.e_tag()),
                    version_id: None,
                    metadata: Metadata::new(),
                });
            }
            match resp.next_continuation_token() {
                Some(t) if resp.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    #[tracing::instrument(skip_all, fields(bucket = %self.bucket, prefix = %prefix))]
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: &str,
        token: Option<&str>,
        max_keys: Option<i32>,
    ) -> Result<ListPage> {
        let resp = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full(prefix))
            .delimiter(delimiter)
            .set_continuation_token(token.map(str::to_string))
            .set_max_keys(max_keys)
            .send()
            .await
            .map_err(|e| self.map_err("ListObjectsV2", None, e))?;
        let sidecars = crate::parts::is_sidecar_key(prefix);
        let mut page = ListPage::default();
        for o in resp.contents() {
            let Some(key) = o.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                continue;
            };
            if crate::parts::is_sidecar_key(key) && !sidecars {
                continue;
            }
            page.objects.push(ObjectInfo {
                key: key.to_string(),
                size: o.size().unwrap_or(0).max(0) as u64,
                last_modified: o.last_modified().and_then(to_chrono),
                etag: unquote(o.e_tag()),
                version_id: None,
                metadata: Metadata::new(),
            });
        }
        for p in resp.common_prefixes() {
            let Some(p) = p.prefix().and_then(|k| k.strip_prefix(&self.prefix)) else {
                continue;
            };
            if crate::parts::is_sidecar_key(p) && !sidecars {
                continue;
            }
            page.prefixes.push(p.to_string());
        }
        page.next = match resp.next_continuation_token() {
            Some(t) if resp.is_truncated() == Some(true) => Some(t.to_string()),
            _ => None,
        };
        Ok(page)
    }

    #[tracing::instrument(skip_all, fields(bucket = %self.bucket, from = %from, to = %to))]
    async fn copy(&self, from: &str, to: &str, metadata: Option<&Metadata>) -> Result<PutResult> {
        let mut req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(self.full(to))
            .copy_source(copy_source(&self.bucket, &self.full(from)))
            .set_server_side_encryption(self.sse_algorithm())
            .set_ssekms_key_id(self.sse_key_id());
        if let Some(m) = metadata {
            req = req
                .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                .content_type("application/octet-stream")
                .set_metadata(Some(m.clone().into_iter().collect()));
        }
        // The source is named in the error: a missing source is the case worth naming.
        let resp = req
            .send()
            .await
            .map_err(|e| self.map_err("CopyObject", Some(from), e))?;
        Ok(PutResult {
            etag: unquote(resp.copy_object_result().and_then(|r| r.e_tag())),
            version_id: resp.version_id().map(str::to_string),
        })
    }

    #[tracing::instrument(skip_all, fields(bucket = %self.bucket, key = %key))]
    async fn head(&self, key: &str, version_id: Option<&str>) -> Result<ObjectInfo> {
        let resp = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| match self.map_err("HeadObject", Some(key), e) {
                Error::NoSuchKey { target, .. } => Error::NoSuchKey {
                    target,
                    version: version_id.map(str::to_string),
                },
                other => other,
            });
        let resp = match resp {
            Ok(r) => r,
            // A HEAD answer has no body, so no reason: a one-byte GET gets the server's message
            // (which says whether the key or the secret is wrong).
            Err(Error::AccessDenied { message: None, .. }) => {
                let e = self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(self.full(key))
                    .range("bytes=0-0")
                    .send()
                    .await
                    .err()
                    .map(|e| self.map_err("HeadObject", Some(key), e));
                return Err(e.unwrap_or(Error::AccessDenied {
                    op: "HeadObject",
                    target: self.url_of(key),
                    message: None,
                }));
            }
            Err(e) => return Err(e),
        };
        Ok(ObjectInfo {
            key: key.to_string(),
            size: resp.content_length().unwrap_or(0).max(0) as u64,
            last_modified: resp.last_modified().and_then(to_chrono),
            etag: unquote(resp.e_tag()),
            version_id: resp.version_id().map(str::to_string),
            metadata: lowercase_metadata(resp.metadata()),
        })
    }

    #[tracing::instrument(skip_all, fields(bucket = %self.bucket, key = %key, range = ?opts.range))]
    async fn get(&self, key: &str, opts: &GetOptions) -> Result<GetResponse> {
        let range = opts.range.as_ref().map(|r| {
            if r.end > r.start {
                format!("bytes={}-{}", r.start, r.end - 1)
            } else {
                format!("bytes={}-", r.start)
            }
        });
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .set_range(range)
            .set_version_id(opts.version_id.clone())
            .set_if_match(opts.if_match.as_ref().map(|e| format!("\"{e}\"")))
            .send()
            .await
            .map_err(|e| match self.map_err("GetObject", Some(key), e) {
                Error::NoSuchKey { target, .. } => Error::NoSuchKey {
                    target,
                    version: opts.version_id.clone(),
                },
                other => other,
            })?;
        let size = match resp.content_range().and_then(total_from_content_range) {
            Some(total) => total,
            None => resp.content_length().unwrap_or(0).max(0) as u64,
        };
        let info = ObjectInfo {
            key: key.to_string(),
            size,
            last_modified: resp.last_modified().and_then(to_chrono),
            etag: unquote(resp.e_tag()),
            version_id: resp.version_id().map(str::to_string),
            metadata: lowercase_metadata(resp.metadata()),
        };
        let endpoint = self.endpoint_label();
        let body = futures::stream::unfold(resp.body, move |mut bs| {
            let endpoint = endpoint.clone();
            async move {
                match bs.next().await {
                    None => None,
                    Some(Ok(b)) => Some((Ok(b), bs)),
                    Some(Err(e)) => Some((
                        Err(Error::Unreachable {
                            endpoint,
                            source: Box::new(e),
                        }),
                        bs,
                    )),
                }
            }
        });
        Ok(GetResponse {
            info,
            body: body.boxed(),
        })
    }

    #[tracing::instrument(skip_all, fields(bucket = %self.bucket, key = %key, len = body.len()))]
    async fn put(&self, key: &str, body: Body, metadata: &Metadata) -> Result<PutResult> {
        let len = body.len();
        let stream = self.byte_stream(body).await?;
        let resp = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .content_length(len as i64)
            .content_type("application/octet-stream")
            .set_metadata(Some(metadata.clone().into_iter().collect()))
            .set_server_side_encryption(self.sse_algorithm())
            .set_ssekms_key_id(self.sse_key_id())
            .body(stream)
            .send()
            .await
            .map_err(|e| self.map_err("PutObject", Some(key), e))?;
        Ok(PutResult {
            etag: unquote(resp.e_tag()),
            version_id: resp.version_id().map(str::to_string),
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.map_err("DeleteObject", Some(key), e))
    }

    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> Result<String> {
        let resp = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full(key))
            .content_type("application/octet-stream")
            .set_metadata(Some(metadata.clone().into_iter().collect()))
            .set_server_side_encryption(self.sse_algorithm())
            .set_ssekms_key_id(self.sse_key_id())
            .send()
            .await
            .map_err(|e| self.map_err("CreateMultipartUpload", Some(key), e))?;
        resp.upload_id()
            .map(str::to_string)
            .ok_or_else(|| Error::Service {
                op: "CreateMultipartUpload",
                target: self.url_of(key),
                status: 200,
                code: "MissingUploadId".into(),
                message: None,
            })
    }

    #[tracing::instrument(skip_all, fields(key = %key, part = number))]
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Body,
    ) -> Result<PartInfo> {
        let len = body.len();
        let stream = self.byte_stream(body).await?;
        let resp = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(self.full(key))
            .upload_id(upload_id)
            .part_number(number)
            .content_length(len as i64)
            .body(stream)
            .send()
            .await
            .map_err(|e| self.map_err("UploadPart", Some(key), e))?;
        Ok(PartInfo {
            number,
            etag: unquote(resp.e_tag()).unwrap_or_default(),
            size: len,
        })
    }

    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let resp = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(self.full(key))
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| self.map_err("ListParts", Some(key), e))?;
            for p in resp.parts() {
                out.push(PartInfo {
                    number: p.part_number().unwrap_or(0),
                    etag: unquote(p.e_tag()).unwrap_or_default(),
                    size: p.size().unwrap_or(0).max(0) as u64,
                });
            }
            match resp.next_part_number_marker() {
                Some(m) if resp.is_truncated() == Some(true) && Some(m) != marker.as_deref() => {
                    marker = Some(m.to_string())
                }
                _ => break,
            }
        }
        out.sort_by_key(|p| p.number);
        Ok(out)
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[PartInfo],
    ) -> Result<PutResult> {
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(p.number)
                            .e_tag(format!("\"{}\"", p.etag))
                            .build()
                    })
                    .collect(),
            ))
            .build();
        let resp = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full(key))
            .upload_id(upload_id)
            .multipart_upload(completed)
            .send()
            .await
            .map_err(|e| self.map_err("CompleteMultipartUpload", Some(key), e))?;
        Ok(PutResult {
            etag: unquote(resp.e_tag()),
            version_id: resp.version_id().map(str::to_string),
        })
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full(key))
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| self.map_err("AbortMultipartUpload", Some(key), e))
        {
            Ok(_) | Err(Error::NoSuchKey { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn versions(&self, key: &str) -> Result<Vec<VersionInfo>> {
        let full = self.full(key);
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut version_marker: Option<String> = None;
        loop {
            let resp = self
                .client
                .list_object_versions()
                .bucket(&self.bucket)
                .prefix(&full)
                .set_key_marker(key_marker.clone())
                .set_version_id_marker(version_marker.clone())
                .send()
                .await
                .map_err(|e| match self.map_err("ListObjectVersions", Some(key), e) {
                    Error::Unsupported {
                        backend, detail, ..
                    } => Error::Unsupported {
                        feature: "object versions",
                        backend,
                        detail,
                    },
                    other => other,
                })?;
            for v in resp.versions() {
                if v.key() != Some(full.as_str()) {
                    continue;
                }
                out.push(VersionInfo {
                    key: key.to_string(),
                    version_id: v.version_id().unwrap_or("null").to_string(),
                    is_latest: v.is_latest().unwrap_or(false),
                    delete_marker: false,
                    size: v.size().unwrap_or(0).max(0) as u64,
                    last_modified: v.last_modified().and_then(to_chrono),
                    etag: unquote(v.e_tag()),
                });
            }
            for m in resp.delete_markers() {
                if m.key() != Some(full.as_str()) {
                    continue;
                }
                out.push(VersionInfo {
                    key: key.to_string(),
                    version_id: m.version_id().unwrap_or("null").to_string(),
                    is_latest: m.is_latest().unwrap_or(false),
                    delete_marker: true,
                    size: 0,
                    last_modified: m.last_modified().and_then(to_chrono),
                    etag: None,
                });
            }
            if resp.is_truncated() == Some(true) {
                key_marker = resp.next_key_marker().map(str::to_string);
                version_marker = resp.next_version_id_marker().map(str::to_string);
                if key_marker.is_none() {
                    break;
                }
            } else {
                break;
            }
        }
        out.sort_by(|a, b| {
            b.is_latest
                .cmp(&a.is_latest)
                .then(b.last_modified.cmp(&a.last_modified))
        });
        Ok(out)
    }

    async fn init(&self, opts: &InitOptions) -> Result<Vec<InitStep>> {
        let mut steps = vec![self.init_bucket().await?];

        steps.push(if opts.versioning {
            let r = self
                .client
                .put_bucket_versioning()
                .bucket(&self.bucket)
                .versioning_configuration(
                    VersioningConfiguration::builder()
                        .status(BucketVersioningStatus::Enabled)
                        .build(),
                )
                .send()
                .await
                .map_err(|e| self.map_err("PutBucketVersioning", None, e));
            self.step_result("versioning", "enabled".into(), r)
        } else {
            skipped("versioning")
        });

        let filter = LifecycleRuleFilter::builder()
            .prefix(self.prefix.clone())
            .build();
        if let Some(days) = opts.noncurrent_days {
            let mut rule = LifecycleRule::builder()
                .id("infra-operator-noncurrent-versions")
                .status(ExpirationStatus::Enabled)
                .filter(filter.clone())
                .noncurrent_version_expiration(
                    NoncurrentVersionExpiration::builder()
                        .noncurrent_days(days as i32)
                        .build(),
                );
            if let Some(a) = opts.abort_incomplete_days {
                rule = rule.abort_incomplete_multipart_upload(
                    AbortIncompleteMultipartUpload::builder()
                        .days_after_initiation(a as i32)
                        .build(),
                );
            }
            let r = match rule.build() {
                Ok(rule) => self.put_lifecycle(vec![rule]).await,
                Err(e) => Err(Error::Request {
                    op: "PutBucketLifecycleConfiguration",
                    target: format!("s3://{}", self.bucket),
                    source: Box::new(e),
                }),
            };
            let step = self.step_result(
                "lifecycle",
                format!(
                    "noncurrent versions expire after {days} days{}",
                    opts.abort_incomplete_days
                        .map(|a| format!("; incomplete multipart uploads aborted after {a} days"))
                        .unwrap_or_default()
                ),
                r,
            );
            // A server without noncurrent-version rules may still take the abort rule alone.
            if step.status != StepStatus::Done {
                steps.push(step);
                if let Some(a) = opts.abort_incomplete_days {
                    let rule = LifecycleRule::builder()
                        .id("infra-operator-abort-incomplete-uploads")
                        .status(ExpirationStatus::Enabled)
                        .filter(filter)
                        .abort_incomplete_multipart_upload(
                            AbortIncompleteMultipartUpload::builder()
                                .days_after_initiation(a as i32)
                                .build(),
                        )
                        .build();
                    let r = match rule {
                        Ok(rule) => self.put_lifecycle(vec![rule]).await,
                        Err(e) => Err(Error::Request {
                            op: "PutBucketLifecycleConfiguration",
                            target: format!("s3://{}", self.bucket),
                            source: Box::new(e),
                        }),
                    };
                    steps.push(self.step_result(
                        "lifecycle",
                        format!("incomplete multipart uploads aborted after {a} days"),
                        r,
                    ));
                }
            } else {
                steps.push(step);
            }
        } else {
            steps.push(skipped("lifecycle"));
        }

        steps.push(if opts.encryption {
            let r = self
                .client
                .put_bucket_encryption()
                .bucket(&self.bucket)
                .server_side_encryption_configuration(
                    ServerSideEncryptionConfiguration::builder()
                        .rules(
                            ServerSideEncryptionRule::builder()
                                .apply_server_side_encryption_by_default(
                                    ServerSideEncryptionByDefault::builder()
                                        .sse_algorithm(ServerSideEncryption::Aes256)
                                        .build()
                                        .map_err(|e| Error::Request {
                                            op: "PutBucketEncryption",
                                            target: format!("s3://{}", self.bucket),
                                            source: Box::new(e),
                                        })?,
                                )
                                .build(),
                        )
                        .build()
                        .map_err(|e| Error::Request {
                            op: "PutBucketEncryption",
                            target: format!("s3://{}", self.bucket),
                            source: Box::new(e),
                        })?,
                )
                .send()
                .await
                .map_err(|e| self.map_err("PutBucketEncryption", None, e));
            self.step_result("encryption", "default SSE-S3 (AES256)".into(), r)
        } else {
            skipped("encryption")
        });
        Ok(steps)
    }
}

fn skipped(feature: &'static str) -> InitStep {
    InitStep {
        feature,
        status: StepStatus::Skipped,
        detail: "not requested".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_ranges() {
        assert_eq!(normalize_prefix("/dev/"), "dev/");
        assert_eq!(normalize_prefix("a/b"), "a/b/");
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(total_from_content_range("bytes 0-9/100"), Some(100));
        assert_eq!(total_from_content_range("bytes 0-9/*"), None);
        assert_eq!(copy_source("b", "a b/ü+%.txt"), "b/a%20b/%C3%BC%2B%25.txt");
    }
}
