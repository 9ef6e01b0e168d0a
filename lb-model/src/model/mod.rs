//! Services + `EndpointSlices` → the desired set of frontends, each with its usable backends.
//!
//! This is where a Service becomes frontends (docs/semantics.md, "Frontends" and "Backend choice"). Pure: no
//! I/O, no maps. Bad input is reported per object/field and skipped; everything else is kept.
//!
//! * [`types`]: frontends, their desired state, the node's [`Config`];
//! * `validation`: the [`Error`] type and strict parsers;
//! * `endpoints`: EndpointSlices → endpoints, and which of them a frontend uses;
//! * `frontends`: one Service → its frontends;
//! * `build`: everything together, with the per-object cache and conflicts between Services.
mod build;
mod endpoints;
mod frontends;
pub mod types;
mod validation;

pub use build::{Cache, Changed, build, update};
// Crate-internal helpers the parts use of each other (no `pub`: not part of the API).
use endpoints::{Ep, Selected, Slice, resolve_slice, select};
use frontends::{Claimed, SvcPort, SvcRes, resolve_frontends, resolve_service};
pub use types::*;
pub use validation::{Error, parse_ip};
use validation::{ns_name, port_u16};

#[cfg(test)]
mod tests;
