//! One kind of object across snapshots, recognised by identity: what the model
//! ([`crate::model::Cache`]) and the DNS index ([`crate::dns::Builder`]) both keep, so that a
//! sync costs the objects in the changed [`Window`], not every object.
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::Window;

/// A short list that is almost always one item long (a key's objects, a Service's slices, a
/// frontend's claims): one item is held in place, more in a vector. The size of a vector and
/// no allocation of its own for the one, where a `Vec` with room for one allocates 16 bytes
/// and more per entry of a map of tens of thousands.
#[derive(Debug, Clone)]
pub(crate) enum Few<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Default for Few<T> {
    fn default() -> Self {
        Self::Many(Vec::new())
    }
}

impl<T> Few<T> {
    pub(crate) fn as_slice(&self) -> &[T] {
        match self {
            Self::One(x) => std::slice::from_ref(x),
            Self::Many(v) => v,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// Into a vector, to change it in place (and back to one item held in place after).
    fn edit<R>(&mut self, f: impl FnOnce(&mut Vec<T>) -> R) -> R {
        let mut v = match std::mem::take(self) {
            Self::One(x) => vec![x],
            Self::Many(v) => v,
        };
        let r = f(&mut v);
        *self = if v.len() == 1 {
            Self::One(v.pop().expect("one item"))
        } else {
            v.shrink_to_fit();
            Self::Many(v)
        };
        r
    }

    pub(crate) fn insert(&mut self, i: usize, x: T) {
        if let Self::Many(v) = self
            && v.is_empty()
        {
            *self = Self::One(x);
            return;
        }
        self.edit(|v| v.insert(i, x));
    }

    pub(crate) fn push(&mut self, x: T) {
        let i = self.len();
        self.insert(i, x);
    }

    pub(crate) fn remove(&mut self, i: usize) -> T {
        self.edit(|v| v.remove(i))
    }

    pub(crate) fn retain(&mut self, f: impl FnMut(&T) -> bool) {
        self.edit(|v| v.retain(f));
    }
}

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
    by_key: HashMap<K, Few<Arc<T>>>,
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
                (Some(k), 1) => self.by_key.entry(k.clone()).or_default().push(o.clone()),
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

    /// The key stored equal to `k`, while an object has it (to share it).
    pub(crate) fn key(&self, k: &K) -> Option<&K> {
        self.by_key.get_key_value(k).map(|(k, _)| k)
    }

    /// The objects with key `k`, in no particular order.
    pub(crate) fn of(&self, k: &K) -> &[Arc<T>] {
        self.by_key.get(k).map_or(&[], Few::as_slice)
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

#[cfg(test)]
mod tests {
    use super::Few;

    #[test]
    fn few_holds_one_in_place_and_more_in_order() {
        let mut f = Few::default();
        assert!(f.is_empty());
        f.push(2);
        assert!(matches!(f, Few::One(2)));
        f.insert(0, 1);
        f.push(3);
        assert_eq!(f.as_slice(), [1, 2, 3]);
        assert_eq!(f.remove(1), 2);
        f.retain(|x| *x != 1);
        assert!(matches!(f, Few::One(3)), "back to one held in place: {f:?}");
        f.retain(|_| false);
        assert_eq!(f.len(), 0);
    }
}
