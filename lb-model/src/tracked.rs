//! One kind of object across snapshots, recognised by identity: what the model
//! ([`crate::model::Cache`]) and the DNS index ([`crate::dns::Builder`]) both keep, so that a
//! sync costs the objects in the changed [`Window`], not every object.
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::Window;

/// The address of an object, identifying it while the `Arc` is held.
pub(crate) fn addr<T>(o: &Arc<T>) -> usize {
    Arc::as_ptr(o) as usize
}

/// The objects of the last snapshot: in order, by address (how often the snapshot holds each,
/// and its key; `None`: it has none, say no name), and by key (more than one object: a
/// duplicate, see [`Tracked::first`]). Holds the `Arc`s, so an address is never reused while
/// it is tracked.
#[derive(Debug)]
pub(crate) struct Tracked<T, K> {
    last: Vec<Arc<T>>,
    seen: HashMap<usize, (u32, Option<K>)>,
    by_key: HashMap<K, Vec<Arc<T>>>,
    keyless: u32,
}

impl<T, K> Default for Tracked<T, K> {
    fn default() -> Self {
        Self {
            last: Vec::new(),
            seen: HashMap::new(),
            by_key: HashMap::new(),
            keyless: 0,
        }
    }
}

impl<T, K: Clone + Eq + Hash> Tracked<T, K> {
    /// Takes in a snapshot (`key`: an object's key, asked once per new object). Adds to
    /// `touched` the key of every object in the changed window: new, gone, or moved (which can
    /// change which of two duplicates is first).
    pub(crate) fn take(
        &mut self,
        now: &[Arc<T>],
        key: impl Fn(&T) -> Option<K>,
        touched: &mut impl Extend<K>,
    ) {
        let w = Window::of(&self.last, now);
        if w.is_empty() {
            return;
        }
        // New occurrences first: a moved object is neither new nor gone.
        for o in &now[w.prefix..w.new_end] {
            let e = self.seen.entry(addr(o)).or_insert_with(|| (0, key(o)));
            e.0 += 1;
            match (&e.1, e.0) {
                // Room for one: a key almost always has one object.
                (Some(k), 1) => self
                    .by_key
                    .entry(k.clone())
                    .or_insert_with(|| Vec::with_capacity(1))
                    .push(o.clone()),
                (None, 1) => self.keyless += 1,
                _ => {}
            }
            touched.extend(e.1.clone());
        }
        for o in &self.last[w.prefix..w.old_end] {
            let a = addr(o);
            let Some(e) = self.seen.get_mut(&a) else {
                continue;
            };
            e.0 -= 1;
            let k = e.1.clone();
            if e.0 == 0 {
                self.seen.remove(&a);
                match &k {
                    Some(k) => {
                        if let Some(v) = self.by_key.get_mut(k) {
                            v.retain(|x| !Arc::ptr_eq(x, o));
                            if v.is_empty() {
                                self.by_key.remove(k);
                            }
                        }
                    }
                    None => self.keyless -= 1,
                }
            }
            touched.extend(k);
        }
        w.apply(&mut self.last, now);
    }

    /// The objects with key `k`, in no particular order.
    pub(crate) fn of(&self, k: &K) -> &[Arc<T>] {
        self.by_key.get(k).map_or(&[], Vec::as_slice)
    }

    /// The object with key `k` that comes first in `order` (the snapshot): with one, that one,
    /// without a look.
    pub(crate) fn first(&self, k: &K, order: &[Arc<T>]) -> Option<Arc<T>> {
        match self.of(k) {
            [] => None,
            [one] => Some(one.clone()),
            many => order
                .iter()
                .find(|o| many.iter().any(|m| Arc::ptr_eq(m, o)))
                .cloned(),
        }
    }

    /// Objects of the snapshot without a key.
    pub(crate) fn keyless(&self) -> u32 {
        self.keyless
    }

    /// Objects of the snapshot, counted once each.
    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }
}
