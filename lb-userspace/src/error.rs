//! Errors of `lb-agent run` ([`Error`]) and [`chain`], the one way every module prints an error
//! with its causes. Below `main`, errors are typed (one `thiserror` enum per module); no anyhow.
use std::{error::Error as StdError, net::SocketAddr, path::PathBuf};

use crate::{loader, maps, source::api};

/// Formats an error with its whole `source()` chain: `outer: cause: root cause`.
pub fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Why `lb-agent run` stopped. Each names the flag or object it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the host netns cookie")]
    HostNetns(#[source] Box<loader::Error>),
    #[error("cannot load or attach the datapath")]
    Load(#[source] Box<loader::Error>),
    #[error("cannot read pinned maps")]
    ReadPins(#[source] Box<maps::Error>),
    #[error("cannot listen on {flag} {addr}")]
    Listen {
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start inotify")]
    Inotify(#[source] notify::Error),
    #[error("cannot watch {}", dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error(transparent)]
    Api(#[from] api::Error),
    #[error(transparent)]
    Dns(#[from] crate::dns::Error),
    #[error("standalone control plane (--state-file)")]
    State(#[source] Box<lb_model::control::StateError>),
    #[error("cannot install the {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the sync thread panicked; the datapath keeps what was written (every prefix of a sync is consistent)"
    )]
    SyncPanicked,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
