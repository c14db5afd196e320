//! HTTP requests from a chosen loopback address (127.0.0.2 plays another client: kas's limits
//! are per client address).

use std::net::IpAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// An HTTP connector whose sockets are bound to `from`.
pub fn connector(from: IpAddr) -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_local_address(Some(from));
    c.set_nodelay(true);
    c
}

pub fn http_client(from: IpAddr) -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(connector(from))
}

/// GET `url` with `authorization` from `from`: status and `Retry-After`.
pub async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    authorization: &str,
) -> (u16, Option<String>) {
    let req = http::Request::get(url)
        .header("authorization", authorization)
        .body(Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    (status, retry)
}
