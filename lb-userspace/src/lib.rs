//! `lb-agent`: learns Services and EndpointSlices and keeps the datapath's BPF maps in sync.
//!
//! Follow a Service through the modules in this order:
//! [`source`] (manifest files) → [`model`] (Service → frontends with backends) →
//! [`sync`] (pure diff against a shadow of the maps, then apply) → [`maps`] (the pinned BPF maps)
//! ← [`loader`] (load, pin, attach, adopt). [`inspect`] reads the pinned maps back.
pub mod model;
pub mod source;
pub mod sync;
