//! Exits the engine when the control process that spawned it is gone, so an engine never
//! outlives its daemon.

use std::time::Duration;

/// Polls until `parent_pid` is gone (we were re-parented, or the pid no longer exists).
///
/// Polling rather than `PR_SET_PDEATHSIG`: that signal fires when the *thread* that forked us
/// exits, which in a thread-pooled daemon is not the same as the daemon dying.
pub async fn parent_gone(parent_pid: u32, poll: Duration) {
    let parent = nix::unistd::Pid::from_raw(parent_pid as i32);
    loop {
        // getppid changes when we are re-parented; kill(pid, 0) fails once the pid is gone.
        let reparented = nix::unistd::getppid() != parent;
        let gone = nix::sys::signal::kill(parent, None).is_err();
        if reparented || gone {
            return;
        }
        tokio::time::sleep(poll).await;
    }
}
