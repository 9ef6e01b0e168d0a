//! The agent's HTTP endpoints: Prometheus metrics (`--metrics-addr`) and kube-proxy-style
//! health (`--healthz-addr`). GET only, one response per connection: this is for scrapers and
//! kubelet probes, not browsers.
use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::{info, warn};

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

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The path of a `GET` request head, `Err(status)` for anything else.
fn parse_head(head: &str) -> Result<&str, u16> {
    let mut parts = head.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Ok(target.split('?').next().unwrap_or("/")),
        (Some(_), Some(_)) => Err(405),
        _ => Err(400),
    }
}

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

/// Serves `handler` on an already bound listener; aborting the returned handle closes it.
pub fn serve_listener(
    what: &'static str,
    listener: TcpListener,
    handler: Handler,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                // Read the request head (bounded in size and time).
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while len < buf.len() {
                        let n = conn.read(&mut buf[len..]).await?;
                        if n == 0 {
                            break;
                        }
                        len += n;
                        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await;
                if !matches!(read, Ok(Ok(()))) {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..len]);
                let resp = match parse_head(head.lines().next().unwrap_or("")) {
                    Ok(path) => handler(path),
                    Err(status) => {
                        Response::new(status, "text/plain", format!("{}\n", reason(status)))
                    }
                };
                let mut out = format!(
                    "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    resp.status,
                    reason(resp.status),
                    resp.content_type,
                    resp.body.len()
                );
                for (k, v) in &resp.headers {
                    let _ = write!(out, "{k}: {v}\r\n");
                }
                out.push_str("\r\n");
                out.push_str(&resp.body);
                if let Err(e) = conn.write_all(out.as_bytes()).await {
                    warn!(what, error = %e, "HTTP write failed");
                }
            });
        }
    })
    .abort_handle()
}

#[cfg(test)]
mod tests {
    use super::parse_head;

    #[test]
    fn request_heads() {
        assert_eq!(parse_head("GET /healthz HTTP/1.1"), Ok("/healthz"));
        assert_eq!(parse_head("GET /metrics?x=1 HTTP/1.1"), Ok("/metrics"));
        assert_eq!(parse_head("POST /healthz HTTP/1.1"), Err(405));
        assert_eq!(parse_head(""), Err(400));
    }
}
