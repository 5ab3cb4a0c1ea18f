//! The Idempotency Log page (SPEC §8) at the admin listener's `/`: one HTML page, its
//! stylesheet, its script and its icon, embedded in the binary (no build step, nothing
//! fetched from elsewhere). The page holds no data, so it is served without the token; it
//! asks for the token and sends it as `Authorization: Bearer` on each `/v1` call.

use axum::Router;
use axum::http::{HeaderName, header};
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("assets/index.html");
const STYLE: &str = include_str!("assets/page.css");
const SCRIPT: &str = include_str!("assets/page.js");
const ICON: &str = include_str!("assets/icon.svg");

/// Only our own script and style run, nothing may frame the page, and the page talks to
/// nothing but the listener it came from: a stored key or body that holds markup can do
/// nothing even if it ever reached the document as markup.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                      connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// `/` and `/assets/*`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/assets/page.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/assets/page.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/assets/icon.svg", get(|| async { asset("image/svg+xml", ICON) }))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    let headers: [(HeaderName, &'static str); 6] = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // The assets change with the binary; the browser asks again rather than run an old script.
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, body)
}
