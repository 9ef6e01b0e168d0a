//! healthCheckNodePort servers: one HTTP listener per LoadBalancer Service with
//! externalTrafficPolicy Local, answering any path as kube-proxy does (docs/semantics.md,
//! Health): 200 when this node has ≥ 1 ready local endpoint, else 503, with
//! `X-Load-Balancing-Endpoint-Weight` and a JSON body. Listeners follow the Services: opened when
//! a port is wanted, updated in place, closed when no longer wanted.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::{
    http::{self, Response},
    metrics::Health,
    model::HealthCheck,
};

struct Server {
    state: Arc<RwLock<HealthCheck>>,
    abort: AbortHandle,
}

/// The running health check listeners.
pub struct HealthChecks {
    bind: IpAddr,
    proxy: Arc<Mutex<Health>>,
    servers: BTreeMap<u16, Server>,
    /// Ports that could not be bound, with the error last reported (each reported once).
    failed: BTreeMap<u16, String>,
}

/// The response for one Service.
#[must_use]
pub fn respond(hc: &HealthCheck, proxy_healthy: bool) -> Response {
    let n = hc.local_endpoints;
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let body = format!(
        r#"{{"service":{{"namespace":{},"name":{}}},"localEndpoints":{n},"serviceProxyHealthy":{proxy_healthy}}}"#,
        quote(&hc.service.namespace),
        quote(&hc.service.name)
    );
    let mut r = Response::new(
        if n > 0 && proxy_healthy { 200 } else { 503 },
        "application/json",
        body,
    );
    r.headers.push(("X-Content-Type-Options", "nosniff".into()));
    r.headers
        .push(("X-Load-Balancing-Endpoint-Weight", n.to_string()));
    r
}

impl HealthChecks {
    #[must_use]
    pub fn new(bind: IpAddr, proxy: Arc<Mutex<Health>>) -> Self {
        Self {
            bind,
            proxy,
            servers: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Makes the listeners match `wanted`. A port that cannot be bound is tried again on every
    /// sync and reported once (again only if its error changes).
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.failed.retain(|port, _| wanted.contains_key(port));
        self.servers.retain(|port, s| {
            let keep = wanted.contains_key(port);
            if !keep {
                s.abort.abort();
                info!(port, "closed health check listener");
            }
            keep
        });
        for (&port, hc) in wanted {
            if let Some(s) = self.servers.get(&port) {
                *s.state.write().expect("health check lock") = hc.clone();
                continue;
            }
            let addr = SocketAddr::new(self.bind, port);
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std);
            match listener {
                Ok(l) => {
                    let state = Arc::new(RwLock::new(hc.clone()));
                    let (st, proxy) = (state.clone(), self.proxy.clone());
                    let handler: http::Handler = Arc::new(move |_path| {
                        let healthy = proxy.lock().expect("health lock").syncing(Instant::now());
                        respond(&st.read().expect("health check lock"), healthy)
                    });
                    let abort = http::serve_listener("healthcheck", l, handler);
                    info!(port, service = %hc.service, "serving health check");
                    self.servers.insert(port, Server { state, abort });
                    self.failed.remove(&port);
                }
                Err(e) => {
                    let e = e.to_string();
                    if self.failed.get(&port) != Some(&e) {
                        warn!(port, service = %hc.service, error = %e, "cannot open health check port; retrying on every sync");
                        self.failed.insert(port, e);
                    }
                }
            }
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.abort.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NsName;

    #[test]
    fn responses_as_kube_proxy_writes_them() {
        let hc = |n| HealthCheck {
            service: NsName {
                namespace: "ns".into(),
                name: "lb".into(),
            },
            local_endpoints: n,
        };
        let r = respond(&hc(2), true);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            r#"{"service":{"namespace":"ns","name":"lb"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        assert!(
            r.headers
                .contains(&("X-Load-Balancing-Endpoint-Weight", "2".into()))
        );
        assert!(
            r.headers
                .contains(&("X-Content-Type-Options", "nosniff".into()))
        );
        assert_eq!(r.content_type, "application/json");
        assert_eq!(respond(&hc(0), true).status, 503);
        let stalled = respond(&hc(3), false);
        assert_eq!(stalled.status, 503);
        assert!(stalled.body.contains(r#""serviceProxyHealthy":false"#));
    }

    #[test]
    fn an_unbindable_port_is_remembered_once_and_forgotten_when_unwanted() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let health = Arc::new(Mutex::new(Health::new(std::time::Duration::from_secs(1))));
        let mut hcs = HealthChecks::new("127.0.0.1".parse().unwrap(), health);
        let hc = HealthCheck {
            service: NsName {
                namespace: "ns".into(),
                name: "lb".into(),
            },
            local_endpoints: 1,
        };
        let wanted = BTreeMap::from([(port, hc)]);
        hcs.sync(&wanted);
        let first = hcs.failed.clone();
        hcs.sync(&wanted);
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(hcs.failed, first, "the same failure is not reported again");
        assert!(hcs.servers.is_empty());
        hcs.sync(&BTreeMap::new());
        assert!(hcs.failed.is_empty(), "an unwanted port is forgotten");
    }
}
