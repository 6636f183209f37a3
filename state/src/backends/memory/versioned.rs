//! The in-process [`VersionedStore`](crate::recipes::versioned::VersionedStore) (recipe [`versioned`](crate::recipes::versioned)): for tests, examples and a single process.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::StateResult;
use crate::stores::versioned::{CasWrite, Versioned, VersionedStore};

/// A [`VersionedStore`] in process memory.
#[derive(Debug, Default)]
pub struct InMemoryVersionedStore {
    values: Mutex<HashMap<String, Versioned>>,
}

#[async_trait::async_trait]
impl VersionedStore for InMemoryVersionedStore {
    async fn get(&self, key: &str) -> StateResult<Option<Versioned>> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        Ok(values.get(key).cloned())
    }

    async fn compare_and_set(&self, writes: &[CasWrite]) -> StateResult<bool> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let holds = writes
            .iter()
            .all(|w| values.get(&w.key).map_or(0, |v| v.version) == w.expected);
        if holds {
            for w in writes {
                values.insert(
                    w.key.clone(),
                    Versioned {
                        version: w.expected + 1,
                        value: w.value.clone(),
                    },
                );
            }
        }
        Ok(holds)
    }
}
