//! `longrun submit`: builds a `SubmitRequest` from flags or a JSON file, submits it, and then
//! prints the job, or (with `--watch`) follows it with live progress.
//!
//! Actions on the command line: `--action NAME[:PARAMS]`, repeatable, where everything after
//! the first `:` is the params as a JSON object, e.g. `--action 'sleep:{"duration_ms":3000}'`.
//! One flag per action keeps the order of actions and the params that go with each
//! unambiguous, which separate `--action`/`--params` flags could not (clap does not keep the
//! order between different flags).

use std::{io::Read as _, path::PathBuf, time::Duration};

use tokio::time::Instant;

use anyhow::Context as _;
use longrun::api::{convert::json_to_struct, pb};

use super::{
    Client, ClientArgs, Printer,
    commands::{label_map, parse_label},
    connect,
    error::Usage,
    exit, is_terminal, job_exit_code, json, parse_duration,
    reconnect::{Reconnect, ReconnectArgs, is_transient},
    text, wait, watch, wire_duration,
};

/// `longrun submit`.
#[derive(Debug, clap::Args)]
#[command(after_help = super::EXIT_CODES_HELP)]
#[command(group = clap::ArgGroup::new("job").required(true).multiple(false).args(["actions", "file"]))]
pub struct SubmitArgs {
    /// An action to run, in order: NAME or NAME:PARAMS, PARAMS a JSON object
    /// (e.g. --action 'sleep:{"duration_ms":3000}'). Repeatable.
    #[arg(long = "action", value_name = "NAME[:PARAMS]")]
    pub actions: Vec<String>,
    /// Binary input for the last --action, read from PATH ('-' reads stdin).
    #[arg(long, requires = "actions", value_name = "PATH")]
    pub input_file: Option<PathBuf>,
    /// A whole SubmitRequest in proto3 JSON; the flags below override or add to it.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// A retried submit with the same key returns the first job instead of a new one.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A time limit for each attempt (e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Attempts the job may have in all (retries with backoff); the server's default if unset.
    #[arg(long, allow_negative_numbers = true)]
    pub max_attempts: Option<i32>,
    /// Higher runs first (negative numbers run after the default, 0).
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Run the job no earlier than this RFC 3339 time (e.g. 2026-12-01T09:00:00Z or
    /// 2026-12-01T10:00:00+01:00); it waits QUEUED until then.
    #[arg(long, value_parser = parse_time, conflicts_with = "delay", value_name = "TIME")]
    pub at: Option<prost_types::Timestamp>,
    /// Run the job no earlier than this long from now (e.g. 90s, 2h): --at now + DURATION.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub delay: Option<Duration>,
    /// A label KEY=VALUE to find the job by in `list`. Repeatable.
    #[arg(long = "label", value_parser = parse_label, value_name = "KEY=VALUE")]
    pub labels: Vec<(String, String)>,
    /// Sync mode: the server answers when the job ends or after this long (e.g. 10s); the exit
    /// code then tells how the job ended.
    #[arg(long, value_parser = parse_duration, conflicts_with = "watch", value_name = "DURATION")]
    pub wait: Option<Duration>,
    /// POST the job's state changes to this http(s) URL, signed (see docs/webhooks.md).
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// The key that signs the webhook's deliveries (or the LONGRUN_WEBHOOK_SECRET environment
    /// variable, which the process list does not show); the server's default if unset.
    // Not clap's `env`: a secret from the environment applies only to a webhook given
    // somewhere, while the flag without a webhook is a mistake to name, and clap cannot tell
    // the two apart afterwards.
    #[arg(long, value_name = "SECRET")]
    pub webhook_secret: Option<String>,
    /// Which state changes the webhook reports [default: terminal].
    #[arg(long, value_enum, value_name = "WHICH")]
    pub webhook_events: Option<WebhookEventsArg>,
    /// Follow the job after submitting it, with a progress bar per action on a terminal; the
    /// exit code tells how the job ended.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub reconnect: ReconnectArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The environment variable a webhook's secret may come from instead of `--webhook-secret`.
const WEBHOOK_SECRET_VARIABLE: &str = "LONGRUN_WEBHOOK_SECRET";

/// Which state changes a webhook reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookEventsArg {
    /// The terminal state only.
    Terminal,
    /// Every change of the job's state.
    All,
}

/// Submits the job and prints it, or follows it with `--watch`.
pub async fn run(args: SubmitArgs) -> anyhow::Result<i32> {
    let printer = Printer::new(args.client.output)?;
    let mut request = build_request(&args, &printer.json)?;
    if request.idempotency_key.is_empty() {
        // Lets a Submit whose answer was lost be sent again without a second job.
        request.idempotency_key = format!("longrun-cli-{}", uuid::Uuid::now_v7());
    }
    // `wait` from the flag or from the --file: the time to wait counts from now.
    let deadline = request
        .wait
        .map(|wait| {
            let wait = Duration::try_from(wait)
                .map_err(|_| Usage("the wait must not be negative".to_owned()))?;
            wait::deadline_after("--wait", wait)
        })
        .transpose()?;
    let mut client = connect(&args.client).await?;
    let mut response = submit_once(&mut client, request, deadline, &args.reconnect).await?;
    let mut job = response
        .job
        .clone()
        .context("the server's response holds no job")?;
    if args.watch {
        printer.print(&response, "longrun.v1.SubmitResponse", |_| job.id.clone())?;
        let end = watch::follow(&mut client, &printer, job, &args.reconnect).await?;
        return Ok(job_exit_code(&end));
    }
    let Some(deadline) = deadline else {
        printer.print(&response, "longrun.v1.SubmitResponse", |json| {
            text::job(&job, json)
        })?;
        return Ok(exit::OK);
    };
    if !is_terminal(&job) && Instant::now() < deadline {
        // The server answered before the job ended and before the wait was over: it is
        // shutting down. The job exists, so wait for it (across the restart) with what is left.
        let waited =
            match wait::until_end(&mut client, &job.id, Some(deadline), &args.reconnect).await {
                Ok(waited) => waited,
                Err(error) => {
                    // The job exists: print it as last seen, as a wait that ends prints it, so
                    // a script gets its id (`| head -1`) instead of submitting it again.
                    printer.print(&response, "longrun.v1.SubmitResponse", |json| {
                        text::end_unknown(&job, json)
                    })?;
                    return Err(error.context(format!(
                        "job {} was submitted, and how it stands is unknown",
                        job.id
                    )));
                }
            };
        job = waited.job.context("the server's response holds no job")?;
        response.job = Some(job.clone());
    }
    printer.print(&response, "longrun.v1.SubmitResponse", |json| {
        text::waited(&job, is_terminal(&job), json)
    })?;
    Ok(job_exit_code(&job))
}

/// Submits the job once, however many calls that takes: a call lost with the connection (the
/// server restarted, or died while it held a `wait`) is sent again, saying so on stderr, under
/// the same idempotency key, so it finds the job the lost call stored rather than making a
/// second one. Each call asks for what is left of the wait. Gives up as a watch does (see
/// `--reconnect-for`), naming the key, with which the job can be found again.
async fn submit_once(
    client: &mut Client,
    mut request: pb::SubmitRequest,
    deadline: Option<Instant>,
    reconnect: &ReconnectArgs,
) -> anyhow::Result<pb::SubmitResponse> {
    let mut reconnect = Reconnect::new(reconnect);
    loop {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            request.wait = Some(wire_duration("--wait", left)?);
        }
        let lost = match client.submit(request.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) => status,
        };
        let key = &request.idempotency_key;
        let may_be_stored = || {
            format!(
                "the job may have been stored: the same request with --idempotency-key {key} \
                 finds it"
            )
        };
        // Not told "may have been stored": a peer that speaks no HTTP/2 stored nothing.
        reconnect.check_speaks_grpc(client, &lost).await?;
        let transient = is_transient(&lost);
        let retry = reconnect.after(
            "Submit",
            lost,
            "submitting again under the same idempotency key",
            "the job's submission unconfirmed",
        );
        let retry = match retry {
            Ok(retry) => retry,
            Err(error) if transient => return Err(error.context(may_be_stored())),
            Err(error) => return Err(error),
        };
        eprintln!("{}", retry.note);
        tokio::time::sleep(retry.delay).await;
    }
}

/// The request the flags (over the `--file`, if given) describe.
fn build_request(args: &SubmitArgs, json: &json::Json) -> anyhow::Result<pb::SubmitRequest> {
    let mut request = match &args.file {
        Some(path) => {
            let text = read_input(path)?;
            json.decode::<pb::SubmitRequest>(&text, "longrun.v1.SubmitRequest")
                .map_err(|e| Usage(format!("--file {}: {e:#}", path.display())))?
        }
        None => pb::SubmitRequest::default(),
    };
    for spec in &args.actions {
        request.actions.push(parse_action(spec)?);
    }
    if let (Some(path), Some(last)) = (&args.input_file, request.actions.last_mut()) {
        last.input = read_input_bytes(path)?.into();
    }
    if let Some(key) = &args.idempotency_key {
        request.idempotency_key.clone_from(key);
    }
    if let Some(timeout) = args.timeout {
        request.timeout = Some(wire_duration("--timeout", timeout)?);
    }
    if let Some(wait) = args.wait {
        request.wait = Some(wire_duration("--wait", wait)?);
    }
    if let Some(max_attempts) = args.max_attempts {
        // 0 would mean the server's default on the wire, which leaving the flag out says.
        if max_attempts < 1 {
            return Err(Usage(format!(
                "--max-attempts {max_attempts}: must be at least 1 (leave it out for the \
                 server's default)"
            ))
            .into());
        }
        request.max_attempts = max_attempts;
    }
    if let Some(priority) = args.priority {
        request.priority = priority;
    }
    if let Some(at) = args.at {
        request.schedule_time = Some(at);
    }
    if let Some(delay) = args.delay {
        let at = std::time::SystemTime::now()
            .checked_add(delay)
            .ok_or_else(|| Usage(format!("--delay: {delay:?} is too long")))?;
        request.schedule_time = Some(at.into());
    }
    // Added to the file's labels; one the flags would change is refused, as a key given
    // twice is.
    for (key, value) in label_map(&args.labels)? {
        if let Some(file) = request.labels.get(&key)
            && *file != value
        {
            return Err(Usage(format!(
                "--label {key}={value}: the --file gives the job {key}={file}"
            ))
            .into());
        }
        request.labels.insert(key, value);
    }
    if args.webhook_url.is_some() || request.webhook.is_some() {
        let webhook = request.webhook.get_or_insert_default();
        if let Some(url) = &args.webhook_url {
            webhook.url.clone_from(url);
        }
        let from_environment = || {
            std::env::var(WEBHOOK_SECRET_VARIABLE)
                .ok()
                .filter(|secret| !secret.is_empty())
        };
        if let Some(secret) = args.webhook_secret.clone().or_else(from_environment) {
            webhook.secret = secret;
        }
        if let Some(events) = args.webhook_events {
            webhook.events = match events {
                WebhookEventsArg::Terminal => pb::WebhookEvents::Terminal,
                WebhookEventsArg::All => pb::WebhookEvents::All,
            } as i32;
        }
    } else if args.webhook_events.is_some() {
        return Err(Usage("--webhook-events needs --webhook-url".to_owned()).into());
    } else if args.webhook_secret.is_some() {
        return Err(Usage("--webhook-secret needs --webhook-url".to_owned()).into());
    }
    Ok(request)
}

/// Parses an RFC 3339 time, with `Z` or an offset. One without (a bare date, a local time)
/// is refused rather than taken as UTC, which would run the job hours off for most users.
fn parse_time(text: &str) -> Result<prost_types::Timestamp, String> {
    let invalid = || {
        format!(
            "{text:?} is not an RFC 3339 time (like 2026-12-01T09:00:00Z or 2026-12-01T10:00:00+01:00)"
        )
    };
    let bytes = text.as_bytes();
    let offset = |suffix: &[u8]| {
        matches!(suffix, [sign, h1, h2, b':', m1, m2]
            if matches!(sign, b'+' | b'-') && [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()))
    };
    let zoned =
        text.ends_with(['Z', 'z']) || (bytes.len() > 6 && offset(&bytes[bytes.len() - 6..]));
    if !zoned {
        return Err(format!(
            "{}: say which time zone, with Z (UTC) or an offset such as +01:00",
            invalid()
        ));
    }
    if !matches!(bytes.get(10), Some(b'T' | b't')) {
        return Err(invalid());
    }
    text.parse().map_err(|_| invalid())
}

/// Parses `NAME` or `NAME:PARAMS` (PARAMS a JSON object).
fn parse_action(spec: &str) -> Result<pb::ActionSpec, Usage> {
    let (name, params) = match spec.split_once(':') {
        Some((name, params)) => (name, Some(params)),
        None => (spec, None),
    };
    if name.is_empty() {
        return Err(Usage(format!(
            "--action {spec:?}: expected NAME or NAME:PARAMS"
        )));
    }
    let params = match params {
        None => None,
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => Some(json_to_struct(&map)),
            Ok(_) => {
                return Err(Usage(format!(
                    "--action {name}: params must be a JSON object, like {name}:{{\"key\":1}}"
                )));
            }
            Err(error) => {
                return Err(Usage(format!(
                    "--action {name}: params are not valid JSON: {error}"
                )));
            }
        },
    };
    Ok(pb::ActionSpec {
        name: name.to_owned(),
        params,
        input: Default::default(),
    })
}

fn read_input_bytes(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("reading stdin")?;
    } else {
        bytes = std::fs::read(path)
            .map_err(|e| Usage(format!("cannot read {}: {e}", path.display())))?;
    }
    Ok(bytes)
}

fn read_input(path: &PathBuf) -> anyhow::Result<String> {
    String::from_utf8(read_input_bytes(path)?)
        .map_err(|_| Usage(format!("{} is not UTF-8 text", path.display())).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_name_and_params_after_the_first_colon() {
        let action = parse_action(r#"echo:{"message":"a:b"}"#).unwrap();
        assert_eq!(action.name, "echo");
        let params = action.params.unwrap();
        assert!(params.fields.contains_key("message"));
        assert!(parse_action("sleep").unwrap().params.is_none());
    }

    /// `longrun submit --action echo` with `extra` flags, as clap parses it.
    fn parse_args(extra: &[&str]) -> Result<SubmitArgs, clap::Error> {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SubmitArgs,
        }
        let mut argv = vec!["longrun", "--action", "echo"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|cli| cli.args)
    }

    #[test]
    fn a_label_key_given_twice_with_two_values_is_refused() {
        let json = json::Json::new().unwrap();
        let args = parse_args(&["--label", "a=b", "--label", "a=c"]).unwrap();
        let error = build_request(&args, &json).unwrap_err();
        assert!(super::super::error::is_usage(&error), "{error:#}");
        assert!(
            format!("{error:#}").contains("--label a given twice"),
            "{error:#}"
        );
        // The same pair twice asks for nothing contradictory.
        let args = parse_args(&["--label", "a=b", "--label", "x=y", "--label", "a=b"]).unwrap();
        let labels = build_request(&args, &json).unwrap().labels;
        assert_eq!(labels.len(), 2);
    }

    #[test]
    fn max_attempts_below_one_is_refused() {
        let json = json::Json::new().unwrap();
        for n in ["0", "-1"] {
            let args = parse_args(&["--max-attempts", n]).unwrap();
            let error = build_request(&args, &json).unwrap_err();
            assert!(super::super::error::is_usage(&error), "{error:#}");
            assert!(format!("{error:#}").contains("at least 1"), "{error:#}");
        }
        let args = parse_args(&["--max-attempts", "3", "--output", "JSON"]).unwrap();
        assert_eq!(build_request(&args, &json).unwrap().max_attempts, 3);
    }

    #[test]
    fn a_label_that_would_change_one_of_the_file_s_is_refused() {
        let json = json::Json::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.json");
        std::fs::write(&file, r#"{"actions":[{"name":"echo"}],"labels":{"a":"1"}}"#).unwrap();
        let parse = |extra: &[&str]| {
            use clap::Parser as _;
            #[derive(clap::Parser)]
            struct Cli {
                #[command(flatten)]
                args: SubmitArgs,
            }
            let mut argv = vec!["longrun", "--file", file.to_str().unwrap()];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).unwrap().args
        };
        let error = build_request(&parse(&["--label", "a=2"]), &json).unwrap_err();
        assert!(super::super::error::is_usage(&error), "{error:#}");
        assert!(format!("{error:#}").contains("a=1"), "{error:#}");
        let labels = build_request(&parse(&["--label", "a=1", "--label", "b=2"]), &json)
            .unwrap()
            .labels;
        assert_eq!(labels.len(), 2, "added to the file's");
    }

    #[test]
    fn at_takes_an_rfc_3339_time_with_its_zone_only() {
        for zoned in [
            "2026-12-01T09:00:00Z",
            "2026-12-01t09:00:00z",
            "2026-12-01T10:00:00+01:00",
            "2026-12-01T04:00:00.250-05:00",
        ] {
            assert!(parse_time(zoned).is_ok(), "{zoned}");
        }
        for unzoned in [
            "2026-12-01T09:00:00",
            "2026-12-01",
            "2026-12-01T09:00:00+0100",
        ] {
            let error = parse_time(unzoned).unwrap_err();
            assert!(error.contains("say which time zone"), "{unzoned}: {error}");
        }
        for malformed in ["2026-12-01 09:00:00Z", "tomorrow Z", "2026-13-01T09:00:00Z"] {
            assert!(parse_time(malformed).is_err(), "{malformed}");
        }
    }

    #[test]
    fn webhook_flags_build_the_request_webhook() {
        let parse = |extra: &[&str]| parse_args(extra).unwrap();
        let json = json::Json::new().unwrap();
        let args = parse(&[
            "--webhook-url",
            "https://hooks.example.com/x",
            "--webhook-secret",
            "s",
            "--webhook-events",
            "all",
        ]);
        let webhook = build_request(&args, &json).unwrap().webhook.unwrap();
        assert_eq!(webhook.url, "https://hooks.example.com/x");
        assert_eq!(webhook.secret, "s");
        assert_eq!(webhook.events(), pb::WebhookEvents::All);
        let args = parse(&["--webhook-secret", "s"]);
        assert!(
            build_request(&args, &json)
                .unwrap_err()
                .to_string()
                .contains("--webhook-secret needs --webhook-url")
        );
        let args = parse(&["--webhook-events", "terminal"]);
        assert!(build_request(&args, &json).is_err());
    }

    #[test]
    fn at_and_delay_set_the_schedule_time() {
        let json = json::Json::new().unwrap();
        let request = |extra: &[&str]| build_request(&parse_args(extra).unwrap(), &json).unwrap();
        let at = request(&["--at", "2026-12-01T10:00:00.5+01:00"]).schedule_time;
        assert_eq!(
            at,
            Some(prost_types::Timestamp {
                seconds: 1_796_115_600,
                nanos: 500_000_000
            })
        );
        let before = std::time::SystemTime::now();
        let delayed = request(&["--delay", "90s"]).schedule_time.unwrap();
        let delayed = std::time::SystemTime::try_from(delayed).unwrap();
        let ahead = delayed.duration_since(before).unwrap();
        assert!(ahead >= Duration::from_secs(90) && ahead < Duration::from_secs(100));
        assert_eq!(request(&[]).schedule_time, None);
        assert!(parse_args(&["--at", "tomorrow"]).is_err());
        assert!(parse_args(&["--at", "2026-12-01T10:00:00Z", "--delay", "1s"]).is_err());
    }

    #[test]
    fn bad_action_specs_are_usage_errors_that_say_why() {
        assert!(parse_action(":{}").unwrap_err().0.contains("NAME"));
        assert!(
            parse_action("sleep:[1]")
                .unwrap_err()
                .0
                .contains("JSON object")
        );
        assert!(
            parse_action("sleep:{oops")
                .unwrap_err()
                .0
                .contains("not valid JSON")
        );
    }
}
