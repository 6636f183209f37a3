//! The in-process [`FencedStore`](crate::recipes::fenced::FencedStore) (recipe [`fenced`](crate::recipes::fenced)): for tests, examples and a single process.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::StateResult;
use crate::stores::fenced::{FencedStore, FencedValue, stale};

/// The highest accepted token of a key, and its last written value.
type Entry = (u64, Option<Vec<u8>>);

/// A [`FencedStore`] in process memory.
#[derive(Debug, Default)]
pub struct InMemoryFencedStore {
    values: Mutex<HashMap<String, Entry>>,
}

impl InMemoryFencedStore {
    /// Raises `key`'s highest token to `token` unless it is lower; the entry.
    fn raise<'a>(
        values: &'a mut HashMap<String, Entry>,
        key: &str,
        token: u64,
    ) -> StateResult<&'a mut Entry> {
        let entry = values.entry(key.to_owned()).or_insert((0, None));
        if token < entry.0 {
            return Err(stale(key, token, entry.0));
        }
        entry.0 = token;
        Ok(entry)
    }
}

fn value_of((token, value): &Entry) -> Option<FencedValue> {
    value.as_ref().map(|value| FencedValue {
        token: *token,
        value: value.clone(),
    })
}

#[async_trait::async_trait]
impl FencedStore for InMemoryFencedStore {
    async fn write(&self, key: &str, token: u64, value: &[u8]) -> StateResult<()> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        Self::raise(&mut values, key, token)?.1 = Some(value.to_vec());
        Ok(())
    }

    async fn read(&self, key: &str) -> StateResult<Option<FencedValue>> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        Ok(values.get(key).and_then(value_of))
    }

    async fn fence(&self, key: &str, token: u64) -> StateResult<Option<FencedValue>> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        Ok(value_of(Self::raise(&mut values, key, token)?))
    }
}
