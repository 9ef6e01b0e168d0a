//! A Kubernetes API-server double for Services, EndpointSlices and Nodes: enough of the
//! list/watch protocol for kube-rs watchers, and the failure modes tests need to provoke.
//!
//! * `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`
//!   (with `fieldSelector=metadata.name=…`): a JSON list carrying the current
//!   `metadata.resourceVersion`; keep-alive.
//! * `…?watch=true&resourceVersion=N`: a chunked stream of `ADDED`/`MODIFIED`/`DELETED` events
//!   newer than N, `BOOKMARK`s when asked for, ended after `timeoutSeconds`.
//! * A watch from a resourceVersion older than the retained history gets the API server's
//!   `410 Gone` (an `ERROR` event with a `Status` of code 410, reason `Expired`).
//! * [`ApiServer::cut_watches`] drops every open watch abruptly (no terminating chunk);
//!   [`ApiServer::set_online`]`(false)` also refuses new connections until set back.
//!
//! Loopback only (127.0.0.1, an ephemeral port); one thread per connection.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Value, json};

/// The kinds the double serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlice),
            "/api/v1/nodes" => Some(Self::Node),
            _ => None,
        }
    }

    fn from_object(obj: &Value) -> Self {
        match obj["kind"].as_str() {
            Some("Service") => Self::Service,
            Some("EndpointSlice") => Self::EndpointSlice,
            Some("Node") => Self::Node,
            k => panic!("the API double does not serve kind {k:?}"),
        }
    }

    const fn list_kind(self) -> &'static str {
        match self {
            Self::Service => "ServiceList",
            Self::EndpointSlice => "EndpointSliceList",
            Self::Node => "NodeList",
        }
    }

    const fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    const fn namespaced(self) -> bool {
        !matches!(self, Self::Node)
    }
}

struct Event {
    rv: u64,
    kind: Kind,
    ty: &'static str,
    obj: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Each object with its JSON text, written once when stored: a list of 50,000 objects is
    /// then a concatenation, not 50,000 clones and serializations under the lock (which took
    /// seconds and made the double, not the agent, the slow part of a cold start).
    objects: BTreeMap<(Kind, String, String), (Value, String)>,
    events: Vec<Event>,
    /// Watches may resume from resourceVersions ≥ this; older ones get 410.
    oldest: u64,
    offline: bool,
    /// Bumped to drop every open watch.
    cut: u64,
    /// `METHOD path?query` of every request, for assertions.
    requests: Vec<String>,
    /// How many watches were answered with 410 Gone.
    gone: usize,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// A running double. Dropping it stops it.
pub struct ApiServer {
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    shared: Shared,
    stop: Arc<AtomicBool>,
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl ApiServer {
    /// Starts the double on 127.0.0.1 and writes a kubeconfig for it into `dir`.
    pub fn start(dir: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind API double");
        let addr = listener.local_addr().expect("addr");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster: {{server: 'http://{addr}'}}\n\
                 users:\n- name: lb\n  user: {{token: test-token}}\ncontexts:\n- name: double\n  context: {{cluster: double, user: lb}}\n\
                 current-context: double\n"
            ),
        )
        .expect("write kubeconfig");
        let shared: Shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (sh, st) = (sh.clone(), st.clone());
                thread::spawn(move || serve(conn, &sh, &st));
            }
        });
        Self {
            addr,
            kubeconfig,
            shared,
            stop,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (lock, cv) = &*self.shared;
        let r = f(&mut lock.lock().expect("lock"));
        cv.notify_all();
        r
    }

    /// Creates or replaces an object (as `kubectl apply` would): bumps the resourceVersion and
    /// emits ADDED or MODIFIED. Sets uid and creationTimestamp on creation, as the server does.
    pub fn apply(&self, mut obj: Value) {
        let kind = Kind::from_object(&obj);
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let ns = if kind.namespaced() {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        if kind.namespaced() {
            obj["metadata"]["namespace"] = json!(ns);
        }
        self.with(|s| {
            s.rv += 1;
            let key = (kind, ns, name);
            let old = s.objects.get(&key).map(|(o, _)| o);
            let ty = if old.is_some() { "MODIFIED" } else { "ADDED" };
            let (uid, created) = match old {
                Some(o) => (
                    o["metadata"]["uid"].clone(),
                    o["metadata"]["creationTimestamp"].clone(),
                ),
                // A UUID, as a real API server makes them.
                None => (
                    json!(format!("00000000-0000-4000-8000-{:012x}", s.rv)),
                    json!(now_rfc3339()),
                ),
            };
            obj["metadata"]["uid"] = uid;
            if obj["metadata"]["creationTimestamp"].is_null() {
                obj["metadata"]["creationTimestamp"] = created;
            }
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.events.push(Event {
                rv: s.rv,
                kind,
                ty,
                obj: obj.clone(),
            });
            let json = obj.to_string();
            s.objects.insert(key, (obj, json));
        });
    }

    /// Applies every document of a YAML string.
    pub fn apply_yaml(&self, yaml: &str) {
        for doc in yaml.split("\n---\n") {
            let v: serde_yaml::Value = serde_yaml::from_str(doc).expect("YAML");
            if !v.is_null() {
                self.apply(serde_json::to_value(v).expect("YAML → JSON"));
            }
        }
    }

    /// Deletes an object; emits DELETED with its last state. `false` if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.with(|s| {
            let ns = if kind.namespaced() {
                namespace.to_owned()
            } else {
                String::new()
            };
            let Some((mut obj, _)) = s.objects.remove(&(kind, ns, name.to_owned())) else {
                return false;
            };
            s.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.events.push(Event {
                rv: s.rv,
                kind,
                ty: "DELETED",
                obj,
            });
            true
        })
    }

    /// Drops every open watch connection abruptly.
    pub fn cut_watches(&self) {
        self.with(|s| s.cut += 1);
    }

    /// Forgets the event history: a watch resuming from any earlier resourceVersion gets 410.
    pub fn compact(&self) {
        self.with(|s| {
            s.oldest = s.rv;
            s.events.clear();
        });
    }

    /// Offline: open watches are dropped and new connections are closed at once.
    pub fn set_online(&self, online: bool) {
        self.with(|s| {
            s.offline = !online;
            if !online {
                s.cut += 1;
            }
        });
    }

    /// Every request received so far (`GET path?query`).
    pub fn requests(&self) -> Vec<String> {
        self.with(|s| s.requests.clone())
    }

    /// How many watches were answered with 410 Gone.
    pub fn gone_sent(&self) -> usize {
        self.with(|s| s.gone)
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.with(|s| s.rv)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.with(|s| s.cut += 1);
        let _ = TcpStream::connect(self.addr); // unblock accept()
    }
}

struct Request {
    line: String,
    path: String,
    query: BTreeMap<String, String>,
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            content_length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; content_length];
    r.read_exact(&mut body).ok()?;
    let target = line.split_whitespace().nth(1)?.to_owned();
    let (path, qs) = target.split_once('?').unwrap_or((&target, ""));
    let query = qs
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect();
    Some(Request {
        line: line.trim_end().to_owned(),
        path: path.to_owned(),
        query,
    })
}

fn respond_json(w: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    respond_text(w, status, &body.to_string())
}

fn respond_text(w: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

/// `fieldSelector=metadata.name=X` (the only field selector lb uses).
fn matches(obj: &Value, q: &BTreeMap<String, String>) -> bool {
    match q
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
    {
        Some(name) => obj["metadata"]["name"] == name,
        None => true,
    }
}

fn serve(conn: TcpStream, shared: &Shared, stop: &AtomicBool) {
    let mut w = conn.try_clone().expect("clone stream");
    let mut r = BufReader::new(conn);
    while let Some(req) = read_request(&mut r) {
        let (lock, _) = &**shared;
        {
            let mut s = lock.lock().expect("lock");
            s.requests.push(req.line.clone());
            if s.offline {
                let _ = w.shutdown(Shutdown::Both);
                return;
            }
        }
        let Some(kind) = Kind::from_path(&req.path) else {
            let _ = respond_json(
                &mut w,
                "404 Not Found",
                &status(
                    404,
                    "NotFound",
                    &format!("{} not served by the double", req.path),
                ),
            );
            continue;
        };
        if matches!(
            req.query.get("watch").map(String::as_str),
            Some("true" | "1")
        ) {
            watch(&mut w, kind, &req, shared, stop);
            let _ = w.shutdown(Shutdown::Both);
            return;
        }
        let body = {
            let s = lock.lock().expect("lock");
            // Checked again under the lock the list is built with: nothing changed after going
            // offline may be served.
            if s.offline {
                let _ = w.shutdown(Shutdown::Both);
                return;
            }
            let head = json!({"kind": kind.list_kind(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": s.rv.to_string()}}).to_string();
            let mut body = String::with_capacity(head.len() + 16);
            body.push_str(&head[..head.len() - 1]);
            body.push_str(",\"items\":[");
            let mut first = true;
            for ((k, _, _), (o, json)) in &s.objects {
                if *k == kind && matches(o, &req.query) {
                    if !first {
                        body.push(',');
                    }
                    first = false;
                    body.push_str(json);
                }
            }
            body.push_str("]}");
            body
        };
        if respond_text(&mut w, "200 OK", &body).is_err() {
            return;
        }
    }
}

fn chunk(w: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let line = format!("{v}\n");
    write!(w, "{:x}\r\n{line}\r\n", line.len())?;
    w.flush()
}

fn watch(w: &mut TcpStream, kind: Kind, req: &Request, shared: &Shared, stop: &AtomicBool) {
    let (lock, cv) = &**shared;
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_mins(5), Duration::from_secs);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let end = Instant::now() + timeout;
    if write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let mut s = lock.lock().expect("lock");
    if s.offline {
        return; // went offline between accepting the request and starting the stream
    }
    let requested: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut sent = if requested == 0 { s.rv } else { requested };
    let cut = s.cut;
    let mut last_bookmark = Instant::now();
    loop {
        if sent < s.oldest {
            s.gone += 1;
            let gone = json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {sent} ({})", s.oldest))});
            drop(s);
            let _ = chunk(w, &gone);
            let _ = write!(w, "0\r\n\r\n");
            return;
        }
        let out: Vec<Value> = s
            .events
            .iter()
            .filter(|e| e.rv > sent && e.kind == kind && matches(&e.obj, &req.query))
            .map(|e| json!({"type": e.ty, "object": e.obj}))
            .collect();
        sent = s.rv;
        let (dropped, current) = (s.cut != cut || stop.load(Ordering::SeqCst), s.rv);
        drop(s);
        if dropped {
            // Abrupt: the caller shuts the socket without a terminating chunk. Nothing made
            // after the cut may reach the client (it would through a real cut connection).
            return;
        }
        for ev in &out {
            if chunk(w, ev).is_err() {
                return;
            }
        }
        if Instant::now() >= end {
            let _ = write!(w, "0\r\n\r\n");
            return;
        }
        if bookmarks && last_bookmark.elapsed() > Duration::from_secs(1) {
            let bm = json!({"type": "BOOKMARK", "object": {"kind": format!("{kind:?}"), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": current.to_string()}}});
            if chunk(w, &bm).is_err() {
                return;
            }
            last_bookmark = Instant::now();
        }
        s = lock.lock().expect("lock");
        if s.rv == sent && s.cut == cut {
            s = cv
                .wait_timeout(s, Duration::from_millis(250))
                .expect("wait")
                .0;
        }
    }
}
