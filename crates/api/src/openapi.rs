//! The OpenAPI 3.1 document, generated from the route annotations and the types
//! (`GET /openapi.json`). The test suite checks every request it makes and every response it
//! gets against it.

use utoipa::OpenApi;

use crate::routes::{exec, files};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "infra.operator",
        description = "Run untrusted code in microVMs; OpenAI-compatible Files and Uploads APIs.",
        license(name = "Apache-2.0")
    ),
    paths(
        crate::routes::health,
        crate::routes::metrics,
        crate::routes::openapi,
        crate::routes::languages,
        crate::routes::language,
        crate::routes::rootfs_list,
        crate::routes::rootfs_upload,
        crate::routes::rootfs_download,
        exec::execute,
        exec::execute_stream,
        exec::run_batch,
        files::create_file,
        files::list_files,
        files::get_file,
        files::delete_file,
        files::file_content,
        files::create_upload,
        files::add_part,
        files::complete_upload,
        files::cancel_upload,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "execution", description = "Run code in a fresh microVM"),
        (name = "files", description = "OpenAI Files API"),
        (name = "uploads", description = "OpenAI Uploads API (large files in parts)"),
        (name = "languages", description = "The language table"),
        (name = "images", description = "Root filesystem images"),
        (name = "meta", description = "Health, metrics, this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from `infra.operator api keys create` (required when the server binds a non-loopback address)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}
