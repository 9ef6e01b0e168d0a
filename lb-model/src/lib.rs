//! The pure core of `lb`: where a Service becomes map entries.
//!
//! Follow a Service through the modules in this order: [`manifest`] (files → objects; the API
//! source hands the agent the same [`Objects`]) → [`model`] (Services + EndpointSlices →
//! [`model::Desired`]: frontends with their backends) → [`sync`] (a pure diff of the desired state
//! against a [`sync::Shadow`] of the maps, and the write order that keeps the datapath consistent)
//! ; [`maglev`] builds the lookup tables of north-south frontends.
//!
//! Nothing here touches the kernel, a socket or a runtime: the agent (`lb-userspace`) supplies the
//! objects and a [`sync::MapWriter`] for the pinned BPF maps.
use std::sync::Arc;

use crate::k8s::{
    core::{Endpoints, Node, Pod, Service},
    discovery::EndpointSlice,
};

#[cfg(any(test, feature = "proptest"))]
pub mod arbitrary;
pub mod control;
pub mod dns;
pub mod few;
pub mod k8s;
pub mod maglev;
pub mod manifest;
pub mod model;
pub mod sync;
mod tracked;

#[cfg(test)]
mod scratch {
    use std::{
        fs,
        path::{Path, PathBuf},
    };

    /// A fresh directory under the system's temp dir, removed when dropped (a failed test
    /// leaves nothing behind).
    pub(crate) struct Scratch(PathBuf);

    impl Scratch {
        pub(crate) fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
            fs::create_dir_all(&dir).expect("mkdir");
            Self(dir)
        }
    }

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A complete snapshot of the objects the model needs. Objects are shared (`Arc`) with the
/// source's own cache, so a snapshot of 10,000 Services copies pointers, not Services.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// This node, when the source knows it (the API source's watch, or the manifest Node named
    /// `--node-name`).
    pub node: Option<Arc<Node>>,
    /// Manifest source only (the standalone control plane, [`control`]): Pods that selectors
    /// turn into EndpointSlices, legacy `v1 Endpoints` to mirror, and every Node object (zones).
    /// The API source leaves them empty: on a cluster, its controllers already made the slices.
    pub pods: Vec<Arc<Pod>>,
    pub endpoints: Vec<Arc<Endpoints>>,
    pub nodes: Vec<Arc<Node>>,
}

impl Objects {
    pub(crate) fn extend(&mut self, other: &Self) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
        self.pods.extend(other.pods.iter().cloned());
        self.endpoints.extend(other.endpoints.iter().cloned());
        self.nodes.extend(other.nodes.iter().cloned());
    }

    /// Nothing at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.slices.is_empty()
            && self.pods.is_empty()
            && self.endpoints.is_empty()
            && self.nodes.is_empty()
    }
}

/// Where two snapshots of one kind of object differ, by identity: `old[..prefix]` and
/// `new[..prefix]` are the very same objects, as are `old[old_end..]` and `new[new_end..]`; what
/// changed lies in `old[prefix..old_end]` (gone or moved) and `new[prefix..new_end]` (new or
/// moved). Both sources keep their objects in a stable order (the files' order; the API
/// store's), so an edit of a few objects is a window of a few, found with one pass of pointer
/// compares instead of a look-up per object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub prefix: usize,
    pub old_end: usize,
    pub new_end: usize,
}

impl Window {
    #[must_use]
    pub fn of<T>(old: &[Arc<T>], new: &[Arc<T>]) -> Self {
        let prefix = old
            .iter()
            .zip(new)
            .take_while(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        let suffix = old[prefix..]
            .iter()
            .rev()
            .zip(new[prefix..].iter().rev())
            .take_while(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        Self {
            prefix,
            old_end: old.len() - suffix,
            new_end: new.len() - suffix,
        }
    }

    /// Nothing changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.prefix == self.old_end && self.prefix == self.new_end
    }

    /// Makes `old` equal to `new` by replacing only the window (`new`: the snapshot the
    /// window was taken against): reference counts are touched for the changed objects only —
    /// at 50,000 objects, a whole-vector copy is 100,000 atomic operations on as many cache
    /// lines (~3 ms).
    pub fn apply<T>(&self, old: &mut Vec<Arc<T>>, new: &[Arc<T>]) {
        old.splice(
            self.prefix..self.old_end,
            new[self.prefix..self.new_end].iter().cloned(),
        );
        debug_assert_eq!(old.len(), new.len());
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn a_window_holds_exactly_what_changed() {
        let v: Vec<Arc<u8>> = (0..6).map(Arc::new).collect();
        let w = |old: &[Arc<u8>], new: &[Arc<u8>]| {
            let w = Window::of(old, new);
            (w.prefix, w.old_end, w.new_end)
        };
        assert_eq!(w(&v, &v), (6, 6, 6));
        assert!(Window::of(&v, &v.clone()).is_empty());
        // One replaced in the middle.
        let mut r = v.clone();
        r[2] = Arc::new(2);
        assert_eq!(w(&v, &r), (2, 3, 3));
        // One inserted, one removed.
        let mut i = v.clone();
        i.insert(4, Arc::new(9));
        assert_eq!(w(&v, &i), (4, 4, 5));
        assert_eq!(w(&i, &v), (4, 5, 4));
        // Everything new; nothing at all.
        let n: Vec<Arc<u8>> = (0..3).map(Arc::new).collect();
        assert_eq!(w(&v, &n), (0, 6, 3));
        assert_eq!(w(&[], &v), (0, 0, 6));
        // Applying a window makes the old snapshot the new one.
        for (old, new) in [(&v, &r), (&v, &i), (&i, &v), (&v, &n)] {
            let mut o = old.clone();
            Window::of(&o, new).apply(&mut o, new);
            assert!(
                o.iter().zip(new.iter()).all(|(a, b)| Arc::ptr_eq(a, b)) && o.len() == new.len()
            );
        }
        // A repeated object: prefix and suffix never overlap.
        let a = Arc::new(1u8);
        assert_eq!(
            w(std::slice::from_ref(&a), &[a.clone(), a.clone()]),
            (1, 1, 2)
        );
    }
}
