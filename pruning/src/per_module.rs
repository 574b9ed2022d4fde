//! [`PerModule`]: one value per pruned module, the map every per-module quantity (mask values,
//! expected sparsity, targets, multipliers) travels in.

use std::collections::BTreeMap;
use std::ops::Index;

use serde::{Deserialize, Serialize};

use crate::target::PruneModule;

/// One value per module, iterated in [`PruneModule::ALL`] order; serialized as a map keyed by
/// the module's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PerModule<T>(BTreeMap<PruneModule, T>);

impl<T> Default for PerModule<T> {
    fn default() -> Self {
        PerModule(BTreeMap::new())
    }
}

impl<T> PerModule<T> {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// `f(m)` for each of `modules`.
    pub fn from_fn(modules: &[PruneModule], mut f: impl FnMut(PruneModule) -> T) -> Self {
        modules.iter().map(|&m| (m, f(m))).collect()
    }

    /// Set `m`'s value; returns the one it replaces.
    pub fn insert(&mut self, m: PruneModule, v: T) -> Option<T> {
        self.0.insert(m, v)
    }

    /// `m`'s value, if it has one.
    pub fn get(&self, m: PruneModule) -> Option<&T> {
        self.0.get(&m)
    }

    /// `m`'s value, mutably, if it has one.
    pub fn get_mut(&mut self, m: PruneModule) -> Option<&mut T> {
        self.0.get_mut(&m)
    }

    /// Take `m`'s value out.
    pub fn remove(&mut self, m: PruneModule) -> Option<T> {
        self.0.remove(&m)
    }

    /// Whether `m` has a value.
    pub fn contains(&self, m: PruneModule) -> bool {
        self.0.contains_key(&m)
    }

    /// `(module, value)` in module order.
    pub fn iter(&self) -> impl Iterator<Item = (PruneModule, &T)> {
        self.0.iter().map(|(m, v)| (*m, v))
    }

    /// The modules that have a value, in order.
    pub fn modules(&self) -> impl Iterator<Item = PruneModule> + '_ {
        self.0.keys().copied()
    }

    /// The values in module order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.values()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `f(m, v)` for every value.
    pub fn map<U>(self, mut f: impl FnMut(PruneModule, T) -> U) -> PerModule<U> {
        self.0.into_iter().map(|(m, v)| (m, f(m, v))).collect()
    }

    /// `f(m, &v)` for every value.
    pub fn map_ref<U>(&self, mut f: impl FnMut(PruneModule, &T) -> U) -> PerModule<U> {
        self.iter().map(|(m, v)| (m, f(m, v))).collect()
    }
}

/// `per_module[m]`: the value of a module that must have one (as `BTreeMap`'s `Index`, a
/// missing module is a bug and panics, naming it).
impl<T> Index<PruneModule> for PerModule<T> {
    type Output = T;
    fn index(&self, m: PruneModule) -> &T {
        self.0
            .get(&m)
            .unwrap_or_else(|| panic!("no value for the '{}' module", m.name()))
    }
}

impl<T> FromIterator<(PruneModule, T)> for PerModule<T> {
    fn from_iter<I: IntoIterator<Item = (PruneModule, T)>>(iter: I) -> Self {
        PerModule(iter.into_iter().collect())
    }
}

impl<T> IntoIterator for PerModule<T> {
    type Item = (PruneModule, T);
    type IntoIter = std::collections::btree_map::IntoIter<PruneModule, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_module_order_and_serializes_by_name() {
        let m: PerModule<f64> = [
            (PruneModule::QueryHeads, 3.0),
            (PruneModule::Hidden, 1.0),
            (PruneModule::KvHeads, 2.0),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            m.modules().collect::<Vec<_>>(),
            [
                PruneModule::Hidden,
                PruneModule::KvHeads,
                PruneModule::QueryHeads
            ]
        );
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"hidden":1.0,"kv_heads":2.0,"query_heads":3.0}"#);
        assert_eq!(serde_json::from_str::<PerModule<f64>>(&s).unwrap(), m);
        assert_eq!(m[PruneModule::KvHeads], 2.0);
        assert_eq!(m.get(PruneModule::Layer), None);
        let doubled = m.map_ref(|_, v| v * 2.0);
        assert_eq!(doubled[PruneModule::QueryHeads], 6.0);
    }

    #[test]
    #[should_panic(expected = "no value for the 'layer' module")]
    fn a_missing_module_names_itself() {
        let m: PerModule<f64> = PerModule::new();
        let _ = m[PruneModule::Layer];
    }
}
