//! The HTTPS listener for the admission webhook: TLS without client certificates (the apiserver
//! calls it), certificate and key re-read on change, `POST /validate/pods` only, bodies capped, a
//! malformed body answered 400; HTTP/1.1 on the shared hardened server (header and request
//! deadlines, connection caps).

use crate::admission::Admission;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use imdsgate_core::http_server::{Budget, HttpServer, Limits, service_fn};
use imdsgate_core::tls::{self, Reloading, TlsError};
use rustls::ServerConfig;
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

const MAX_BODY: usize = 3 << 20;

/// A reloading TLS configuration for the webhook (no client authentication).
pub fn reloading_config(cert: PathBuf, key: PathBuf) -> Result<Arc<Reloading<ServerConfig>>, TlsError> {
    let files = vec![cert.clone(), key.clone()];
    Reloading::new(files, move || {
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(tls::load_certs(&cert)?, tls::load_key(&key)?)
            .map_err(|e| TlsError::Config(format!("webhook certificate {}: {e}", cert.display())))?;
        // HTTP/1.1 only: the limits of the shared server are HTTP/1.1 limits.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    })
}

/// The webhook listener's limits. The caller is the apiserver (one address, or a few), which sends
/// one review per connection at a time and keeps connections alive between reviews.
pub fn limits() -> Limits {
    Limits {
        connections: Budget { total: 512, per_source: 256 },
        // Also the keep-alive idle limit: long enough not to close the apiserver's pooled
        // connections under it all the time.
        header_timeout: Duration::from_secs(10),
        // Reading the body (up to 3 MiB) included; the apiserver gives up after at most 30s.
        request_timeout: Duration::from_secs(15),
        max_concurrent_requests: 256,
        shutdown_grace: Duration::from_secs(10),
        ..Limits::admin()
    }
}

/// Serves the webhook until `shutdown` resolves, with [`limits`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<Reloading<ServerConfig>>,
    admission: Arc<Admission>,
    shutdown: impl Future<Output = ()>,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let admission = admission.clone();
        async move { Ok::<_, Infallible>(handle(&admission, req).await) }
    });
    HttpServer::new("webhook", limits())
        .tls(Arc::new(move || tls.get()))
        .serve(listener, service, shutdown)
        .await
}

async fn handle(admission: &Admission, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/validate/pods" {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n");
    }
    let started = Instant::now();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return text(StatusCode::BAD_REQUEST, "body unreadable or larger than 3 MiB\n"),
    };
    let response = match admission.review(&body).await {
        Ok(review) => match serde_json::to_vec(&review) {
            Ok(json) => {
                let mut r = Response::new(Full::new(Bytes::from(json)));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
                r
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the review\n"),
        },
        Err(why) => text(StatusCode::BAD_REQUEST, &format!("{why}\n")),
    };
    admission.metrics.admission_duration.observe(started.elapsed().as_secs_f64());
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}
