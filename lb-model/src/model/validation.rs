//! Bad input: the error type, naming object and field, and the strict parsers.
use std::net::IpAddr;

use super::{Frontend, NsName, ObjectRef};

/// Bad input, always naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{object}: {field}: invalid IP address {value:?}: {reason}")]
    BadAddress {
        object: ObjectRef,
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("{object}: {field}: port {value} is outside 1-65535")]
    BadPort {
        object: ObjectRef,
        field: String,
        value: i64,
    },
    #[error("{object}: {field}: unknown protocol {value:?} (expected TCP, UDP or SCTP)")]
    BadProtocol {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: {value} is not an {expected} address")]
    WrongFamily {
        object: ObjectRef,
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{object}: {field}: {frontend} is already served by Service {winner}; skipped")]
    Conflict {
        object: ObjectRef,
        field: String,
        frontend: Frontend,
        winner: NsName,
    },
    #[error("{object}: defined more than once; the first definition is used")]
    Duplicate { object: ObjectRef },
    #[error("{object}: {field}: {value} is outside 1-86400 seconds")]
    BadAffinityTimeout {
        object: ObjectRef,
        field: String,
        value: i64,
    },
    #[error(
        "{object}: spec.healthCheckNodePort: {port} is already used by Service {winner}; skipped"
    )]
    HealthCheckConflict {
        object: ObjectRef,
        port: u16,
        winner: NsName,
    },
    #[error("{object}: {field}: invalid CIDR {value:?}: {reason}; ignored")]
    BadCidr {
        object: ObjectRef,
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("{kind} without metadata.name")]
    MissingName { kind: &'static str },
    #[error("{object}: {field}: {count} backends exceed the limit of {limit}; skipped")]
    TooManyBackends {
        object: ObjectRef,
        field: String,
        count: usize,
        limit: usize,
    },
}

/// Parses an IP literal strictly: IPv4 with leading zeros is refused (CVE-2021-29923: `010.0.0.1`
/// must never mean 8.0.0.1 nor 10.0.0.1).
pub fn parse_ip(s: &str) -> Result<IpAddr, &'static str> {
    if !s.contains(':') && s.split('.').any(|o| o.len() > 1 && o.starts_with('0')) {
        return Err("IPv4 octet with a leading zero (ambiguous, CVE-2021-29923)");
    }
    s.parse::<IpAddr>().map_err(|_| "not an IP literal")
}

pub(crate) fn ns_name(meta: &crate::k8s::ObjectMeta) -> Option<NsName> {
    Some(NsName {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone()?,
    })
}

pub(crate) fn port_u16(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|p| *p != 0)
}
