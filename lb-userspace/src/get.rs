//! `lb-agent get services|endpoints`: what the standalone control plane serves — the Services
//! with what was allocated for them and the EndpointSlices made from Pods and Endpoints —
//! printed as `kubectl get` prints them (kubectl's `printService` / `printEndpointSlice`
//! columns), or as the `List` a cluster would return (`-o yaml|json`).
//!
//! The running agent (manifest mode) serves the objects on its `--metrics-addr` under the API
//! server's own paths ([`SERVICES_PATH`], [`SLICES_PATH`]); without one, [`compute`] runs the
//! control plane read-only over the manifests and the state file.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use lb_model::k8s::{core::Service, discovery::EndpointSlice};

use crate::cli::{GetOutput, GetWhat};

/// Where the agent serves its Services (a `List`, JSON).
pub const SERVICES_PATH: &str = "/api/v1/services";
/// Where the agent serves its EndpointSlices (a `List`, JSON).
pub const SLICES_PATH: &str = "/apis/discovery.k8s.io/v1/endpointslices";

/// Problems of `lb-agent get`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no agent answers on {addr} (is `lb-agent run --manifests …` running with this --metrics-addr? \
         Without an agent, pass --manifests DIR and its --state-file)"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}{path}: {what}")]
    Response {
        addr: SocketAddr,
        path: &'static str,
        what: String,
    },
    #[error(transparent)]
    State(#[from] lb_model::control::StateError),
}

/// What the control plane serves.
#[derive(Clone, Debug, Default)]
pub struct Served {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
}

/// A `List` of objects (what `kubectl get -o yaml` prints for several).
#[must_use]
pub fn list<T: serde::Serialize + lb_model::k8s::Object>(items: &[Arc<T>]) -> serde_json::Value {
    let item = |i: &T| {
        let mut v = serde_json::to_value(i).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert("apiVersion".into(), T::API_VERSION.into());
            m.insert("kind".into(), T::KIND.into());
        }
        v
    };
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items.iter().map(|i| item(i)).collect::<Vec<_>>(),
    })
}

/// One `GET` to the agent; the body of a 200.
fn http_get(addr: SocketAddr, path: &'static str) -> Result<String, Error> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|source| Error::Connect { addr, source })?;
    let fail = |what: String| Error::Response { addr, path, what };
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| fail(e.to_string()))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lb-agent\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| fail(e.to_string()))?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("no HTTP response".into()))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(fail(format!(
            "HTTP {status}: {} (the agent serves these in manifest mode only)",
            body.trim()
        )));
    }
    Ok(body.to_owned())
}

fn items<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &'static str,
) -> Result<Vec<Arc<T>>, Error> {
    #[derive(serde::Deserialize)]
    struct List<T> {
        items: Vec<T>,
    }
    let body = http_get(addr, path)?;
    let l: List<T> = serde_json::from_str(&body).map_err(|e| Error::Response {
        addr,
        path,
        what: e.to_string(),
    })?;
    Ok(l.items.into_iter().map(Arc::new).collect())
}

/// What the running agent serves.
pub fn fetch(addr: SocketAddr) -> Result<Served, Error> {
    Ok(Served {
        services: items(addr, SERVICES_PATH)?,
        slices: items(addr, SLICES_PATH)?,
    })
}

/// What an agent on these manifests and this state file would serve (nothing is written).
pub fn compute(
    dir: &Path,
    state_file: &Path,
    ranges: lb_model::control::Ranges,
    node_name: &str,
) -> Result<Served, Error> {
    let state = lb_model::control::load_state(state_file)?;
    let (files, _) = lb_model::manifest::ManifestDir::new(PathBuf::from(dir)).read();
    let mut cp = lb_model::control::ControlPlane::new(ranges, state);
    let (o, _, _) = cp.run(&files, node_name);
    Ok(Served {
        services: o.services,
        slices: o.slices,
    })
}

/// kubectl's `HumanDuration`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (m, h, days) = (s / 60, s / 3600, s / 86_400);
    match () {
        () if s < 120 => format!("{s}s"),
        () if m < 10 => format!("{m}m{}s", s % 60).replace("m0s", "m"),
        () if m < 180 => format!("{m}m"),
        () if h < 8 => format!("{h}h{}m", m % 60).replace("h0m", "h"),
        () if h < 48 => format!("{h}h"),
        () if h < 192 => format!("{days}d{}h", h % 24).replace("d0h", "d"),
        () if days < 730 => format!("{days}d"),
        () => format!("{}y{}d", days / 365, days % 365),
    }
}

fn age(meta: &lb_model::k8s::ObjectMeta, now: SystemTime) -> String {
    let Some(t) = meta.creation_timestamp.as_ref() else {
        return "<unknown>".into();
    };
    let created = SystemTime::UNIX_EPOCH
        + Duration::from_nanos(u64::try_from(t.0.as_nanosecond()).unwrap_or(0));
    now.duration_since(created)
        .map_or_else(|_| "0s".into(), human)
}

/// kubectl's EXTERNAL-IP column.
fn external_ip(s: &Service) -> String {
    let spec = s.spec.clone().unwrap_or_default();
    let external: Vec<lb_model::k8s::Str> = spec.more().external_ips.clone().unwrap_or_default();
    match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ExternalName" => spec.more().external_name.clone().unwrap_or_default().into(),
        "LoadBalancer" => {
            let mut ips: Vec<lb_model::k8s::Str> = s
                .status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .collect();
            ips.extend(external);
            if ips.is_empty() {
                "<pending>".into()
            } else {
                ips.join(",")
            }
        }
        _ if external.is_empty() => "<none>".into(),
        _ => external.join(","),
    }
}

/// kubectl's PORT(S) column: `80:30427/TCP,53/UDP`.
fn ports(s: &Service) -> String {
    let v: Vec<String> = s
        .spec
        .iter()
        .flat_map(|sp| sp.ports.iter().flatten())
        .map(|p| {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            match p.node_port.filter(|n| *n > 0) {
                Some(np) => format!("{}:{np}/{proto}", p.port),
                None => format!("{}/{proto}", p.port),
            }
        })
        .collect();
    if v.is_empty() {
        "<none>".into()
    } else {
        v.join(",")
    }
}

/// First three, then `+ N more...`, as kubectl abbreviates lists.
fn abbreviate<S: std::borrow::Borrow<str>>(v: &[S], empty: &str) -> String {
    match v.len() {
        0 => empty.into(),
        1..=3 => v.join(","),
        n => format!("{} + {} more...", v[..3].join(","), n - 3),
    }
}

/// Aligned columns, two spaces apart, as kubectl's tabwriter.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let width: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c + 1 == cols {
                    v.clone()
                } else {
                    format!("{v:<w$}", w = width[c])
                }
            })
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn namespace(meta: &lb_model::k8s::ObjectMeta) -> String {
    meta.namespace.as_deref().unwrap_or("default").to_owned()
}

fn in_ns(meta: &lb_model::k8s::ObjectMeta, ns: Option<&str>) -> bool {
    ns.is_none_or(|ns| meta.namespace.as_deref().unwrap_or("default") == ns)
}

/// Sorted by namespace, then name (kubectl's order).
fn sorted<'a, T: lb_model::k8s::Object>(v: &'a [Arc<T>], ns: Option<&str>) -> Vec<&'a Arc<T>> {
    let mut v: Vec<&Arc<T>> = v.iter().filter(|o| in_ns(o.metadata(), ns)).collect();
    v.sort_by(|a, b| {
        let key = |o: &T| (o.metadata().namespace.clone(), o.metadata().name.clone());
        key(a).cmp(&key(b))
    });
    v
}

/// The header (with NAMESPACE first for `-A`).
fn header(all: bool, cols: &[&str]) -> Vec<String> {
    let ns = all.then_some("NAMESPACE");
    ns.into_iter()
        .chain(cols.iter().copied())
        .map(str::to_owned)
        .collect()
}

/// kubectl's `get services` rows.
fn service_rows(v: &[&Arc<Service>], all: bool, wide: bool, now: SystemTime) -> Vec<Vec<String>> {
    let cols = [
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
        "SELECTOR",
    ];
    let mut rows = vec![header(all, &cols[..if wide { 7 } else { 6 }])];
    for s in v {
        let spec = s.spec.clone().unwrap_or_default();
        let mut r = Vec::new();
        if all {
            r.push(namespace(&s.metadata));
        }
        r.push(s.metadata.name.as_deref().unwrap_or_default().to_owned());
        r.push(spec.type_.as_deref().unwrap_or("ClusterIP").to_owned());
        r.push(
            spec.cluster_ip
                .as_deref()
                .filter(|c| !c.is_empty())
                .unwrap_or("<none>")
                .to_owned(),
        );
        r.push(external_ip(s));
        r.push(ports(s));
        r.push(age(&s.metadata, now));
        if wide {
            let sel: Vec<String> = spec
                .selector
                .iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            r.push(if sel.is_empty() {
                "<none>".into()
            } else {
                sel.join(",")
            });
        }
        rows.push(r);
    }
    rows
}

/// kubectl's `get endpointslices` rows.
fn slice_rows(v: &[&Arc<EndpointSlice>], all: bool, now: SystemTime) -> Vec<Vec<String>> {
    let mut rows = vec![header(
        all,
        &["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
    )];
    for s in v {
        let mut r = Vec::new();
        if all {
            r.push(namespace(&s.metadata));
        }
        let ports: Vec<String> = s
            .ports
            .iter()
            .flatten()
            .map(|p| p.port.map_or_else(|| "<unset>".into(), |p| p.to_string()))
            .collect();
        let addrs: Vec<lb_model::k8s::Str> = s
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        r.push(s.metadata.name.as_deref().unwrap_or_default().to_owned());
        r.push(s.address_type.to_string());
        r.push(abbreviate(&ports, "<unset>"));
        r.push(abbreviate(&addrs, "<unset>"));
        r.push(age(&s.metadata, now));
        rows.push(r);
    }
    rows
}

/// The output of `lb-agent get`.
pub fn render(
    served: &Served,
    what: GetWhat,
    ns: Option<&str>,
    output: Option<GetOutput>,
    now: SystemTime,
) -> Result<String, serde_json::Error> {
    let value = match what {
        GetWhat::Services => list(
            &sorted(&served.services, ns)
                .into_iter()
                .cloned()
                .collect::<Vec<_>>(),
        ),
        GetWhat::Endpoints => list(
            &sorted(&served.slices, ns)
                .into_iter()
                .cloned()
                .collect::<Vec<_>>(),
        ),
    };
    match output {
        Some(GetOutput::Json) => return Ok(serde_json::to_string_pretty(&value)? + "\n"),
        Some(GetOutput::Yaml) => {
            return Ok(serde_yaml::to_string(&value).unwrap_or_else(|e| format!("# {e}\n")));
        }
        _ => {}
    }
    let rows = match what {
        GetWhat::Services => service_rows(
            &sorted(&served.services, ns),
            ns.is_none(),
            matches!(output, Some(GetOutput::Wide)),
            now,
        ),
        GetWhat::Endpoints => slice_rows(&sorted(&served.slices, ns), ns.is_none(), now),
    };
    if rows.len() == 1 {
        return Ok(match ns {
            Some(ns) => format!("No resources found in {ns} namespace.\n"),
            None => "No resources found\n".into(),
        });
    }
    Ok(table(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(yaml: &str) -> Served {
        let mut errors = Vec::new();
        let o =
            lb_model::manifest::parse_str(Path::new("t.yaml"), yaml, &mut errors).expect("YAML");
        Served {
            services: o.services,
            slices: o.slices,
        }
    }

    #[test]
    fn services_print_as_kubectl_does() {
        let s = served(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t, creationTimestamp: '2026-01-01T00:00:00Z'}\n\
             spec: {type: NodePort, clusterIP: 198.19.0.10, selector: {app: web}, ports: [{port: 80, nodePort: 30427}, {port: 53, protocol: UDP}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: t}\nspec: {type: LoadBalancer, clusterIP: 198.19.0.11, ports: [{port: 80, nodePort: 30001}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: u}\nspec: {clusterIP: None}\n",
        );
        let now = SystemTime::UNIX_EPOCH
            + Duration::from_hours(490_896)
            + Duration::from_hours(3 * 24 + 5);
        let out = render(&s, GetWhat::Services, Some("t"), Some(GetOutput::Wide), now).unwrap();
        assert_eq!(
            out,
            "NAME   TYPE           CLUSTER-IP    EXTERNAL-IP   PORT(S)               AGE         SELECTOR\n\
             lb     LoadBalancer   198.19.0.11   <pending>     80:30001/TCP          <unknown>   <none>\n\
             web    NodePort       198.19.0.10   <none>        80:30427/TCP,53/UDP   3d5h        app=web\n"
        );
        let all = render(&s, GetWhat::Services, None, None, now).unwrap();
        assert!(
            all.starts_with("NAMESPACE") && all.contains("u           other"),
            "{all}"
        );
        assert_eq!(
            render(&s, GetWhat::Services, Some("x"), None, now).unwrap(),
            "No resources found in x namespace.\n"
        );
        let y = render(&s, GetWhat::Services, Some("u"), Some(GetOutput::Yaml), now).unwrap();
        assert!(
            y.contains("kind: List")
                && y.contains("kind: Service")
                && y.contains("clusterIP: None"),
            "{y}"
        );
    }

    #[test]
    fn slices_print_as_kubectl_does() {
        let s = served(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: default}\naddressType: IPv4\n\
             ports: [{port: 8080}, {port: 5353}]\n\
             endpoints: [{addresses: [198.18.0.11]}, {addresses: [198.18.0.12]}, {addresses: [198.18.0.13]}, {addresses: [198.18.0.14]}]\n",
        );
        let out = render(
            &s,
            GetWhat::Endpoints,
            Some("default"),
            None,
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(
            out,
            "NAME    ADDRESSTYPE   PORTS       ENDPOINTS                                         AGE\n\
             web-1   IPv4          8080,5353   198.18.0.11,198.18.0.12,198.18.0.13 + 1 more...   <unknown>\n"
        );
    }

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        for (s, want) in [
            (59, "59s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (30 * 3600, "30h"),
            (3 * 86_400 + 3600, "3d1h"),
            (40 * 86_400, "40d"),
            (800 * 86_400, "2y70d"),
        ] {
            assert_eq!(human(Duration::from_secs(s)), want);
        }
    }
}
