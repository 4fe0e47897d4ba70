//! End-to-end tests of `exec` with `/bin/sh -c` scripts as the declared commands.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use nix::{errno::Errno, sys::signal::kill, unistd::Pid};
use serde_json::{Map, Value, json};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    actions::{ProgressReceiver, ProgressReporter, Registry},
    job::{JobId, Progress, TraceContext},
};

/// The bound on every wait in these tests, so a bug fails a test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(10);
/// A short grace period, so the SIGKILL path is quick to test.
const GRACE: Duration = Duration::from_millis(200);

fn sh(script: &str) -> ExecCommand {
    ExecCommand {
        program: "/bin/sh".into(),
        args: vec!["-c".to_owned(), script.to_owned(), "sh".to_owned()],
        description: String::new(),
        allow_extra_args: false,
        env: BTreeMap::new(),
        working_dir: None,
    }
}

fn exec(commands: impl IntoIterator<Item = (&'static str, ExecCommand)>) -> Exec {
    let commands = commands
        .into_iter()
        .map(|(name, command)| (name.to_owned(), command))
        .collect();
    Exec::new(commands, GRACE)
}

fn params(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

fn ctx(command: &str, input: &'static [u8]) -> (ActionContext, ProgressReceiver) {
    let (progress, receiver) = ProgressReporter::channel();
    let ctx = ActionContext {
        job_id: JobId::generate(),
        action_index: 0,
        attempt: 1,
        max_attempts: 1,
        labels: Default::default(),
        tenant: "default".to_owned(),
        params: params(json!({ "command": command })),
        input: Bytes::from_static(input),
        progress,
        cancel: CancellationToken::new(),
        deadline: None,
        trace: None,
    };
    (ctx, receiver)
}

async fn run(handler: &Exec, ctx: ActionContext) -> Result<Value, HandlerError> {
    timeout(LIMIT, handler.run(ctx))
        .await
        .expect("the exec action finished in time")
}

/// Whether the process runs. A zombie does not: the orphaned `sleep` is reparented to a pid 1
/// that, in a container, may never reap it.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => kill(Pid::from_raw(pid), None) != Err(Errno::ESRCH),
    }
}

/// Waits (bounded) until `path` holds the two pids the sleeper script writes once started.
async fn read_pids(path: &Path) -> [i32; 2] {
    let read = async {
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && let Some((shell, sleep)) = text.trim().split_once(' ')
                && let (Ok(shell), Ok(sleep)) = (shell.parse(), sleep.parse())
            {
                return [shell, sleep];
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    timeout(LIMIT, read)
        .await
        .expect("the script wrote its pids")
}

/// Waits (bounded) until the process is gone; an orphaned sleep is reaped by init, not at once.
async fn assert_gone(pid: i32) {
    let gone = async {
        while alive(pid) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert!(
        timeout(LIMIT, gone).await.is_ok(),
        "process {pid} is still running"
    );
}

#[tokio::test]
async fn progress_lines_are_reported_and_output_is_kept() {
    let handler = exec([(
        "count",
        sh("echo hello; echo '@progress 40 copying'; echo '@progress 3/4 step 3'; echo bye"),
    )]);
    let (ctx, progress) = ctx("count", b"");
    let result = run(&handler, ctx).await.unwrap();
    assert_eq!(
        result,
        json!({"exit_code": 0, "stdout_tail": ["hello", "bye"]})
    );
    assert_eq!(progress.take(), Some(Progress::of(3, 4, "step 3")));
}

#[tokio::test]
async fn percent_progress_reaches_the_reporter() {
    let handler = exec([("half", sh("echo '@progress 50 halfway'"))]);
    let (ctx, progress) = ctx("half", b"");
    run(&handler, ctx).await.unwrap();
    assert_eq!(progress.take(), Some(Progress::percent(50, "halfway")));
}

#[tokio::test]
async fn the_last_result_line_is_the_result() {
    let handler = exec([("r", sh(r#"echo '@result {"a":0}'; echo '@result {"a":1}'"#))]);
    let result = run(&handler, ctx("r", b"").0).await.unwrap();
    assert_eq!(result, json!({"a": 1}));
}

#[tokio::test]
async fn an_invalid_result_fails_with_bad_result() {
    let handler = exec([("r", sh("echo '@result {not json'"))]);
    let error = run(&handler, ctx("r", b"").0).await.unwrap_err();
    assert_eq!(error.error.reason, "BAD_RESULT");
    assert!(!error.retryable);
    assert!(error.error.message.contains("not valid JSON"), "{error:?}");
}

#[tokio::test]
async fn input_reaches_stdin() {
    let handler = exec([("wc", sh(r#"n=$(wc -c); echo "@result {\"bytes\": $n}""#))]);
    let result = run(&handler, ctx("wc", b"hello world").0).await.unwrap();
    assert_eq!(result, json!({"bytes": 11}));
}

#[tokio::test]
async fn a_command_that_ignores_a_large_input_succeeds() {
    // Far more than a pipe buffer holds: the write fails with BrokenPipe once the child exits.
    static INPUT: [u8; 1 << 20] = [b'x'; 1 << 20];
    let handler = exec([("skip", sh("echo '@result true'"))]);
    let (mut ctx, _progress) = ctx("skip", b"");
    ctx.input = Bytes::from_static(&INPUT);
    assert_eq!(run(&handler, ctx).await.unwrap(), json!(true));
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_its_status_and_stderr() {
    let handler = exec([("bad", sh("echo first >&2; echo 'disk full' >&2; exit 3"))]);
    let error = run(&handler, ctx("bad", b"").0).await.unwrap_err();
    assert_eq!(error.error.code, "UNKNOWN");
    assert_eq!(error.error.reason, "EXIT_STATUS");
    assert!(error.retryable);
    assert!(error.error.message.contains("status 3"), "{error:?}");
    assert!(error.error.message.ends_with("disk full"), "{error:?}");
    assert_eq!(error.error.details["exit_code"], json!(3));
    assert_eq!(
        error.error.details["stderr_tail"],
        json!(["first", "disk full"])
    );
    assert!(!error.error.details.contains_key("signal"));
}

#[tokio::test]
async fn a_long_stderr_keeps_its_newest_lines_within_the_details_bound() {
    // 60 lines of ~310 bytes: 50 kept in the tail, far more than an error's details hold.
    let script = r#"i=1; while [ $i -le 60 ]; do printf 'line %02d %0300d\n' $i 0 >&2; i=$((i+1)); done; exit 1"#;
    let handler = exec([("noisy", sh(script))]);
    let error = run(&handler, ctx("noisy", b"").0).await.unwrap_err();
    let kept = error.error.clone().bounded();
    assert_eq!(kept.details["exit_code"], json!(1), "{:?}", kept.details);
    let tail = kept.details["stderr_tail"].as_array().expect("a tail");
    assert!(tail.len() > 5 && tail.len() < 50, "{}", tail.len());
    assert!(
        tail.last()
            .unwrap()
            .as_str()
            .unwrap()
            .starts_with("line 60 ")
    );
    assert!(
        tail[0]
            .as_str()
            .unwrap()
            .starts_with(&format!("line {} ", 61 - tail.len()))
    );

    // One line alone over the budget is cut rather than lost.
    let huge = tail_within(vec!["x".repeat(20_000)], TAIL_DETAILS_BYTES);
    assert_eq!(huge.len(), 1);
    assert!(huge[0].len() < TAIL_DETAILS_BYTES);
}

#[tokio::test]
async fn a_command_killed_by_a_signal_names_it() {
    let handler = exec([("die", sh("kill -KILL $$"))]);
    let error = run(&handler, ctx("die", b"").0).await.unwrap_err();
    assert_eq!(error.error.reason, "EXIT_STATUS");
    assert_eq!(error.error.details["signal"], json!("SIGKILL"));
    assert_eq!(error.error.details["exit_code"], Value::Null);
}

#[tokio::test]
async fn a_missing_program_fails_with_spawn_failed() {
    let mut command = sh("");
    command.program = "/nonexistent/program".into();
    let handler = exec([("missing", command)]);
    let error = run(&handler, ctx("missing", b"").0).await.unwrap_err();
    assert_eq!(error.error.reason, "SPAWN_FAILED");
    assert!(!error.retryable);
    assert!(
        error.error.message.contains("/nonexistent/program"),
        "{error:?}"
    );
}

#[tokio::test]
async fn env_working_dir_and_extra_args_are_passed() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = sh(r#"echo "@result [\"$GREETING\", \"$(pwd)\", \"$1\"]""#);
    command.env.insert("GREETING".to_owned(), "hi".to_owned());
    command.working_dir = Some(dir.path().to_owned());
    command.allow_extra_args = true;
    let handler = exec([("env", command)]);
    let (mut ctx, _progress) = ctx("env", b"");
    ctx.params.insert("args".to_owned(), json!(["one two"]));
    let result = run(&handler, ctx).await.unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(result, json!(["hi", cwd.display().to_string(), "one two"]));
}

#[tokio::test]
async fn the_job_s_trace_context_is_in_the_command_s_environment() {
    let script = r#"echo "@result \"${TRACEPARENT-unset} ${TRACESTATE-unset}\"""#;
    let handler = exec([("trace", sh(script))]);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (mut with_trace, _progress) = ctx("trace", b"");
    with_trace.trace = Some(TraceContext {
        parent: parent.parse().unwrap(),
        state: Some("rojo=1,congo=2".parse().unwrap()),
    });
    assert_eq!(
        run(&handler, with_trace).await.unwrap(),
        json!(format!("{parent} rojo=1,congo=2"))
    );
    // Without one, the command is not put in any trace the server's environment names.
    let (without, _progress) = ctx("trace", b"");
    assert_eq!(run(&handler, without).await.unwrap(), json!("unset unset"));
}

#[test]
fn undeclared_commands_and_extra_args_are_refused_at_submit() {
    let mut open = sh("");
    open.allow_extra_args = true;
    let mut registry = Registry::empty();
    registry.register("exec", exec([("closed", sh("")), ("open", open)]));
    let fields = |value: Value| -> Vec<String> {
        registry
            .validate("exec", &params(value))
            .unwrap()
            .into_iter()
            .map(|v| v.field)
            .collect()
    };

    let violations = registry
        .validate("exec", &params(json!({"command": "rm"})))
        .unwrap();
    assert_eq!(violations[0].field, "params.command");
    assert!(violations[0].description.contains("closed, open"));
    assert_eq!(fields(json!({})), ["params.command"]);
    assert_eq!(
        fields(json!({"command": "closed", "args": ["x"]})),
        ["params.args"]
    );
    assert_eq!(
        fields(json!({"command": "open", "args": ["a", "b", 3]})),
        ["params.args[2]"]
    );
    assert!(fields(json!({"command": "open", "args": ["a", "b"]})).is_empty());
    assert!(fields(json!({"command": "closed", "args": []})).is_empty());
}

#[test]
fn commands_deserialize_from_the_config_file() {
    let config = r#"
        [commands.count]
        program = "/bin/sh"
        args = ["-c", "echo hi"]
        description = "counts to three"
    "#;
    #[derive(Deserialize)]
    struct Table {
        commands: BTreeMap<String, ExecCommand>,
    }
    let table: Table = toml::from_str(config).unwrap();
    let count = &table.commands["count"];
    assert_eq!(count.program, Path::new("/bin/sh"));
    assert_eq!(count.description, "counts to three");
    assert!(!count.allow_extra_args);
    assert!(
        toml::from_str::<Table>("[commands.x]\nprogram = \"/bin/true\"\nshell = true").is_err()
    );
}

#[test]
fn describe_lists_the_declared_commands() {
    let mut count = sh("");
    count.description = "counts to three".to_owned();
    let description = exec([("count", count)]).describe();
    assert!(description.description.contains("- count: counts to three"));
    assert!(description.description.contains("@progress"));
    assert!(description.uses_input);
}

/// A declared script that starts `sleep 30` in the background, writes "<sh pid> <sleep pid>" to
/// a file, and waits; `prelude` runs first.
fn sleeper(prelude: &str, pid_file: &Path) -> ExecCommand {
    let mut command = sh(&format!(
        r#"{prelude}
        sleep 30 &
        echo "$$ $!" > "$1.tmp" && mv "$1.tmp" "$1"
        wait"#
    ));
    command.args.push(pid_file.display().to_string());
    command
}

/// Starts the `sleeper` command "s" of `handler` and returns the running action, its cancel
/// token and the pids of the shell and its sleep, once both run.
async fn start_sleeper(
    handler: Exec,
    pid_file: &Path,
) -> (
    tokio::task::JoinHandle<Result<Result<Value, HandlerError>, tokio::time::error::Elapsed>>,
    CancellationToken,
    [i32; 2],
) {
    let (ctx, _progress) = ctx("s", b"");
    let cancel = ctx.cancel.clone();
    let running = tokio::spawn(async move { timeout(LIMIT, handler.run(ctx)).await });
    (running, cancel, read_pids(pid_file).await)
}

#[tokio::test]
async fn cancel_stops_a_command_that_exits_on_sigterm_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    // A long grace: finishing well within it proves SIGTERM alone stopped the command.
    let handler = Exec::new(
        [("s".to_owned(), sleeper("", &pid_file))].into(),
        Duration::from_secs(30),
    );
    let (running, cancel, pids) = start_sleeper(handler, &pid_file).await;
    let started = tokio::time::Instant::now();
    cancel.cancel();
    let error = running
        .await
        .unwrap()
        .expect("stopped in time")
        .unwrap_err();
    assert_eq!(error, HandlerError::cancelled());
    assert!(started.elapsed() < Duration::from_secs(5));
    for pid in pids {
        assert_gone(pid).await;
    }
}

#[tokio::test]
async fn a_command_that_completes_with_a_result_after_sigterm_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let prelude = r#"trap 'echo "@result {\"finished\": true}"; exit 0' TERM"#;
    let handler = Exec::new(
        [("s".to_owned(), sleeper(prelude, &pid_file))].into(),
        Duration::from_secs(30),
    );
    let (running, cancel, _pids) = start_sleeper(handler, &pid_file).await;
    cancel.cancel();
    let result = running.await.unwrap().expect("stopped in time");
    assert_eq!(result, Ok(json!({"finished": true})));
}

#[tokio::test]
async fn a_command_that_exits_0_after_sigterm_without_a_result_was_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let handler = Exec::new(
        [("s".to_owned(), sleeper("trap 'exit 0' TERM", &pid_file))].into(),
        Duration::from_secs(30),
    );
    let (running, cancel, _pids) = start_sleeper(handler, &pid_file).await;
    cancel.cancel();
    let result = running.await.unwrap().expect("stopped in time");
    assert_eq!(result, Err(HandlerError::cancelled()));
}

#[tokio::test]
async fn cancel_kills_a_group_that_ignores_sigterm_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    // The ignored SIGTERM is inherited by the background sleep as well.
    let handler = exec([("s", sleeper("trap '' TERM", &pid_file))]);
    let (running, cancel, pids) = start_sleeper(handler, &pid_file).await;
    let started = tokio::time::Instant::now();
    cancel.cancel();
    let error = running
        .await
        .unwrap()
        .expect("stopped in time")
        .unwrap_err();
    assert_eq!(error, HandlerError::cancelled());
    assert!(started.elapsed() >= GRACE, "SIGKILL came before the grace");
    // Not only the shell the handler waits for: its child in the group is gone as well.
    for pid in pids {
        assert_gone(pid).await;
    }
}

#[tokio::test]
async fn what_a_command_left_running_in_its_group_is_killed_when_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    // The background sleep is not waited for; it also holds stdout and stderr open.
    let mut command = sh(r#"sleep 30 & echo "$$ $!" > "$1.tmp" && mv "$1.tmp" "$1"; exit 0"#);
    command.args.push(pid_file.display().to_string());
    let handler = exec([("s", command)]);
    let (ctx, _progress) = ctx("s", b"");
    run(&handler, ctx).await.expect("the command succeeded");
    let [_, sleep] = read_pids(&pid_file).await;
    assert_gone(sleep).await;
}

#[tokio::test]
async fn dropping_the_running_action_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let handler = exec([("s", sleeper("trap '' TERM", &pid_file))]);
    let (ctx, _progress) = ctx("s", b"");
    let mut running = Box::pin(handler.run(ctx));
    let pids = tokio::select! {
        outcome = &mut running => panic!("the action ended early: {outcome:?}"),
        pids = read_pids(&pid_file) => pids,
    };
    drop(running);
    for pid in pids {
        assert_gone(pid).await;
    }
}
