//! The agent's HTTP endpoints: Prometheus metrics (`--metrics-addr`), kube-proxy-style health
//! (`--healthz-addr`) and the healthCheckNodePort listeners. Served by hyper (HTTP/1.1), one
//! response per connection (scrapers and probes, not browsers), GET and HEAD only.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections per listener are served at once (beyond
//! that, new ones wait in the kernel's backlog), a request head must arrive within
//! [`HEAD_TIMEOUT`], and a connection lives at most [`CONNECTION_TIMEOUT`]. A failing `accept()`
//! (EMFILE: out of file descriptors) is logged once per outage and retried after a pause,
//! never in a busy loop.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request,
    body::{Bytes, Incoming},
    header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, info, warn};

/// Connections served at once per listener.
pub const MAX_CONNECTIONS: usize = 64;
/// Time for a client to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept()`.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A response.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    #[must_use]
    pub fn new(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }
}

/// Answers a request path.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Binds `addr` (failing at once, so a misconfigured port stops the agent with a clear error)
/// and serves `handler` in the background. Returns the bound address (for port 0).
pub async fn serve(
    what: &'static str,
    addr: SocketAddr,
    handler: Handler,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(what = %what, addr = %bound, "serving HTTP");
    let _ = serve_listener(what, listener, handler);
    Ok(bound)
}

/// The hyper response for `req`.
fn respond(handler: &Handler, req: &Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let r = match *req.method() {
        Method::GET | Method::HEAD => handler(req.uri().path()),
        _ => Response::new(405, "text/plain", "method not allowed\n".into()),
    };
    let head = *req.method() == Method::HEAD;
    let mut out = hyper::Response::new(Full::new(if head {
        Bytes::new()
    } else {
        Bytes::from(r.body)
    }));
    *out.status_mut() =
        hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let h = out.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    for (k, v) in r.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            h.insert(k, v);
        }
    }
    out
}

/// Serves `handler` on an already bound listener; aborting the returned handle closes it.
pub fn serve_listener(
    what: &'static str,
    listener: TcpListener,
    handler: Handler,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut failing = false;
        loop {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let conn = match listener.accept().await {
                Ok((conn, _)) => {
                    if failing {
                        info!(what, "accepting connections again");
                        failing = false;
                    }
                    conn
                }
                Err(e) => {
                    if !failing {
                        warn!(what, error = %e, "accept failed; pausing before retrying");
                        failing = true;
                    }
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = respond(&handler, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let served = http1::Builder::new()
                    .keep_alive(false)
                    // As Go's net/http writes them (kube-proxy): `Content-Type`, not `content-type`.
                    .title_case_headers(true)
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .serve_connection(TokioIo::new(conn), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, served).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(what, error = %e, "HTTP connection failed"),
                    Err(_) => debug!(what, "HTTP connection timed out"),
                }
            });
        }
    })
    .abort_handle()
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// Sends `request` and reads until the server closes the connection.
    fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read until close");
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_response_per_connection_get_and_head_only() {
        let handler: Handler = Arc::new(|path| {
            let mut r = Response::new(200, "application/json", format!("{{\"path\":\"{path}\"}}"));
            r.headers.push(("X-Content-Type-Options", "nosniff".into()));
            r
        });
        let addr = serve("test", "127.0.0.1:0".parse().unwrap(), handler)
            .await
            .expect("bind");
        let (get, head, post) = tokio::task::spawn_blocking(move || {
            (
                exchange(addr, "GET /healthz?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
                exchange(addr, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
                exchange(
                    addr,
                    "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                ),
            )
        })
        .await
        .expect("client");
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.contains("Content-Type: application/json\r\n"), "{get}");
        assert!(get.contains("X-Content-Type-Options: nosniff\r\n"), "{get}");
        assert!(get.contains("Connection: close\r\n"), "{get}");
        assert!(get.ends_with("{\"path\":\"/healthz\"}"), "{get}");
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    }
}
