//! The node dashboard at `/`: one page embedded in the binary (no external assets), polling
//! the public endpoints, and the wallet ones with a token given on the page (or as
//! `/#token=...`, which never reaches the server).

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("../../dashboard/index.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
