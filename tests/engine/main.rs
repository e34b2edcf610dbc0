//! Integration tests of the engine library against a real PostgreSQL: a private
//! cluster that the `test_db` harness starts (or `TEST_DATABASE_URL`), one database
//! per test so that tests run in parallel.

mod batching;
mod connections;
mod disasters;
mod due_times;
mod enqueueing;
mod faults;
mod operators;
mod queues;
mod retries;
mod running;
mod schedules;
mod schema;
mod settings;
mod stopping;
mod support;
mod testing;
mod timeouts;
mod unique;
mod versions;
mod wakeups;
