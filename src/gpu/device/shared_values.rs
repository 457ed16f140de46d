//! Values the layers of one `GpuContext` share, each built once per key and kept while a
//! layer holds it: their pipelines. A model's MoE layers mostly have the same activation,
//! gating and stored formats, and every pipeline costs the driver a shader compilation
//! (GL's and a browser's take seconds for one layer's set).
//!
//! Keyed by value and type, not by device: wgpu compares devices by an id that devices of
//! different instances may share, so the store belongs to one context (one device).

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use wgpu::WasmNotSendSync;

// What an entry holds; Send and Sync where wgpu's handles are.
#[cfg(not(target_arch = "wasm32"))]
type AnyValue = dyn Any + Send + Sync;
#[cfg(target_arch = "wasm32")]
type AnyValue = dyn Any;

struct Entry {
    /// A `K`.
    key: Box<AnyValue>,
    /// A `Weak<T>`: the value lives as long as a layer holds it.
    value: Box<AnyValue>,
    /// Whether a layer still holds the value.
    alive: fn(&AnyValue) -> bool,
}

/// The shared values of one context.
#[derive(Default)]
pub struct SharedValues {
    entries: Mutex<Vec<Entry>>,
}

impl fmt::Debug for SharedValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        write!(f, "SharedValues({} entries)", entries.len())
    }
}

impl SharedValues {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `T` a layer already holds for `key`, or a new one from `build` (under the
    /// store's lock: two layers built at once do not build it twice).
    pub fn get_or_build<K, T>(&self, key: &K, build: impl FnOnce() -> T) -> Arc<T>
    where
        K: PartialEq + Clone + WasmNotSendSync + 'static,
        T: WasmNotSendSync + 'static,
    {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        // Values no layer holds any more go.
        entries.retain(|entry| (entry.alive)(&*entry.value));
        let found = entries.iter().find_map(|entry| {
            let same_key = entry.key.downcast_ref::<K>() == Some(key);
            let value = entry.value.downcast_ref::<Weak<T>>()?;
            same_key.then(|| value.upgrade()).flatten()
        });
        if let Some(value) = found {
            return value;
        }
        let value = Arc::new(build());
        entries.push(Entry {
            key: Box::new(key.clone()),
            value: Box::new(Arc::downgrade(&value)),
            alive: |value| {
                value
                    .downcast_ref::<Weak<T>>()
                    .is_some_and(|weak| weak.strong_count() > 0)
            },
        });
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// How many values layers hold now.
    fn held(shared: &SharedValues) -> usize {
        let entries = shared.entries.lock().unwrap();
        entries.iter().filter(|e| (e.alive)(&*e.value)).count()
    }

    #[test]
    fn equal_keys_share_a_value_while_a_layer_holds_it() {
        let shared = SharedValues::new();
        let builds = Cell::new(0);
        let build = || {
            builds.set(builds.get() + 1);
            builds.get()
        };
        let first = shared.get_or_build(&"silu", build);
        let again = shared.get_or_build(&"silu", build);
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(builds.get(), 1);
        // Another key, or the same key for another type: their own values.
        let other_key = shared.get_or_build(&"gelu", build);
        let other_type = shared.get_or_build(&"silu", || 7u8);
        assert_eq!((*other_key, *other_type), (2, 7));
        assert_eq!(held(&shared), 3);
        // Once no layer holds a value it is gone: the next layer builds it anew.
        drop((first, again));
        assert_eq!(held(&shared), 2);
        assert_eq!(*shared.get_or_build(&"silu", build), 3);
    }
}
