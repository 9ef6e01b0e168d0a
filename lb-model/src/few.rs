//! [`Few`]: a list that almost always holds one item — an endpoint's addresses, the objects of
//! a key, a Service's slices, a frontend's claims. One item is held in place, more in a
//! boxed slice: no bigger than a vector, and no allocation of its own for the one, where a
//! `Vec` with room for one allocates 16 bytes and more, per entry of maps of tens of thousands.
use serde::{Deserialize, Serialize};

/// One item in place, or a boxed slice (empty, or two and more). Reads like a slice; parses
/// and writes like a list. A boxed slice (16 bytes) leaves room for a niche that tells which:
/// a `Few` of 24-byte strings is 24 bytes and of pointers 16, where with a vector (24 bytes)
/// they were 32.
#[derive(Clone)]
pub enum Few<T> {
    One(T),
    Many(Box<[T]>),
}

/// Equal when the items are (however they are held).
impl<T: PartialEq> PartialEq for Few<T> {
    fn eq(&self, o: &Self) -> bool {
        self.as_slice() == o.as_slice()
    }
}

impl<T: Eq> Eq for Few<T> {}

impl<T> Default for Few<T> {
    fn default() -> Self {
        Self::Many(Box::default())
    }
}

impl<T> std::ops::Deref for Few<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Self::One(x) => std::slice::from_ref(x),
            Self::Many(v) => v,
        }
    }
}

impl<T> From<Vec<T>> for Few<T> {
    fn from(mut v: Vec<T>) -> Self {
        if v.len() == 1 {
            Self::One(v.pop().expect("one item"))
        } else {
            Self::Many(v.into_boxed_slice())
        }
    }
}

impl<T> Few<T> {
    #[must_use]
    pub fn as_slice(&self) -> &[T] {
        self
    }

    /// Into a vector, to change it in place (and back to one item held in place after).
    fn edit<R>(&mut self, f: impl FnOnce(&mut Vec<T>) -> R) -> R {
        let mut v = match std::mem::take(self) {
            Self::One(x) => vec![x],
            Self::Many(v) => v.into_vec(),
        };
        let r = f(&mut v);
        *self = v.into();
        r
    }

    pub fn insert(&mut self, i: usize, x: T) {
        if matches!(self, Self::Many(v) if v.is_empty()) {
            assert!(i == 0, "insert at {i} of an empty list");
            *self = Self::One(x);
            return;
        }
        self.edit(|v| v.insert(i, x));
    }

    pub fn push(&mut self, x: T) {
        let i = self.len();
        self.insert(i, x);
    }

    pub fn remove(&mut self, i: usize) -> T {
        self.edit(|v| v.remove(i))
    }

    pub fn retain(&mut self, f: impl FnMut(&T) -> bool) {
        self.edit(|v| v.retain(f));
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Few<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Serialize> Serialize for Few<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Few<T> {
    /// Absent or `null`: empty, as `k8s-openapi` reads a required list.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default().into())
    }
}

#[cfg(test)]
mod tests {
    use super::Few;

    #[test]
    fn one_is_held_in_place_and_more_in_order() {
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

    #[test]
    fn parses_and_writes_like_a_list() {
        let one: Few<String> = serde_json::from_str(r#"["198.18.0.1"]"#).unwrap();
        assert!(matches!(one, Few::One(_)));
        assert_eq!(&*one, ["198.18.0.1"]);
        let two: Few<String> = serde_json::from_str(r#"["a", "b"]"#).unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(serde_json::to_string(&two).unwrap(), r#"["a","b"]"#);
        let none: Few<String> = serde_json::from_str("null").unwrap();
        assert!(none.is_empty());
        assert_eq!(Few::One(1), Few::Many(Box::new([1])), "equal by items");
    }

    #[test]
    fn is_no_bigger_than_its_item_or_a_boxed_slice() {
        use std::mem::size_of;
        // The item's niche holds which: a 24-byte string, or a pointer beside a boxed slice.
        assert_eq!(size_of::<Few<crate::k8s::Str>>(), 24);
        assert_eq!(size_of::<Few<std::sync::Arc<()>>>(), 16);
        assert_eq!(size_of::<Few<std::sync::Arc<str>>>(), 24);
    }
}
