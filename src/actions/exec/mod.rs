//! The `exec` action: runs a command the server operator declared in the config file, never one
//! a client names, and without a shell, so client input never reaches a command line except as
//! separate arguments of commands declared with `allow_extra_args`.
//!
//! # Running
//!
//! The program is started with its declared args, then the client's extra `args`, its declared
//! `env` added to the server's environment, in its `working_dir` (default: the server's). The
//! action's input is written to its stdin, which is then closed; a command that does not read
//! its stdin is fine. It runs in its own process group, so signals reach everything it starts.
//!
//! # The line protocol on stdout
//!
//! Each stdout line is one of:
//!
//! - `@progress <percent> [message]`: percent done, a number clamped to 0..=100 (fractions are
//!   floored), reported as the action's progress.
//! - `@progress <current>/<total> [message]`: units done out of a total; the percent is derived.
//! - `@result <json>`: the action's result. The last `@result` line wins; if that one is not
//!   valid JSON (or longer than 1 MiB) the action fails with reason `BAD_RESULT`.
//! - anything else is ordinary output; a `@progress` line whose numbers do not parse is ordinary
//!   output too, so its author can see it in the tail. The last 50 lines (each cut to 4 KiB)
//!   are kept as `stdout_tail`.
//!
//! Directives must start the line; a trailing `\r` is ignored. The last 50 lines of stderr are
//! kept as `stderr_tail`. In an error's details a tail holds the newest lines that fit in
//! [`TAIL_DETAILS_BYTES`].
//!
//! # Outcomes
//!
//! | what happened | action outcome |
//! |---|---|
//! | exit 0 | the `@result` value, else `{"exit_code": 0, "stdout_tail": [...]}` |
//! | exit 0, last `@result` invalid | code `INTERNAL`, reason `BAD_RESULT`, permanent |
//! | non-zero exit, or killed by a signal (not by cancellation) | code `UNKNOWN`, reason `EXIT_STATUS`, retryable; details `exit_code` (null if killed), `signal` (`"SIGSEGV"`, only if killed), `stderr_tail` |
//! | the program cannot be started | code `FAILED_PRECONDITION`, reason `SPAWN_FAILED`, permanent |
//! | the command is no longer declared, or no longer takes extra args (the config changed since Submit) | code `FAILED_PRECONDITION`, reason `UNKNOWN_COMMAND` / `EXTRA_ARGS_NOT_ALLOWED`, permanent |
//! | writing stdin failed (other than the command not reading it) | code `INTERNAL`, reason `STDIN_FAILED`, retryable |
//! | cancelled, or out of time | SIGTERM to the group; SIGKILL after the grace period; code `CANCELLED` (the executor makes a timeout `DEADLINE_EXCEEDED`) |
//! | told to stop, then exit 0 with a valid `@result` within the grace period | the `@result` value: the work was completed |
//!
//! `UNKNOWN` for a failed exit because the server cannot tell what an exit status means: it is
//! the command's own failure, not a broken server invariant (`INTERNAL`). It is retryable since
//! commands often fail for passing reasons; `max_attempts` bounds the retries.
//!
//! If the handler's future is dropped while the command runs, the whole group is SIGKILLed.

#[cfg(target_os = "linux")]
mod orphans;
mod process;
mod protocol;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, time::Duration};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ActionContext, ActionDescription, Handler, HandlerError, ParamInfo, ParamType};
use crate::job::{FieldViolation, MAX_ERROR_DETAILS_BYTES, framed};
#[cfg(target_os = "linux")]
pub use orphans::kill_orphaned_commands;
use process::{Finished, Stopped, killed_by};

/// One command the operator allows clients to run, as declared in the config file under
/// `[exec.commands.<name>]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecCommand {
    /// The program to run: a path, run directly, never through a shell.
    pub program: PathBuf,
    /// The arguments it always gets, before any extra ones.
    #[serde(default)]
    pub args: Vec<String>,
    /// What it does, shown in `ListActions`.
    #[serde(default)]
    pub description: String,
    /// Whether clients may append arguments with the `args` param (default false).
    #[serde(default)]
    pub allow_extra_args: bool,
    /// Environment variables added to the server's own.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The directory it runs in; the server's working directory when absent.
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
}

/// The `exec` action: runs the commands declared in the config by name, without a shell, the
/// action's input on stdin. On stdout, `@progress <percent> [message]` and
/// `@progress <current>/<total> [message]` report progress, `@result <json>` sets the result
/// (the last one wins), other lines are output. A non-zero exit fails the action (`EXIT_STATUS`);
/// cancelling sends SIGTERM to the command's process group, then SIGKILL after the grace
/// period. The full protocol and outcomes are in `docs/exec.md`.
#[derive(Debug, Clone)]
pub struct Exec {
    commands: BTreeMap<String, ExecCommand>,
    grace: Duration,
}

impl Exec {
    /// Runs `commands` by name; a cancelled command gets SIGTERM, then SIGKILL after `grace`.
    pub fn new(commands: BTreeMap<String, ExecCommand>, grace: Duration) -> Self {
        Self { commands, grace }
    }

    fn declared_names(&self) -> String {
        if self.commands.is_empty() {
            "none are declared in this server's config".to_owned()
        } else {
            let names: Vec<&str> = self.commands.keys().map(String::as_str).collect();
            format!("declared: {}", names.join(", "))
        }
    }

    /// The command `params` name and the extra args, or what is wrong with them.
    fn resolve<'a>(
        &'a self,
        params: &Map<String, Value>,
    ) -> Result<(&'a str, &'a ExecCommand, Vec<String>), Vec<FieldViolation>> {
        let name = params.get("command").and_then(Value::as_str).unwrap_or("");
        let Some((name, command)) = self.commands.get_key_value(name) else {
            return Err(vec![FieldViolation::new(
                "command",
                format!("unknown command {name:?}; {}", self.declared_names()),
            )]);
        };
        let Some(given) = params.get("args").and_then(Value::as_array) else {
            return Ok((name, command, Vec::new()));
        };
        if !given.is_empty() && !command.allow_extra_args {
            return Err(vec![FieldViolation::new(
                "args",
                format!("command {name:?} takes no extra args"),
            )]);
        }
        let mut args = Vec::with_capacity(given.len());
        let mut violations = Vec::new();
        for (i, arg) in given.iter().enumerate() {
            match arg.as_str() {
                // A NUL cannot be passed in an argument: refuse it here rather than fail later.
                Some(arg) if arg.contains('\0') => violations.push(FieldViolation::new(
                    format!("args[{i}]"),
                    "must not contain a NUL character",
                )),
                Some(arg) => args.push(arg.to_owned()),
                None => violations.push(FieldViolation::new(
                    format!("args[{i}]"),
                    "must be a string",
                )),
            }
        }
        if violations.is_empty() {
            Ok((name, command, args))
        } else {
            Err(violations)
        }
    }
}

#[async_trait]
impl Handler for Exec {
    fn describe(&self) -> ActionDescription {
        let mut description = "Runs a command declared in the server's config, without a shell; \
            the action's input is its stdin. Stdout lines `@progress <percent> [message]` and \
            `@progress <current>/<total> [message]` report progress; `@result <json>` sets the \
            result (the last one wins; default {\"exit_code\": 0, \"stdout_tail\": [...]}); \
            other lines are output. A non-zero exit fails the action. Commands:"
            .to_owned();
        if self.commands.is_empty() {
            description.push_str(" none declared.");
        }
        for (name, command) in &self.commands {
            let extra = if command.allow_extra_args {
                " (takes extra args)"
            } else {
                ""
            };
            let _ = write!(description, "\n- {name}: {}{extra}", command.description);
        }
        ActionDescription {
            description,
            params: vec![
                ParamInfo::required(
                    "command",
                    ParamType::String,
                    &format!("The name of the command to run; {}.", self.declared_names()),
                ),
                ParamInfo::optional(
                    "args",
                    ParamType::Array,
                    "Strings appended to the command's declared args; only for commands that allow extra args.",
                ),
            ],
            uses_input: true,
        }
    }

    fn validate(&self, params: &Map<String, Value>) -> Result<(), Vec<FieldViolation>> {
        self.resolve(params).map(|_| ())
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        // Checked at Submit, but the config may have changed since (the job outlived a restart).
        let (name, command, args) = self.resolve(&ctx.params).map_err(|violations| {
            let reason = match violations.first() {
                Some(v) if v.field == "command" => "UNKNOWN_COMMAND",
                _ => "EXTRA_ARGS_NOT_ALLOWED",
            };
            let messages: Vec<String> = violations.iter().map(ToString::to_string).collect();
            HandlerError::permanent("FAILED_PRECONDITION", reason, messages.join("; "))
        })?;
        let outcome = process::run(
            command,
            &args,
            ctx.input,
            &ctx.progress,
            &ctx.cancel,
            self.grace,
            ctx.trace.as_ref(),
        )
        .await;
        match outcome {
            Ok(finished) => outcome_of(name, finished),
            Err(Stopped::Cancelled) => Err(HandlerError::cancelled()),
            Err(Stopped::Spawn(error)) => {
                let mut message = format!(
                    "could not start command {name:?}: {}: {error}",
                    command.program.display()
                );
                if let Some(dir) = &command.working_dir {
                    let _ = write!(message, " (working dir {})", dir.display());
                }
                let mut failure =
                    HandlerError::permanent("FAILED_PRECONDITION", "SPAWN_FAILED", message);
                failure.error.details.insert(
                    "program".to_owned(),
                    json!(command.program.display().to_string()),
                );
                Err(failure)
            }
            Err(Stopped::Wait(error)) => Err(HandlerError::new(
                "INTERNAL",
                "WAIT_FAILED",
                format!("lost track of command {name:?}: {error}"),
            )),
        }
    }
}

/// How much of an error's details (at most [`MAX_ERROR_DETAILS_BYTES`], kept whole or not at
/// all) an output tail may fill, leaving room for the exit code and signal beside it.
const TAIL_DETAILS_BYTES: usize = MAX_ERROR_DETAILS_BYTES * 3 / 4;

/// The newest `lines` that fit in `budget` bytes as sent, oldest first. A newest line that
/// alone does not fit is cut, so the tail is never empty for a command that printed.
fn tail_within(lines: Vec<String>, budget: usize) -> Vec<String> {
    // A list entry's own framing, around each string's.
    let size = |line: &str| framed(framed(line.len()));
    let mut kept = Vec::new();
    let mut used = framed(0);
    for line in lines.into_iter().rev() {
        if used + size(&line) > budget {
            if kept.is_empty() {
                kept.push(crate::job::truncate(&line, budget.saturating_sub(16)));
            }
            break;
        }
        used += size(&line);
        kept.push(line);
    }
    kept.reverse();
    kept
}

/// The action's result or error for a command that ran to its end.
fn outcome_of(name: &str, finished: Finished) -> Result<Value, HandlerError> {
    let status = finished.status;
    if !status.success() {
        let signal = killed_by(status);
        let mut message = match (&signal, status.code()) {
            (Some(signal), _) => format!("command {name:?} was killed by {signal}"),
            (None, Some(code)) => format!("command {name:?} exited with status {code}"),
            (None, None) => format!("command {name:?} failed: {status}"),
        };
        if let Some(line) = finished.stderr_tail.last() {
            let _ = write!(message, ": {line}");
        }
        let mut failure = HandlerError::new("UNKNOWN", "EXIT_STATUS", message);
        let details = &mut failure.error.details;
        details.insert("exit_code".to_owned(), json!(status.code()));
        if let Some(signal) = signal {
            details.insert("signal".to_owned(), json!(signal));
        }
        details.insert(
            "stderr_tail".to_owned(),
            json!(tail_within(
                finished.stderr_tail.to_vec(),
                TAIL_DETAILS_BYTES
            )),
        );
        return Err(failure);
    }
    if let Some(error) = finished.stdin_error {
        return Err(HandlerError::new(
            "INTERNAL",
            "STDIN_FAILED",
            format!("could not write the input to command {name:?}: {error}"),
        ));
    }
    match finished.result {
        Some(Ok(value)) => Ok(value),
        Some(Err(why)) => {
            let mut failure = HandlerError::permanent(
                "INTERNAL",
                "BAD_RESULT",
                format!("command {name:?} printed a bad result: {why}"),
            );
            failure.error.details.insert(
                "stdout_tail".to_owned(),
                json!(tail_within(
                    finished.stdout_tail.to_vec(),
                    TAIL_DETAILS_BYTES
                )),
            );
            Err(failure)
        }
        None => Ok(json!({
            "exit_code": 0,
            "stdout_tail": finished.stdout_tail.to_vec(),
        })),
    }
}
