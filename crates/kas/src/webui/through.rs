//! Calls to the admin API's routes in process (see `api::in_process_router`), for what needs
//! the replica holding the agent: its syncs under way, reconcile, suspend and resume. The
//! answer is the API's own JSON, decoded into the API's own types.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde::de::DeserializeOwned;
use tower::ServiceExt as _;

use crate::api::ApiError;

/// Largest answer read (a sync report of thousands of objects fits).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// `method path` with `body` as JSON; the decoded answer, or the API's error.
pub async fn call<T: DeserializeOwned>(
    router: &Router,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<T, ApiError> {
    let internal = |e: &dyn std::fmt::Display| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{path}: {e}"))
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .map_err(|e| internal(&e))?;
    let resp = router
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| internal(&e))?;
    let code = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), MAX_ANSWER)
        .await
        .map_err(|e| internal(&e))?;
    if !code.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(ApiError::new(code, message));
    }
    serde_json::from_slice(&bytes).map_err(|e| internal(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Json;
    use axum::routing::{get, post};

    #[tokio::test]
    async fn answers_decode_and_errors_keep_the_apis_message() {
        let r = Router::new()
            .route("/ok", get(|| async { Json(serde_json::json!([1, 2])) }))
            .route(
                "/busy",
                post(|| async {
                    let e = serde_json::json!({"error": "nothing of that is suspended"});
                    (StatusCode::CONFLICT, Json(e))
                }),
            );
        let ok: Vec<i64> = call(&r, Method::GET, "/ok", None).await.expect("ok");
        assert_eq!(ok, [1, 2]);
        let e = call::<serde_json::Value>(&r, Method::POST, "/busy", Some(serde_json::json!({})))
            .await
            .expect_err("409");
        assert_eq!(e.0, StatusCode::CONFLICT);
        assert_eq!(e.1, "nothing of that is suspended");
    }
}
