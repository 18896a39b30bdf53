//! The admin HTTP endpoint both binaries serve on their admin port: `/healthz` (the process runs),
//! `/readyz` (it can do its job) and `/metrics` (Prometheus, OpenMetrics text), on the shared
//! hardened HTTP server ([`crate::http_server`]).

use crate::http_server::{HttpServer, Limits, service_fn};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Says whether the process is ready, and if not, why.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Registers what both binaries export under their prefix: `ready` (set by the admin endpoint at
/// each scrape) and `certificate_expiry_timestamp_seconds`.
pub fn register_common(registry: &mut Registry, ready: &Gauge, expiry: &crate::cert_expiry::ExpiryGauges) {
    registry.register("ready", "1 when /readyz answers 200, else 0", ready.clone());
    registry.register(
        "certificate_expiry_timestamp_seconds",
        "Unix time at which the first certificate of each TLS file expires",
        expiry.clone(),
    );
}

/// What the admin endpoint serves.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub ready: ReadyCheck,
    /// Set to what `/readyz` would say at every scrape (`<prefix>_ready`), so alerts see readiness.
    pub ready_gauge: Gauge,
}

impl Admin {
    /// Answers one admin request.
    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match path {
            "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => match (self.ready)() {
                Ok(()) => text(StatusCode::OK, "ok\n".into()),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
            },
            "/metrics" => {
                self.ready_gauge.set(i64::from((self.ready)().is_ok()));
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => Response::builder()
                        .status(StatusCode::OK)
                        .header(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "encoding\n".into())),
                    Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n".into()),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    /// Serves the admin endpoint on `listener` with [`Limits::admin`] until `shutdown` resolves.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let service = service_fn(move |req: Request<Incoming>| {
            let response = self.respond(req.method(), req.uri().path());
            async move { Ok::<_, Infallible>(response) }
        });
        HttpServer::new("admin", Limits::admin()).serve(listener, service, shutdown).await
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn body(r: Response<Full<Bytes>>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn readyz_follows_the_check_and_says_why() {
        let flag = Arc::new(AtomicBool::new(false));
        let check = flag.clone();
        let admin = Admin {
            registry: Arc::new(Registry::default()),
            ready: Arc::new(move || {
                if check.load(Ordering::SeqCst) { Ok(()) } else { Err("watch not synced".into()) }
            }),
            ready_gauge: Gauge::default(),
        };
        let r = admin.respond(&Method::GET, "/readyz");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r).await, "not ready: watch not synced\n");
        flag.store(true, Ordering::SeqCst);
        assert_eq!(admin.respond(&Method::GET, "/readyz").status(), StatusCode::OK);
        assert_eq!(admin.respond(&Method::GET, "/healthz").status(), StatusCode::OK);
        assert_eq!(admin.respond(&Method::GET, "/nope").status(), StatusCode::NOT_FOUND);
        assert_eq!(admin.respond(&Method::POST, "/healthz").status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text() {
        let mut registry = Registry::default();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("things", "Things counted", counter.clone());
        let ready_gauge = Gauge::default();
        registry.register("ready", "Ready", ready_gauge.clone());
        counter.inc();
        let flag = Arc::new(AtomicBool::new(false));
        let check = flag.clone();
        let admin = Admin {
            registry: Arc::new(registry),
            ready: Arc::new(move || if check.load(Ordering::SeqCst) { Ok(()) } else { Err("no".into()) }),
            ready_gauge,
        };
        let r = admin.respond(&Method::GET, "/metrics");
        assert!(
            r.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/openmetrics-text")
        );
        let text = body(r).await;
        assert!(text.contains("things_total 1"), "{text}");
        assert!(text.contains("\nready 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        flag.store(true, Ordering::SeqCst);
        let text = body(admin.respond(&Method::GET, "/metrics")).await;
        assert!(text.contains("\nready 1\n"), "readiness is read at each scrape: {text}");
    }
}
