//! kas's JWKS fetcher against a real HTTP server on 127.0.0.1 that can stall its answers, with
//! the CI token verifier on top (no control plane needed).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use kas::jwks::HttpJwksFetcher;
use support::oidc::{AUDIENCE, ISSUER, SigningKey, claims};
use tether_kubeproxy_server::{
    AuthError, ClaimMapping, JwksCache, JwksFetcher, JwksSource, OidcVerifier, TrustedIssuer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `jwks` on every path; while `stall` is set, sends the headers and the start of the
/// body, then nothing more, holding the connection open.
async fn stalling_jwks_server(jwks: String, stall: Arc<AtomicBool>) -> String {
    let (listener, addr) = tether_test_support::tokio_listener().await;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (jwks, stall) = (jwks.clone(), Arc::clone(&stall));
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    jwks.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                if stall.load(Ordering::SeqCst) {
                    let _ = conn.write_all(&jwks.as_bytes()[..8]).await;
                    // Held open, silent, until the test's runtime ends.
                    std::future::pending::<()>().await;
                }
                let _ = conn.write_all(jwks.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/oauth/discovery/keys")
}

/// A key set whose body stalls after the headers fails the fetch and the verification within
/// the deadline with an error saying so, rather than leaving the issuer loading forever; once
/// the issuer answers again, the next verification loads the keys and passes.
#[tokio::test]
async fn a_stalled_jwks_body_fails_within_the_deadline_and_a_later_fetch_works() {
    let key = SigningKey::new("k1");
    let jwks = serde_json::json!({ "keys": [key.jwk] }).to_string();
    let stall = Arc::new(AtomicBool::new(true));
    let url = stalling_jwks_server(jwks, Arc::clone(&stall)).await;
    let deadline = Duration::from_millis(500);
    // Far beyond the deadline, so only a hang reaches it.
    let bound = Duration::from_secs(5);
    let fetcher = Arc::new(
        HttpJwksFetcher::new(None)
            .expect("fetcher")
            .with_timeout(deadline),
    );

    let started = Instant::now();
    let err = tokio::time::timeout(bound, fetcher.fetch(&url))
        .await
        .expect("the fetch of a stalled body should end at its deadline")
        .expect_err("a stalled body is an error");
    assert!(started.elapsed() >= deadline, "{:?}", started.elapsed());
    let message = err.to_string();
    assert!(
        message.contains(&url) && message.contains("no complete answer within 500ms"),
        "{message}"
    );

    let issuer = TrustedIssuer {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        jwks: JwksSource::Url(url.clone()),
        claims: ClaimMapping::default(),
        namespaces: None,
    };
    let cache = JwksCache::new([(ISSUER.to_owned(), issuer.jwks.clone())], fetcher)
        .with_min_refresh_interval(Duration::ZERO);
    let verifier = OidcVerifier::with_cache(vec![issuer], cache);
    let token = key.sign(&claims("group/app"));
    let refused = tokio::time::timeout(bound, verifier.verify(&token, SystemTime::now()))
        .await
        .expect("verification should fail at the fetch's deadline, not wait for the body");
    assert!(
        matches!(refused, Err(AuthError::KeysUnavailable { ref issuer }) if issuer == ISSUER),
        "{refused:?}"
    );

    stall.store(false, Ordering::SeqCst);
    let identity = tokio::time::timeout(bound, verifier.verify(&token, SystemTime::now()))
        .await
        .expect("the failed load should be over")
        .expect("the keys load once the issuer answers");
    assert_eq!(identity.project_path, "group/app");
}
