//! `lb-agent`: learns Services and `EndpointSlices` and keeps the datapath's BPF maps in sync.
//!
//! Follow a Service through the modules in this order:
//! [`source`] (manifest files, the API) → [`model`] (Service → frontends with backends) →
//! [`sync`] (pure diff against a shadow of the maps, then apply) → [`maps`] (the pinned BPF maps)
//! ← [`loader`] (load, pin, attach, adopt). [`agent`] is the run loop, [`inspect`] reads the
//! pinned maps back, [`cli`] is the command line.
pub mod agent;
pub mod cli;
pub mod conntrack;
pub mod dns;
pub mod error;
pub mod get;
pub mod healthcheck;
pub mod http;
pub mod inspect;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod source;

// The pure core, under the names the agent's modules have always used.
pub use lb_model::{maglev, model, sync};
