//! CPU priority for the threads that do slow, rare work — Argon2id verification and SQLite
//! queries on a cache miss — so that on a busy core requests with cached keys come first.
//!
//! Measured with the load benchmark's auth flood (S5: 20,000 req/s of random keys and wrong
//! secrets while a valid key is timed): at equal priority a 20 ms verification, or a burst of
//! store lookups, holds the core while cached requests wait (valid-key p99 0.5 → 5 ms); with
//! these threads at nice 19, 1–2 ms. On an idle core they still get all of it; on a saturated
//! one a new key's first request waits longer, which is the trade we want.
//!
//! Linux's nice value is per thread. Failing to set it (another OS, a sandbox) changes nothing
//! else, so errors are ignored.

use rustix::process::{getpriority_process, setpriority_process, Pid};

/// The nice value of background threads (the lowest priority short of `SCHED_IDLE`, which
/// could starve them outright).
pub const BACKGROUND_NICE: i32 = 19;

/// Lowers the calling thread's priority (called first thing in our own worker threads).
pub fn lower_current_thread() {
    let _ = setpriority_process(None, BACKGROUND_NICE);
}

/// Lowers the priority of this process's threads whose name starts with `prefix`. For threads
/// a library starts on its own, on demand (sqlx: one `sqlx-sqlite-worker-N` per connection), so
/// it is called again from a maintenance loop; threads already lowered are left alone.
pub fn lower_threads_named(prefix: &str) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else { continue };
        let named = std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.starts_with(prefix));
        let pid = Pid::from_raw(tid);
        if named && pid.is_some_and(|p| getpriority_process(Some(p)).is_ok_and(|n| n != BACKGROUND_NICE)) {
            let _ = setpriority_process(pid, BACKGROUND_NICE);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn named_threads_are_lowered_and_others_are_not() {
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::Builder::new()
            .name("tg-prio-test".into())
            .spawn(move || {
                // The name is set as the thread starts: it is visible once this runs.
                started_tx.send(()).unwrap();
                let _ = rx.recv();
                getpriority_process(None).unwrap()
            })
            .unwrap();
        started.recv().unwrap();
        let before = getpriority_process(None).unwrap();
        lower_threads_named("tg-prio-test");
        tx.send(()).unwrap();
        assert_eq!(worker.join().unwrap(), BACKGROUND_NICE);
        assert_eq!(getpriority_process(None).unwrap(), before, "the calling thread keeps its priority");
    }
}
