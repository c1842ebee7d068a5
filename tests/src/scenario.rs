//! One group of scenarios at a time in the one test binary.
//!
//! The scenarios of `tests/tests/` are the modules of one binary (`tests/tests/main.rs`), so
//! they link once. Before, each file was a binary of its own: cargo ran the binaries one after
//! another and libtest ran each binary's tests in parallel (`--test-threads`, by default one
//! per CPU). A group is one such file: every scenario starts with
//! `let _scenario = scenario(module_path!());`, which waits until no scenario of another group
//! runs. So scenarios of one file still run in parallel with each other and never with those
//! of another file: no more real nodes at once than before, and no new mix of scenarios
//! competing for the machine. The gate is not a queue: when it frees, whichever waiting test
//! takes it first goes, so a group may run in two turns (libtest starts tests in name order,
//! so mostly the groups follow each other as the binaries did); two groups never overlap.

use std::sync::{Condvar, Mutex, MutexGuard};

/// The group whose scenarios run now, and how many of them.
struct Gate {
    group: Option<&'static str>,
    running: usize,
}

static GATE: Mutex<Gate> = Mutex::new(Gate {
    group: None,
    running: 0,
});
static TURN: Condvar = Condvar::new();

fn gate() -> MutexGuard<'static, Gate> {
    // The lock is never held while a test runs, so a failing test cannot poison it; take it
    // back anyway rather than fail every later test.
    GATE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A place among the running scenarios of `group`; the group's turn ends when the last one is
/// dropped.
#[must_use = "the scenario's place is given up when this is dropped"]
pub struct Scenario {
    _private: (),
}

/// Waits until the scenarios running now (if any) are of `group` (`module_path!()` of the
/// test), then counts this one among them until the returned value is dropped.
pub fn scenario(group: &'static str) -> Scenario {
    let mut gate = gate();
    while gate.running > 0 && gate.group != Some(group) {
        gate = TURN
            .wait(gate)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    if gate.group != Some(group) {
        gate.group = Some(group);
        // A new group is what a new binary was: an earlier group's timeout is not this one's.
        crate::clear_timed_out();
    }
    gate.running += 1;
    Scenario { _private: () }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let mut gate = gate();
        gate.running -= 1;
        if gate.running == 0 {
            TURN.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier, mpsc};

    #[test]
    fn a_group_s_scenarios_run_together_and_another_group_waits_for_all_of_them() {
        static A_DONE: AtomicUsize = AtomicUsize::new(0);
        let first = scenario("a");
        // b comes while a runs: it waits for every scenario of a, also those that start
        // after it came.
        let b = std::thread::spawn(|| {
            let _s = scenario("b");
            A_DONE.load(Ordering::SeqCst)
        });
        let both_in = Arc::new(Barrier::new(2));
        let (entered, all_entered) = mpsc::channel();
        let a: Vec<_> = (0..2)
            .map(|_| {
                let (both_in, entered) = (both_in.clone(), entered.clone());
                std::thread::spawn(move || {
                    let _s = scenario("a");
                    // Both of a's scenarios are in at once (a gate that let one in would
                    // hang here).
                    both_in.wait();
                    entered.send(()).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    A_DONE.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        all_entered.recv().unwrap();
        all_entered.recv().unwrap();
        drop(first);
        for t in a {
            t.join().unwrap();
        }
        assert_eq!(b.join().unwrap(), 2, "b ran before a's scenarios were done");
        assert_eq!(gate().running, 0);
    }
}
