//! The child command: started in its own process group, signals passed on, orphans reaped,
//! exit code passed through.

use super::*;

// ---------------------------------------------------------------------------------------------
// The child command.

/// Processes the command leaves behind (a daemonizing script, a shell's background job)
/// are re-parented to the agent (a child subreaper, and PID 1 in a container): reap them as
/// they exit, so that none stays a zombie. The command itself is left to its own `wait`.
pub(crate) async fn reap_orphans(command: libc::pid_t) {
    let Ok(mut chld) = signal(SignalKind::child()) else {
        return;
    };
    let me = std::process::id() as libc::pid_t;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = chld.recv() => {}
            _ = tick.tick() => {}
        }
        for pid in zombie_children(me) {
            if pid != command {
                // SAFETY: waitpid on one exited child of ours that is not the command.
                unsafe {
                    libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
                }
            }
        }
    }
}

/// Children of `parent` that have exited and not been waited for (from /proc).
pub(crate) fn zombie_children(parent: libc::pid_t) -> Vec<libc::pid_t> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (
            f.next(),
            f.next().and_then(|p| p.parse::<libc::pid_t>().ok()),
        );
        if state == Some("Z") && ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

pub(crate) fn spawn_child(command: &[String]) -> Result<tokio::process::Child, String> {
    let (prog, args) = command.split_first().expect("checked non-empty");
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args);
    // Its own process group: a Ctrl-C at a terminal reaches the agent only, which deregisters
    // and drains before passing the signal on to the group.
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the closure only makes async-signal-safe system calls. The child is forked by
        // the thread that runs `run` (the main thread, via block_on), which lives until the
        // agent exits: so if the agent dies, even by `kill -9`, the child gets SIGTERM instead
        // of running on unregistered.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the agent exited"));
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            ": no such program (is it on PATH?)"
        } else {
            ""
        };
        format!("cannot run {prog:?}: {e}{hint}")
    })
}

/// Sends `sig` to the child's process group (the child itself, should the group be gone).
pub(crate) fn forward(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: plain kill(2) calls.
    unsafe {
        if libc::kill(-pid, sig) != 0 {
            libc::kill(pid, sig);
        }
    }
}

pub(crate) fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGWINCH => "SIGWINCH",
        _ => "signal",
    }
}

/// The child's exit code, or 128 + the signal that killed it (as shells report it).
pub(crate) fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => (128 + s) as u8,
        _ => 1,
    }
}
