//! The in-process [`TaskStore`](crate::recipes::tasks::TaskStore) (recipe [`tasks`](crate::recipes::tasks)): for tests, examples and a single process.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::StateResult;
use crate::stores::tasks::{AfterFailure, TaskRecord, TaskStore};

/// A [`TaskStore`] in process memory.
#[derive(Debug, Default)]
pub struct InMemoryTaskStore {
    tasks: Mutex<HashMap<String, TaskRecord>>,
}

impl InMemoryTaskStore {
    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskRecord>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl TaskStore for InMemoryTaskStore {
    async fn insert_if_missing(&self, task: &TaskRecord) -> StateResult<bool> {
        let mut tasks = self.tasks();
        if tasks.contains_key(&task.id) {
            return Ok(false);
        }
        tasks.insert(task.id.clone(), task.clone());
        Ok(true)
    }

    async fn get(&self, id: &str) -> StateResult<Option<TaskRecord>> {
        Ok(self.tasks().get(id).cloned())
    }

    async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>> {
        let mut due: Vec<TaskRecord> = self
            .tasks()
            .values()
            .filter(|t| t.pending && t.due_ms <= now_ms)
            .cloned()
            .collect();
        due.sort_by_key(|t| t.due_ms);
        due.truncate(limit);
        Ok(due)
    }

    async fn defer(&self, id: &str, run: u64, until_ms: u64) -> StateResult<bool> {
        Ok(self
            .tasks()
            .get_mut(id)
            .is_some_and(|task| task.defer_run(run, until_ms)))
    }

    async fn complete(&self, id: &str, run: u64, next_due_ms: Option<u64>) -> StateResult<bool> {
        Ok(self
            .tasks()
            .get_mut(id)
            .is_some_and(|task| task.complete_run(run, next_due_ms)))
    }

    async fn fail(
        &self,
        id: &str,
        run: u64,
        error: &str,
        then: &AfterFailure,
    ) -> StateResult<bool> {
        Ok(self
            .tasks()
            .get_mut(id)
            .is_some_and(|task| task.fail_run(run, error, then)))
    }

    async fn dead_letters(&self, limit: usize) -> StateResult<Vec<TaskRecord>> {
        let mut dead: Vec<TaskRecord> = self.tasks().values().filter(|t| t.dead).cloned().collect();
        dead.sort_by(|a, b| a.id.cmp(&b.id));
        dead.truncate(limit);
        Ok(dead)
    }

    async fn requeue(&self, id: &str, due_ms: u64) -> StateResult<bool> {
        Ok(self
            .tasks()
            .get_mut(id)
            .is_some_and(|task| task.requeue_dead(due_ms)))
    }
}
