//! One kind of object across snapshots, recognised by identity: what the model
//! ([`crate::model::Cache`]) and the DNS index ([`crate::dns::Builder`]) both keep, so that a
//! sync costs the objects in the changed [`Window`], not every object.
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::Window;
use crate::few::Few;

/// The address of an object, identifying it while the `Arc` is held.
pub(crate) fn addr<T>(o: &Arc<T>) -> usize {
    Arc::as_ptr(o) as usize
}

/// The objects of the last snapshot: in order, and by key (more than one object: a duplicate,
/// see [`Tracked::first`]). Holds the `Arc`s, so an address is never reused while it is
/// tracked. An object's key is its own content's (`key` in [`Tracked::take`]), asked again when
/// it leaves, so nothing is kept per object but the `Arc` in two places.
#[derive(Debug)]
pub(crate) struct Tracked<T, K> {
    last: Vec<Arc<T>>,
    by_key: HashMap<K, Few<Arc<T>>>,
    /// The same `Arc` more than once in a snapshot (rare): by address, how many more times.
    again: HashMap<usize, u32>,
    /// Objects without a key (say, no name), by address: how many times.
    keyless: HashMap<usize, u32>,
    /// Distinct objects.
    len: usize,
}

impl<T, K> Default for Tracked<T, K> {
    fn default() -> Self {
        Self {
            last: Vec::new(),
            by_key: HashMap::new(),
            again: HashMap::new(),
            keyless: HashMap::new(),
            len: 0,
        }
    }
}

impl<T, K: Clone + Eq + Hash> Tracked<T, K> {
    /// Takes in a snapshot (`key`: an object's key; the same object must always give the same
    /// key). Adds to `touched` the key of every object in the changed window: new, gone, or
    /// moved (which can change which of two duplicates is first). The keys added are the ones
    /// held, so a caller that keeps them shares them.
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
            let Some(k) = key(o) else {
                let n = self.keyless.entry(addr(o)).or_insert(0);
                *n += 1;
                if *n == 1 {
                    self.len += 1;
                }
                continue;
            };
            // The key held (an equal one given again is dropped).
            let e = self.by_key.entry(k);
            let k = e.key().clone();
            let objs = e.or_default();
            if objs.as_slice().iter().any(|x| Arc::ptr_eq(x, o)) {
                *self.again.entry(addr(o)).or_insert(0) += 1;
            } else {
                objs.push(o.clone());
                self.len += 1;
            }
            touched.extend(Some(k));
        }
        for o in &self.last[w.prefix..w.old_end] {
            let a = addr(o);
            let Some(k) = key(o) else {
                if let Some(n) = self.keyless.get_mut(&a) {
                    *n -= 1;
                    if *n == 0 {
                        self.keyless.remove(&a);
                        self.len -= 1;
                    }
                }
                continue;
            };
            if let Some(n) = self.again.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    self.again.remove(&a);
                }
            } else if let Some(objs) = self.by_key.get_mut(&k) {
                if let Some(i) = objs.as_slice().iter().position(|x| Arc::ptr_eq(x, o)) {
                    objs.remove(i);
                    self.len -= 1;
                }
                if objs.is_empty() {
                    let (held, _) = self.by_key.remove_entry(&k).expect("just found");
                    touched.extend(Some(held));
                    continue;
                }
            }
            let held = self.key(&k).cloned().unwrap_or(k);
            touched.extend(Some(held));
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
        u32::try_from(self.keyless.len()).unwrap_or(u32::MAX)
    }

    /// Objects of the snapshot, counted once each.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::Tracked;

    #[test]
    fn an_object_twice_is_one_object_and_leaving_empties_its_key() {
        let key = |s: &String| (!s.is_empty()).then(|| s.to_uppercase());
        let (a, b, b2, none) = (
            Arc::new("a".to_owned()),
            Arc::new("b".to_owned()),
            Arc::new("b".to_owned()),
            Arc::new(String::new()),
        );
        let mut t = Tracked::default();
        let mut touched = BTreeSet::new();
        let snap = [
            a.clone(),
            a.clone(),
            b.clone(),
            b2.clone(),
            none.clone(),
            none,
        ];
        t.take(&snap, key, &mut touched);
        assert_eq!(touched, BTreeSet::from(["A".to_owned(), "B".to_owned()]));
        assert_eq!(
            t.of(&"A".to_owned()).len(),
            1,
            "the same Arc twice: one object"
        );
        assert_eq!(t.of(&"B".to_owned()).len(), 2, "two objects with one key");
        assert_eq!((t.len(), t.keyless()), (4, 1));
        assert!(Arc::ptr_eq(&t.first(&"B".to_owned(), &snap).unwrap(), &b));
        // `a` once less, `b` gone: `a` stays, `B` has one object left.
        let snap2 = [a.clone(), b2.clone()];
        touched.clear();
        t.take(&snap2, key, &mut touched);
        assert_eq!(t.of(&"A".to_owned()).len(), 1);
        assert!(Arc::ptr_eq(&t.of(&"B".to_owned())[0], &b2));
        assert_eq!((t.len(), t.keyless()), (2, 0));
        t.take(&[], key, &mut touched);
        assert!(t.of(&"A".to_owned()).is_empty() && t.by_key.is_empty() && t.again.is_empty());
        assert_eq!(t.len(), 0);
    }
}
