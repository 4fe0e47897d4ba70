//! Commands left running by a server that died without stopping them.
//!
//! A command's own process dies with its server (see `process::die_with_server`), but what it
//! started itself does not: after a `kill -9` of the server, `sh -c 'step1 && step2'` loses its
//! shell and keeps `step2` running, beside the attempt that recovery starts again. Every
//! command therefore carries [`SERVER_ENV`], naming the server that started it, in its
//! environment, which whatever it starts inherits; the next server kills each process whose
//! named server is gone and which is still in its command's process group. One that moved to
//! a group of its own (`setsid`, a daemon) is left alone, as a cancel leaves it.

use std::{fs, sync::OnceLock};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The environment variable that names, in every process a command starts, the server that
/// started it: `<pid>:<start time>` (the start time in clock ticks since boot, as in
/// `/proc/<pid>/stat`, so that a reused pid does not pass for the server).
pub const SERVER_ENV: &str = "LONGRUN_EXEC_SERVER";

/// This process's [`SERVER_ENV`] value; `None` where `/proc` cannot tell its start time.
pub(super) fn this_server() -> Option<&'static str> {
    static THIS: OnceLock<Option<String>> = OnceLock::new();
    THIS.get_or_init(|| {
        let pid = std::process::id();
        let started = stat(pid)?.ticks;
        Some(format!("{pid}:{started}"))
    })
    .as_deref()
}

/// A process as `/proc/<pid>/stat` shows it.
struct Stat {
    zombie: bool,
    /// Its process group.
    group: u32,
    /// When it started, in clock ticks since boot.
    ticks: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<Stat> {
    // The command name, in parentheses, may hold spaces and parentheses: the fields are
    // counted after its last `)`, from field 3 (the state) on.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let zombie = fields.next()? == "Z";
    let group = fields.nth(1)?.parse().ok()?; // field 5, after the parent (4)
    let ticks = fields.nth(16)?.parse().ok()?; // field 22
    Some(Stat {
        zombie,
        group,
        ticks,
    })
}

/// Whether the server a [`SERVER_ENV`] value names still runs. A value that cannot be read
/// names no server that could be running: it is treated as gone only when well formed, so
/// that a variable of the same name set by someone else is left alone.
fn server_gone(value: &str) -> Option<bool> {
    let (pid, ticks) = value.split_once(':')?;
    let (pid, ticks): (u32, u64) = (pid.parse().ok()?, ticks.parse().ok()?);
    Some(match stat(pid) {
        Some(found) => found.zombie || found.ticks != ticks,
        None => true,
    })
}

/// Kills (SIGKILL) every process of this user that a dead longrun server's `exec` commands
/// left running in their process groups, and returns how many it killed. `longrun serve`
/// calls it at start, before recovery runs their jobs again; a program that embeds longrun
/// with the `exec` action may do the same.
///
/// Found by `SERVER_ENV` in `/proc/<pid>/environ`: a process that cleared its environment,
/// or runs as another user, is not found. Processes of a server that still runs, this one or
/// another, are never touched, nor are processes that lead a group of their own.
pub fn kill_orphaned_commands() -> usize {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    let this = std::process::id();
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == this {
            continue;
        }
        // Unreadable (another user's, or gone meanwhile): not ours to stop.
        let Ok(environ) = fs::read(entry.path().join("environ")) else {
            continue;
        };
        let Some(server) = server_of(&environ) else {
            continue;
        };
        if server_gone(&server) != Some(true) {
            continue;
        }
        // A process leading its own group has left the command's (a command is started as
        // the leader of a new group, and dies with its server): moved out on purpose, as a
        // daemon does, it is not stopped by a cancel either.
        if stat(pid).is_none_or(|process| process.group == pid) {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        match kill(Pid::from_raw(raw), Signal::SIGKILL) {
            Ok(()) => {
                tracing::warn!(
                    pid,
                    server = %server,
                    "killed a process an exec command of a dead server left running"
                );
                killed += 1;
            }
            Err(error) => {
                tracing::debug!(pid, %error, "could not kill a left-over exec process");
            }
        }
    }
    killed
}

/// The [`SERVER_ENV`] value in a NUL-separated environment block.
fn server_of(environ: &[u8]) -> Option<String> {
    let prefix = format!("{SERVER_ENV}=");
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(prefix.as_bytes()))
        .and_then(|value| std::str::from_utf8(value).ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_server_is_named_by_its_pid_and_start_time_and_is_alive() {
        let this = this_server().expect("/proc tells this process's start time");
        assert!(this.starts_with(&format!("{}:", std::process::id())));
        assert_eq!(server_gone(this), Some(false));
    }

    #[test]
    fn a_reused_pid_or_a_missing_process_is_a_gone_server() {
        let pid = std::process::id();
        let ticks = stat(pid).unwrap().ticks;
        assert_eq!(server_gone(&format!("{pid}:{}", ticks + 1)), Some(true));
        assert_eq!(server_gone(&format!("{}:{ticks}", u32::MAX)), Some(true));
    }

    #[test]
    fn a_process_stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (my (odd) cmd) S 1 4200 4200 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615";
        let parsed = parse_stat(line).expect("parsed");
        assert_eq!(
            (parsed.zombie, parsed.group, parsed.ticks),
            (false, 4200, 987_654)
        );
        let zombie = line.replace(") S ", ") Z ");
        assert!(parse_stat(&zombie).expect("parsed").zombie);

        let own = stat(std::process::id()).expect("this process's stat");
        assert_eq!(own.group, nix::unistd::getpgrp().as_raw().unsigned_abs());
    }

    #[test]
    fn a_malformed_value_names_no_server_and_is_left_alone() {
        for value in ["", "12", "x:1", "1:x", "1:2:3"] {
            assert_eq!(server_gone(value), None, "{value:?}");
        }
    }

    #[test]
    fn the_server_is_read_from_an_environment_block() {
        let block = format!("PATH=/bin\0{SERVER_ENV}=12:34\0HOME=/root\0");
        assert_eq!(server_of(block.as_bytes()).as_deref(), Some("12:34"));
        assert_eq!(server_of(b"PATH=/bin\0X_LONGRUN_EXEC_SERVER=1:2\0"), None);
    }
}
