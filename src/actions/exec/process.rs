//! Running one declared command as a child process in its own process group: feeding stdin,
//! reading stdout and stderr while it runs, and stopping the whole group on cancel or drop, and
//! what is left of it when the command exits.

use std::{
    io::{self, ErrorKind},
    os::unix::process::ExitStatusExt as _,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use bytes::Bytes;
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use serde_json::Value;
use tokio::{
    io::AsyncWriteExt as _,
    process::{Child, ChildStdin, Command},
};
use tokio_util::sync::CancellationToken;

#[cfg(target_os = "linux")]
use super::orphans;
use super::{
    ExecCommand,
    protocol::{Line, RawLine, TAIL_LINE_BYTES, Tail, parse_line, read_lines, truncate},
};
use crate::{
    actions::ProgressReporter,
    job::{TRACEPARENT_ENV, TRACESTATE_ENV, TraceContext},
};

/// How many lines of stdout and of stderr are kept for results and errors.
pub(super) const TAIL_LINES: usize = 50;
/// The longest stdout line read whole, so an `@result` may be this big; longer lines are cut.
pub(super) const MAX_STDOUT_LINE_BYTES: usize = 1024 * 1024;
/// How long to keep reading stdout and stderr after the command exits. Output already in the
/// pipes is read at once; this only bounds the wait when a process the command moved out of its
/// group (the rest of the group is killed at its exit) still holds the pipes open.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait for the group leader to be reaped after SIGKILL; the kernel makes this
/// near instant, the bound only keeps a stuck wait from hanging the action.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What a command that ran to its end left behind.
pub(super) struct Finished {
    pub(super) status: ExitStatus,
    pub(super) stdout_tail: Tail,
    pub(super) stderr_tail: Tail,
    /// The last `@result` line: its value, or why it is not valid JSON.
    pub(super) result: Option<Result<Value, String>>,
    /// Writing stdin failed for a reason other than the command not reading it.
    pub(super) stdin_error: Option<io::Error>,
}

/// Why a command did not run to its end.
pub(super) enum Stopped {
    /// It could not be started.
    Spawn(io::Error),
    /// Waiting for it failed.
    Wait(io::Error),
    /// The cancellation token fired; the group was stopped.
    Cancelled,
}

/// SIGKILLs the child's process group when dropped, unless the child was reaped first. This is
/// what stops the command when the executor drops the handler's future instead of letting it
/// finish; `kill_on_drop` alone would kill only the group leader and leave its children.
struct GroupGuard {
    pgid: Pid,
    reaped: bool,
}

impl GroupGuard {
    fn signal(&self, signal: Signal) {
        // ESRCH (the group is already gone) is the outcome we want, so errors are only logged.
        if let Err(error) = killpg(self.pgid, signal) {
            tracing::debug!(pgid = %self.pgid, %signal, %error, "signalling the exec process group failed");
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        // Once the leader is reaped its pid, and so the group id, may be reused by an
        // unrelated process: never signal it then.
        if !self.reaped {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// Has the command killed (SIGKILL) when the server dies without stopping it (kill -9, a
/// crash), which otherwise leaves it running beside the attempt that recovery starts again.
///
/// Linux ties this signal to the thread that starts the command, not to the process: the
/// commands are started from the runtime's worker threads, which live as long as the server.
/// Only the command's own process is covered; what it starts itself inherits
/// [`orphans::SERVER_ENV`], by which the next server finds and kills it.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_server(cmd: &mut Command) {
    if let Some(this) = orphans::this_server() {
        cmd.env(orphans::SERVER_ENV, this);
    }
    let server = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The server may have died between the fork and the prctl: then nobody would
            // send the signal.
            if nix::unistd::getppid() != server {
                return Err(io::Error::other(
                    "the server exited while starting the command",
                ));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_server(_cmd: &mut Command) {}

/// Runs `command` with `args` (and `trace` in its environment) to its end, or until `cancel`
/// fires: then SIGTERM to the group, and SIGKILL if the leader has not exited after `grace`.
pub(super) async fn run(
    command: &ExecCommand,
    args: &[String],
    input: Bytes,
    progress: &ProgressReporter,
    cancel: &CancellationToken,
    grace: Duration,
    trace: Option<&TraceContext>,
) -> Result<Finished, Stopped> {
    let mut cmd = Command::new(&command.program);
    // The command joins the trace of the Submit that created its job, never one the server
    // itself was started in.
    cmd.env_remove(TRACEPARENT_ENV).env_remove(TRACESTATE_ENV);
    cmd.args(&command.args).args(args).envs(&command.env);
    cmd.envs(trace.into_iter().flat_map(TraceContext::env_vars));
    if let Some(dir) = &command.working_dir {
        cmd.current_dir(dir);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so one signal reaches everything the command starts.
        .process_group(0);
    die_with_server(&mut cmd);
    let mut child = cmd.spawn().map_err(Stopped::Spawn)?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| Stopped::Wait(io::Error::other("the started command has no pid")))?;
    // Declared after `child` so it drops first: the group is killed while the leader is
    // still unreaped and its pid cannot have been reused.
    let mut guard = GroupGuard {
        pgid: Pid::from_raw(pid),
        reaped: false,
    };
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());

    let mut stdout_tail = Tail::new(TAIL_LINES);
    let mut stderr_tail = Tail::new(TAIL_LINES);
    let mut result = None;
    let mut stdin_error = None;
    let exited = CancellationToken::new();

    let supervise = async {
        let outcome = supervise(&mut child, &mut guard, cancel, grace).await;
        exited.cancel();
        outcome
    };
    let feed = until_drained(&exited, async {
        if let Some(stdin) = stdin {
            stdin_error = write_stdin(stdin, &input).await.err();
        }
    });
    let read_stdout = until_drained(&exited, async {
        if let Some(stdout) = stdout {
            let on_line =
                |line: RawLine| on_stdout_line(line, progress, &mut stdout_tail, &mut result);
            log_read_error(
                "stdout",
                read_lines(stdout, MAX_STDOUT_LINE_BYTES, on_line).await,
            );
        }
    });
    let read_stderr = until_drained(&exited, async {
        if let Some(stderr) = stderr {
            let on_line = |line: RawLine| stderr_tail.push(&line.text);
            log_read_error("stderr", read_lines(stderr, TAIL_LINE_BYTES, on_line).await);
        }
    });
    let (status, (), (), ()) = tokio::join!(supervise, feed, read_stdout, read_stderr);
    let (status, signalled) = status?;
    // A command told to stop that still exits 0 with a result has completed its work: it
    // keeps it, as a handler returning before it is stopped does. Any other exit after
    // SIGTERM is the stop taking effect.
    if signalled && !(status.success() && matches!(result, Some(Ok(_)))) {
        return Err(Stopped::Cancelled);
    }
    Ok(Finished {
        status,
        stdout_tail,
        stderr_tail,
        result,
        stdin_error,
    })
}

/// Waits for the child to exit, or stops its group when `cancel` fires. Returns the exit
/// status and whether the command was sent SIGTERM first; a command that had to be killed
/// is [`Stopped::Cancelled`].
async fn supervise(
    child: &mut Child,
    guard: &mut GroupGuard,
    cancel: &CancellationToken,
    grace: Duration,
) -> Result<(ExitStatus, bool), Stopped> {
    // Opened before anything can reap the command, which a zombie survives until then.
    let exit = LeaderExit::open(guard.pgid);
    tokio::select! {
        // An exit that races the cancel wins: the work is done, report it.
        biased;
        status = reap(child, guard, &exit) => Ok((status.map_err(Stopped::Wait)?, false)),
        () = cancel.cancelled() => {
            guard.signal(Signal::SIGTERM);
            match tokio::time::timeout(grace, reap(child, guard, &exit)).await {
                Ok(Ok(status)) => Ok((status, true)),
                Ok(Err(_)) => Err(Stopped::Cancelled),
                Err(_) => {
                    guard.signal(Signal::SIGKILL);
                    guard.reaped =
                        matches!(tokio::time::timeout(KILL_WAIT, child.wait()).await, Ok(Ok(_)));
                    Err(Stopped::Cancelled)
                }
            }
        }
    }
}

/// Waits for the command's own process to exit, kills (SIGKILL) whatever it left running in
/// its process group, then reaps it. The action's processes end with the action: a background
/// job the command did not wait for would otherwise run on unseen, holding the output pipes,
/// until a restart. Killed while the leader is an unreaped zombie, whose pid the kernel keeps,
/// so the group id cannot name a reused pid's group.
async fn reap(
    child: &mut Child,
    guard: &mut GroupGuard,
    exit: &io::Result<LeaderExit>,
) -> io::Result<ExitStatus> {
    match exit {
        Ok(exit) => {
            exit.wait().await;
            guard.signal(Signal::SIGKILL);
        }
        Err(error) => {
            tracing::debug!(%error, "cannot wait for the exec command without reaping it; what it leaves running in its group is not killed");
        }
    }
    let status = child.wait().await?;
    guard.reaped = true;
    Ok(status)
}

/// Tells when a process has exited without reaping it: a pidfd, readable once it has (Linux).
#[cfg(target_os = "linux")]
struct LeaderExit(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

#[cfg(target_os = "linux")]
impl LeaderExit {
    #[allow(unsafe_code)]
    fn open(pid: Pid) -> io::Result<Self> {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; nothing
        // else is read or written.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(io::Error::other)?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let interest = tokio::io::Interest::READABLE;
        // SAFETY: `fd` is owned by the AsyncFd from here on, and nothing closes or replaces it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }?;
        Ok(Self(fd))
    }

    async fn wait(&self) {
        // Readable means exited; an error would mean the same descriptor is unusable, and the
        // caller goes on to reap either way.
        let _ = self.0.readable().await;
    }
}

/// Elsewhere there is no way to wait without reaping: leftovers are not killed.
#[cfg(not(target_os = "linux"))]
struct LeaderExit;

#[cfg(not(target_os = "linux"))]
impl LeaderExit {
    fn open(_pid: Pid) -> io::Result<Self> {
        Err(io::Error::new(
            ErrorKind::Unsupported,
            "no pidfd on this system",
        ))
    }

    async fn wait(&self) {}
}

/// Runs `work` until it ends, or until [`DRAIN_TIMEOUT`] after `exited` fires.
async fn until_drained(exited: &CancellationToken, work: impl Future<Output = ()>) {
    tokio::select! {
        () = work => {}
        () = async {
            exited.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => tracing::debug!("gave up reading an exec command's pipes: a background process holds them"),
    }
}

/// Writes the whole input, then closes stdin so the command sees its end. A command that
/// exits without reading it all closes the pipe: that is its choice, not an error.
async fn write_stdin(mut stdin: ChildStdin, input: &[u8]) -> io::Result<()> {
    let written = async {
        stdin.write_all(input).await?;
        stdin.shutdown().await
    };
    match written.await {
        Err(error) if error.kind() == ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn on_stdout_line(
    line: RawLine,
    progress: &ProgressReporter,
    tail: &mut Tail,
    result: &mut Option<Result<Value, String>>,
) {
    match parse_line(&line.text) {
        Line::Percent { percent, message } => {
            progress.percent(percent, truncate(message, TAIL_LINE_BYTES));
        }
        Line::Units {
            current,
            total,
            message,
        } => progress.units(current, total, truncate(message, TAIL_LINE_BYTES)),
        Line::Result(_) if line.truncated => {
            *result = Some(Err(format!(
                "the @result line is longer than {MAX_STDOUT_LINE_BYTES} bytes"
            )));
        }
        Line::Result(json) => {
            *result = Some(serde_json::from_str(json).map_err(|error| {
                format!(
                    "@result is not valid JSON ({error}): {}",
                    truncate(json, 200)
                )
            }));
        }
        Line::Output(text) => tail.push(text),
    }
}

fn log_read_error(stream: &str, outcome: io::Result<()>) {
    if let Err(error) = outcome {
        tracing::warn!(stream, %error, "reading an exec command's output failed");
    }
}

/// The name of the signal that ended the process (`SIGKILL`), if one did. Names, not numbers:
/// numbers differ between platforms.
pub(super) fn killed_by(status: ExitStatus) -> Option<String> {
    let signal = status.signal()?;
    Some(
        Signal::try_from(signal)
            .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned()),
    )
}
