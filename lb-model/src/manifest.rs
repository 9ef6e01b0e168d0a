//! The manifest source: a directory of files (`lb-agent run --manifests DIR`), read in full on
//! every change (level-triggered).
//!
//! Each `*.yaml`, `*.yml`, `*.json` file may hold several documents, `kind: List` objects as
//! `kubectl get -o yaml` writes them, or (JSON) a top-level array of objects. The kinds read are
//! Service, EndpointSlice, and for the standalone control plane Pod, Endpoints and Node; any
//! other kind is named and skipped, and a file that yields no object at all is reported. A file that cannot be parsed at all (say, half-saved by an
//! editor) keeps contributing what it held last time it parsed, so that an editing mistake never
//! withdraws Services; the error names the file.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::k8s::{
    core::{Endpoints, Node, Pod, Service},
    discovery::EndpointSlice,
};

pub use crate::Objects;
use serde::Deserialize as _;

/// Errors reading manifests. Each names the file (and document) it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read manifest directory {dir}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot read")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML/JSON ({source}); keeping what this file held before")]
    Syntax {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: document {doc}: {kind} {name}: {message}")]
    Object {
        path: PathBuf,
        doc: usize,
        kind: String,
        name: String,
        message: String,
    },
    #[error("{path}: no Kubernetes object lb reads in this file ({KINDS}); skipped")]
    Nothing { path: PathBuf },
}

/// The kinds the manifest source reads, for messages.
pub const KINDS: &str = "Service, EndpointSlice, Endpoints, Pod, Node";

/// Reads a manifest directory, remembering each file's last good contents.
///
/// There is no API server to stamp `metadata.creationTimestamp` on manifest objects, so the
/// first time a Service is seen stands in for it (unless the file sets one). Conflicts between
/// Services are decided by age (docs/semantics.md), so this keeps the incumbent of a VIP:port in
/// place when a newcomer claims it, exactly as on a cluster.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    last_good: BTreeMap<PathBuf, Objects>,
    /// Each file as last parsed (its identity on disk, a digest of its text, its per-object
    /// errors): an unchanged file is not read again, or not parsed again, and its objects stay
    /// the same `Arc`s (everything downstream recognises objects by identity).
    parsed: BTreeMap<PathBuf, Parsed>,
    /// Service (namespace, name) → when it was first seen, and how many of the files' last
    /// good versions define it (at 0 it is gone, and forgotten).
    first_seen: BTreeMap<(crate::k8s::Str, crate::k8s::Str), (k8s_openapi::jiff::Timestamp, u32)>,
}

/// A file as last parsed.
#[derive(Debug)]
struct Parsed {
    sig: Option<Sig>,
    digest: Digest,
    errors: Vec<Error>,
}

/// A file's identity on disk: device, inode, size, modification and change times (ns). The
/// same signature, long enough after the file last changed, is the same contents: a write
/// updates the times, write-then-rename makes a new inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sig {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Sig {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Changed more than 2 s before `now` (seconds since the epoch): file times tick in
    /// jiffies, so a second write soon after the first may leave them as they were, and a
    /// recent signature is not trusted (git's "racily clean" rule).
    fn settled(&self, now: i64) -> bool {
        self.mtime.0.max(self.ctime.0) + 2 < now
    }
}

/// What a file's text is compared by instead of keeping the text (27 MB for 50,000 Services):
/// its length and two independent 64-bit hashes (FNV-1a and SipHash), so that a changed file
/// passing for unchanged is a 2^-128 event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digest(usize, u64, u64);

impl Digest {
    fn of(text: &str) -> Self {
        use std::hash::{Hash as _, Hasher as _};
        let fnv = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        // Fixed keys: the same text, the same digest, in every run.
        let mut sip = std::hash::DefaultHasher::new();
        text.hash(&mut sip);
        Self(text.len(), fnv, sip.finish())
    }
}

fn is_manifest(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

impl ManifestDir {
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last_good: BTreeMap::new(),
            parsed: BTreeMap::new(),
            first_seen: BTreeMap::new(),
        }
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every manifest file. Files are read in name order, so that "the first definition"
    /// of a duplicated object is deterministic. Returns all objects and every problem found.
    pub fn read(&mut self) -> (Objects, Vec<Error>) {
        let mut errors = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(source) => {
                // Keep serving what we had: a vanished directory is an operator problem to report,
                // not a reason to withdraw every Service.
                errors.push(Error::ReadDir {
                    dir: self.dir.clone(),
                    source,
                });
                let mut all = Objects::default();
                self.last_good.values().for_each(|o| all.extend(o));
                return (all, errors);
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_manifest(p))
            .collect();
        files.sort();
        self.forget_gone(&files);

        let mut all = Objects::default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for path in files {
            // Taken before the read: a change after it shows as a new signature next time.
            let sig = Sig::of(&path);
            if let (Some(sig), Some(p), Some(good)) =
                (sig, self.parsed.get(&path), self.last_good.get(&path))
                && p.sig == Some(sig)
                && sig.settled(now)
            {
                errors.extend(p.errors.iter().filter_map(Error::clone_per_file));
                all.extend(good);
                continue;
            }
            match fs::read_to_string(&path) {
                Ok(text)
                    if self
                        .parsed
                        .get(&path)
                        .is_some_and(|p| p.digest == Digest::of(&text))
                        && self.last_good.contains_key(&path) =>
                {
                    let p = self.parsed.get_mut(&path).expect("checked");
                    p.sig = sig;
                    errors.extend(p.errors.iter().filter_map(Error::clone_per_file));
                    all.extend(&self.last_good[&path]);
                }
                Ok(text) => match parse_str(&path, &text, &mut errors) {
                    Ok(mut objs) => {
                        self.stamp(&mut objs);
                        if let Some(prev) = self.last_good.get(&path) {
                            keep_unchanged(&mut objs, prev);
                        }
                        all.extend(&objs);
                        let errs = errors
                            .iter()
                            .filter_map(Error::clone_per_file)
                            .filter(|e| e.file() == Some(path.as_path()))
                            .collect();
                        self.parsed.insert(
                            path.clone(),
                            Parsed {
                                sig,
                                digest: Digest::of(&text),
                                errors: errs,
                            },
                        );
                        if let Some(old) = self.last_good.insert(path, objs) {
                            self.unsee(&old);
                        }
                    }
                    Err(e) => {
                        errors.push(e);
                        if let Some(old) = self.last_good.get(&path) {
                            all.extend(old);
                        }
                    }
                },
                Err(source) => {
                    errors.push(Error::ReadFile {
                        path: path.clone(),
                        source,
                    });
                    if let Some(old) = self.last_good.get(&path) {
                        all.extend(old);
                    }
                }
            }
        }
        (all, errors)
    }

    /// Forgets the files that are no longer there.
    fn forget_gone(&mut self, files: &[PathBuf]) {
        let present: BTreeSet<&PathBuf> = files.iter().collect();
        let gone: Vec<PathBuf> = self
            .last_good
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(old) = self.last_good.remove(&p) {
                self.unsee(&old);
            }
        }
        self.parsed.retain(|p, _| present.contains(p));
    }

    /// A file version that no longer counts (replaced, or its file gone): the first-seen times
    /// of Services no file defines any more are forgotten.
    fn unsee(&mut self, old: &Objects) {
        for svc in &old.services {
            let Some(key) = svc_key(svc) else { continue };
            if let Some((_, n)) = self.first_seen.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.first_seen.remove(&key);
                }
            }
        }
    }

    /// Gives every freshly parsed Service without a creationTimestamp the time it was first seen.
    fn stamp(&mut self, objs: &mut Objects) {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let now = k8s_openapi::jiff::Timestamp::from_nanosecond(since_epoch.as_nanos() as i128)
            .unwrap_or_default();
        for svc in &mut objs.services {
            let Some(key) = svc_key(svc) else { continue };
            let (seen, n) = self.first_seen.entry(key).or_insert((now, 0));
            *n += 1;
            let seen = *seen;
            if svc.metadata.creation_timestamp.is_none() {
                // Freshly parsed: the Arc is not shared yet, so this does not copy.
                Arc::make_mut(svc).metadata.creation_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(seen));
            }
        }
    }
}

/// Objects of a re-read file that are equal to what the file held before keep their old
/// `Arc`: everything downstream (control plane, model, DNS) caches by identity, so an edit of
/// one object in a file recomputes that object only.
fn keep_unchanged(objs: &mut Objects, prev: &Objects) {
    fn same<T>(new: &mut [Arc<T>], old: &[Arc<T>])
    where
        T: PartialEq + crate::k8s::Object,
    {
        let key = |o: &T| (o.metadata().namespace.clone(), o.metadata().name.clone());
        let by_key: std::collections::HashMap<_, &Arc<T>> =
            old.iter().map(|o| (key(o), o)).collect();
        for n in new.iter_mut() {
            if let Some(o) = by_key.get(&key(n))
                && ***o == **n
            {
                *n = Arc::clone(o);
            }
        }
    }
    same(&mut objs.services, &prev.services);
    same(&mut objs.slices, &prev.slices);
    same(&mut objs.pods, &prev.pods);
    same(&mut objs.endpoints, &prev.endpoints);
    same(&mut objs.nodes, &prev.nodes);
}

impl Error {
    /// The file a per-file problem is about ([`Error::Object`], [`Error::Nothing`]).
    fn file(&self) -> Option<&Path> {
        match self {
            Self::Object { path, .. } | Self::Nothing { path } => Some(path),
            _ => None,
        }
    }

    /// A copy of a per-file problem (what a cached, unchanged file keeps reporting).
    fn clone_per_file(&self) -> Option<Self> {
        match self {
            Self::Nothing { path } => Some(Self::Nothing { path: path.clone() }),
            Self::Object {
                path,
                doc,
                kind,
                name,
                message,
            } => Some(Self::Object {
                path: path.clone(),
                doc: *doc,
                kind: kind.clone(),
                name: name.clone(),
                message: message.clone(),
            }),
            _ => None,
        }
    }
}

fn svc_key(svc: &Service) -> Option<(crate::k8s::Str, crate::k8s::Str)> {
    Some((
        svc.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.metadata.name.clone()?,
    ))
}

/// Parses one file's text. `Err` only when the file as a whole is unreadable YAML; bad single
/// objects are pushed to `errors` and skipped.
///
/// Documents are parsed in parallel (one chunk of consecutive documents per CPU) and merged in
/// file order. A syntax error anywhere rejects the whole file: a half-written file must not
/// count as "these objects were deleted".
pub fn parse_str(path: &Path, text: &str, errors: &mut Vec<Error>) -> Result<Objects, Error> {
    let docs = split_documents(text);
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(docs.len().div_ceil(256).max(1));
    let per = docs.len().div_ceil(threads).max(1);
    let parsed: Vec<Result<(Objects, Vec<Error>), Error>> = std::thread::scope(|sc| {
        let handles: Vec<_> = docs
            .chunks(per)
            .enumerate()
            .map(|(c, chunk)| {
                sc.spawn(move || {
                    let mut out = Objects::default();
                    let mut errs = Vec::new();
                    for (j, doc) in chunk.iter().enumerate() {
                        parse_document(path, c * per + j + 1, doc, &mut out, &mut errs)?;
                    }
                    Ok((out, errs))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("manifest parser thread"))
            .collect()
    });
    let mut out = Objects::default();
    let mut problems = 0;
    for r in parsed {
        let (o, e) = r?;
        out.extend(&o);
        problems += e.len();
        errors.extend(e);
    }
    if out.is_empty() && problems == 0 {
        errors.push(Error::Nothing {
            path: path.to_owned(),
        });
    }
    Ok(out)
}

/// Splits a YAML stream at its document markers: a `---` at the start of a line, alone or
/// followed by a space. (YAML only recognises markers in column 0, where no block scalar or
/// indented content can be, so this is the stream's own document structure.) The text of each
/// document keeps its marker line, so `--- {a: 1}` still parses.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker && pos > start {
            docs.push(&text[start..pos]);
            start = pos;
        }
        pos += line.len();
    }
    if pos > start {
        docs.push(&text[start..pos]);
    }
    docs
}

/// One document (possibly empty, or a comment only) into `out`; `Err` on a syntax error.
fn parse_document(
    path: &Path,
    doc: usize,
    text: &str,
    out: &mut Objects,
    errors: &mut Vec<Error>,
) -> Result<(), Error> {
    // The common case, a block-style Service or EndpointSlice: straight into its type, no
    // intermediate tree (about half the parse time). Anything else takes the general path.
    match top_level_kind(text) {
        Some(("Service", "v1")) => {
            return typed::<Service>(path, doc, text, "Service", out, errors, |o, s| {
                o.services.push(Arc::new(s));
            });
        }
        Some(("EndpointSlice", "discovery.k8s.io/v1")) => {
            return typed::<EndpointSlice>(
                path,
                doc,
                text,
                "EndpointSlice",
                out,
                errors,
                |o, s| {
                    o.slices.push(Arc::new(s));
                },
            );
        }
        Some(("Pod", "v1")) => {
            return typed::<Pod>(path, doc, text, "Pod", out, errors, |o, p| {
                o.pods.push(Arc::new(p));
            });
        }
        _ => {}
    }
    // Normally exactly one document (none when empty); all of them if the split missed a
    // marker, so nothing is ever dropped.
    for d in serde_yaml::Deserializer::from_str(text) {
        let v = serde_yaml::Value::deserialize(d).map_err(|source| Error::Syntax {
            path: path.to_owned(),
            source,
        })?;
        if !v.is_null() {
            collect(path, doc, v, out, errors); // null: empty document (a trailing `---`)
        }
    }
    Ok(())
}

/// `kind` and `apiVersion` of a document whose top level is a block mapping with exactly one
/// `kind: X` and one `apiVersion: Y` line in column 0 (plain scalars); `None` otherwise.
fn top_level_kind(text: &str) -> Option<(&str, &str)> {
    let mut kind = None;
    let mut api = None;
    for line in text.lines() {
        let field = |prefix: &str| {
            line.strip_prefix(prefix)
                .map(|v| v.split('#').next().unwrap_or("").trim())
                .filter(|v| !v.is_empty() && !v.starts_with(['"', '\'', '{', '[', '&', '*', '!']))
        };
        if let Some(k) = field("kind:") {
            if kind.replace(k).is_some() {
                return None;
            }
        } else if let Some(a) = field("apiVersion:")
            && api.replace(a).is_some()
        {
            return None;
        }
    }
    Some((kind?, api?))
}

/// A document of a known type, deserialized straight into it; a bad object is reported by name
/// (read from the general tree, on the error path only) and skipped.
fn typed<T: serde::de::DeserializeOwned>(
    path: &Path,
    doc: usize,
    text: &str,
    kind: &str,
    out: &mut Objects,
    errors: &mut Vec<Error>,
    push: impl FnOnce(&mut Objects, T),
) -> Result<(), Error> {
    match serde_yaml::from_str::<T>(text) {
        Ok(v) => {
            push(out, v);
            Ok(())
        }
        Err(e) => {
            // Syntax errors reject the file; a type error names the object.
            let v: serde_yaml::Value =
                serde_yaml::from_str(text).map_err(|source| Error::Syntax {
                    path: path.to_owned(),
                    source,
                })?;
            let (_, name) = describe(&v);
            errors.push(Error::Object {
                path: path.to_owned(),
                doc,
                kind: kind.to_owned(),
                name,
                message: e.to_string(),
            });
            Ok(())
        }
    }
}

fn describe(v: &serde_yaml::Value) -> (String, String) {
    let kind = v
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("<no kind>")
        .to_owned();
    let meta = v.get("metadata");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<no name>");
    (kind, format!("{ns}/{name}"))
}

/// Deserializes `v` as `T` and pushes it, or names the object's problem.
fn take<T: serde::de::DeserializeOwned>(
    v: serde_yaml::Value,
    to: &mut Vec<Arc<T>>,
) -> Result<(), String> {
    serde_yaml::from_value::<T>(v)
        .map(|t| to.push(Arc::new(t)))
        .map_err(|e| e.to_string())
}

fn collect(
    path: &Path,
    doc: usize,
    v: serde_yaml::Value,
    out: &mut Objects,
    errors: &mut Vec<Error>,
) {
    // A JSON file whose top level is an array of objects: a list without the envelope.
    if let serde_yaml::Value::Sequence(items) = v {
        for item in items {
            collect(path, doc, item, out, errors);
        }
        return;
    }
    let (kind, name) = describe(&v);
    let api = v
        .get("apiVersion")
        .and_then(|a| a.as_str())
        .unwrap_or("")
        .to_owned();
    let fail = |message: String| Error::Object {
        path: path.to_owned(),
        doc,
        kind: kind.clone(),
        name: name.clone(),
        message,
    };
    let r = match (kind.as_str(), api.as_str()) {
        (k, _) if k == "List" || k.ends_with("List") => {
            let items = match v {
                serde_yaml::Value::Mapping(mut m) => m.remove("items"),
                _ => None,
            };
            match items {
                Some(serde_yaml::Value::Sequence(items)) => {
                    for item in items {
                        collect(path, doc, item, out, errors);
                    }
                    Ok(())
                }
                None | Some(serde_yaml::Value::Null) => Ok(()),
                Some(_) => Err("items: expected a list".to_owned()),
            }
        }
        ("Service", "v1") => take::<Service>(v, &mut out.services),
        ("EndpointSlice", "discovery.k8s.io/v1") => take::<EndpointSlice>(v, &mut out.slices),
        ("Pod", "v1") => take::<Pod>(v, &mut out.pods),
        ("Endpoints", "v1") => take::<Endpoints>(v, &mut out.endpoints),
        ("Node", "v1") => take::<Node>(v, &mut out.nodes),
        ("Service" | "EndpointSlice" | "Pod" | "Endpoints" | "Node", _) => {
            Err(format!("unsupported apiVersion {api:?}"))
        }
        // Other kinds (Deployments, ConfigMaps, …) may share the directory: named once, so a
        // typo in `kind:` does not silently lose an object.
        _ => Err(format!(
            "kind {kind:?} (apiVersion {api:?}) is not one lb reads ({KINDS}); skipped"
        )),
    };
    if let Err(message) = r {
        errors.push(fail(message));
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use crate::scratch::Scratch;

    fn parse(text: &str) -> (Objects, Vec<Error>) {
        let mut errors = Vec::new();
        let o = parse_str(Path::new("t.yaml"), text, &mut errors).expect("valid YAML");
        (o, errors)
    }

    #[test]
    fn documents_split_at_column_zero_markers_only() {
        let t = "a: 1\n---\nb: |\n  ---\n  x\n--- {c: 3}\n  ---\n---\n";
        let d = split_documents(t);
        assert_eq!(
            d,
            vec![
                "a: 1\n",
                "---\nb: |\n  ---\n  x\n",
                "--- {c: 3}\n  ---\n",
                "---\n"
            ]
        );
        assert_eq!(split_documents(""), Vec::<&str>::new());
    }

    #[test]
    fn many_documents_parse_in_parallel_in_file_order() {
        let mut text = String::new();
        for i in 0..2000 {
            let _ = write!(
                text,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n}}\nspec: {{clusterIP: 198.19.{}.{}, ports: [{{port: 80}}]}}\n",
                i / 250,
                1 + i % 250
            );
        }
        let (o, errors) = parse(&text);
        assert!(errors.is_empty(), "{errors:?}");
        let names: Vec<String> = o
            .services
            .iter()
            .map(|s| s.metadata.name.as_deref().unwrap().to_owned())
            .collect();
        assert_eq!(names.len(), 2000);
        assert!(names.iter().enumerate().all(|(i, n)| *n == format!("s{i}")));
        // A syntax error in the last document rejects the whole file.
        let mut broken = text.clone();
        broken.push_str("---\nkind: [unclosed\n");
        let mut errs = Vec::new();
        assert!(parse_str(Path::new("x.yaml"), &broken, &mut errs).is_err());
    }

    #[test]
    fn multi_document_and_lists() {
        let (o, errors) = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 198.19.0.1, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b, namespace: x}\n  spec: {clusterIP: 198.19.0.2}\n\
             - apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {name: b-1, namespace: x}\n  addressType: IPv4\n  endpoints: []\n---\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(o.services.len(), 2);
        assert_eq!(o.slices.len(), 1);
    }

    #[test]
    fn json_is_accepted() {
        let (o, errors) = parse(
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"j"},"spec":{"clusterIP":"198.19.0.3"}}"#,
        );
        assert!(errors.is_empty());
        assert_eq!(o.services[0].metadata.name.as_deref(), Some("j"));
    }

    #[test]
    fn a_bad_object_is_named_and_the_rest_kept() {
        let (o, errors) = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: ns1}\nspec: {ports: [{port: eighty}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {clusterIP: 198.19.0.1}\n",
        );
        assert_eq!(o.services.len(), 1);
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(
            msg.contains("document 1") && msg.contains("Service ns1/bad"),
            "{msg}"
        );
    }

    #[test]
    fn other_kinds_are_named_and_skipped() {
        let (o, errors) = parse(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
        );
        assert_eq!(o.services.len(), 1);
        let [e] = errors.as_slice() else {
            panic!("one error expected: {errors:?}")
        };
        let msg = e.to_string();
        assert!(
            msg.contains("Deployment default/d") && msg.contains("is not one lb reads"),
            "{msg}"
        );
    }

    #[test]
    fn pods_endpoints_and_nodes_are_read() {
        let (o, errors) = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {app: a}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 198.18.0.5}\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {name: db}\nsubsets: [{addresses: [{ip: 198.18.0.9}], ports: [{port: 5432}]}]\n---\n\
             apiVersion: v1\nkind: NodeList\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((o.pods.len(), o.endpoints.len(), o.nodes.len()), (1, 1, 1));
    }

    #[test]
    fn a_json_array_of_objects_is_a_list() {
        let (o, errors) = parse(
            r#"[{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"}},
                {"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[]}}]"#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((o.services.len(), o.pods.len()), (1, 1));
    }

    #[test]
    fn a_file_with_no_object_is_reported() {
        for text in ["", "# just a comment\n", "[]"] {
            let (o, errors) = parse(text);
            assert!(o.is_empty());
            assert!(
                matches!(errors.as_slice(), [Error::Nothing { .. }]),
                "{text:?}: {errors:?}"
            );
        }
    }

    #[test]
    fn services_are_stamped_with_the_time_first_seen() {
        let dir = Scratch::new("lb-src-stamp");
        fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
        )
        .expect("write");
        let mut m = ManifestDir::new(&*dir);
        let t1 = m.read().0.services[0]
            .metadata
            .creation_timestamp
            .clone()
            .expect("stamped");
        std::thread::sleep(std::time::Duration::from_millis(5));
        fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
        )
        .expect("write");
        let (o, _) = m.read();
        let ts = |n: &str| {
            o.services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(n))
                .unwrap()
                .metadata
                .creation_timestamp
                .clone()
                .unwrap()
        };
        assert_eq!(ts("a"), t1, "stable across reads");
        assert!(ts("b").0 > t1.0, "a newcomer is younger");
        let stamp = |m: &mut ManifestDir, n: &str| {
            m.read()
                .0
                .services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(n))
                .and_then(|s| s.metadata.creation_timestamp.clone())
        };
        // `a` moves from a.yaml into b.yaml: the same Service, as old as it was.
        fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: b}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
        )
        .expect("write");
        assert_eq!(stamp(&mut m, "a"), Some(t1.clone()), "moved, not new");
        fs::remove_file(dir.join("a.yaml")).expect("rm");
        assert_eq!(
            stamp(&mut m, "a"),
            Some(t1.clone()),
            "still defined in b.yaml"
        );
        // Gone from every file, then back: a newcomer.
        fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
        )
        .expect("write");
        assert_eq!(stamp(&mut m, "a"), None);
        std::thread::sleep(std::time::Duration::from_millis(5));
        fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
        )
        .expect("write");
        assert!(
            stamp(&mut m, "a").expect("back").0 > t1.0,
            "forgotten, then new"
        );
    }

    /// A file that has not changed for a while is not read again (its signature says so); an
    /// in-place rewrite of the same size after that is still seen.
    #[test]
    fn a_settled_file_is_trusted_by_its_signature_and_a_rewrite_is_still_seen() {
        let dir = Scratch::new("lb-src-sig");
        let f = dir.join("a.yaml");
        let svc = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{clusterIP: {ip}}}\n"
            )
        };
        fs::write(&f, svc("198.19.0.1")).expect("write");
        let mut m = ManifestDir::new(&*dir);
        let first = m.read().0.services[0].clone();
        std::thread::sleep(std::time::Duration::from_millis(3100));
        assert!(
            Sig::of(&f).expect("sig").settled(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_secs() as i64
            )
        );
        let again = m.read().0.services[0].clone();
        assert!(
            Arc::ptr_eq(&first, &again),
            "settled and unchanged: the same object"
        );
        // Same size, same inode, written in place.
        fs::write(&f, svc("198.19.0.2")).expect("rewrite");
        let changed = m.read().0.services[0].clone();
        assert_eq!(
            changed.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
            Some("198.19.0.2")
        );
    }

    #[test]
    fn an_unchanged_file_keeps_its_objects_and_errors() {
        let dir = Scratch::new("lb-src-cache");
        fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: x}\n").expect("write");
        let mut m = ManifestDir::new(&*dir);
        let (o1, e1) = m.read();
        let (o2, e2) = m.read();
        assert!(
            Arc::ptr_eq(&o1.services[0], &o2.services[0]),
            "same objects for unchanged text"
        );
        assert_eq!(
            (e1.len(), e2.len()),
            (1, 1),
            "the bad object is reported on every read"
        );
        fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, labels: {x: y}}\n",
        )
        .expect("write");
        let (o3, e3) = m.read();
        assert!(!Arc::ptr_eq(&o1.services[0], &o3.services[0]) && e3.is_empty());
        // Another object added to the file: the unchanged one keeps its identity.
        fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, labels: {x: y}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
        )
        .expect("write");
        let (o4, _) = m.read();
        assert!(
            Arc::ptr_eq(&o3.services[0], &o4.services[0]),
            "unchanged object, same Arc"
        );
        assert_eq!(o4.services.len(), 2);
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_contents() {
        let dir = Scratch::new("lb-src-test");
        let f = dir.join("svc.yaml");
        fs::write(
            &f,
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 198.19.0.1}\n",
        )
        .expect("write");
        let mut m = ManifestDir::new(&*dir);
        let (o, e) = m.read();
        assert_eq!((o.services.len(), e.len()), (1, 0));
        fs::write(
            &f,
            "apiVersion: v1\nkind: Service\nmetadata: {name: a\n  spec: [",
        )
        .expect("write");
        let (o, e) = m.read();
        assert_eq!(o.services.len(), 1, "last good contents kept");
        assert!(matches!(e.as_slice(), [Error::Syntax { .. }]), "{e:?}");
        fs::remove_file(&f).expect("rm");
        let (o, _) = m.read();
        assert!(
            o.services.is_empty(),
            "a deleted file withdraws its objects"
        );
    }
}
