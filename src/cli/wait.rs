//! Waiting for a job to end without a stream (`longrun wait`, `submit --wait`): `WaitJob`,
//! called again after a lost connection or a server that shut down before the job ended
//! (UNAVAILABLE), with the backoff and the `--reconnect-for` bound of `watch`, while the
//! caller's own time limit holds across all the calls.

use std::time::Duration;

use anyhow::Context as _;
use longrun::api::pb;
use tokio::time::Instant;
use tonic::Status;

use super::{
    Client, ClientArgs, Printer, connect, exit, job_exit_code, parse_duration,
    reconnect::{Reconnect, ReconnectArgs, is_transient},
    text, wire_duration,
};

/// `longrun wait ID`.
#[derive(Debug, clap::Args)]
#[command(after_help = super::EXIT_CODES_HELP)]
pub struct WaitArgs {
    /// The job's id.
    pub id: String,
    /// Wait at most this long (e.g. 30s, 5m); without it, until the job ends.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub reconnect: ReconnectArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Waits for a job; the exit code tells how it ended, or that the wait ran out.
pub async fn run(args: WaitArgs) -> anyhow::Result<i32> {
    let printer = Printer::new(args.client.output)?;
    let mut client = connect(&args.client).await?;
    let deadline = args
        .timeout
        .map(|timeout| deadline_after("--timeout", timeout));
    let deadline = deadline.transpose()?;
    let response = until_end(&mut client, &args.id, deadline, &args.reconnect).await?;
    let job = response
        .job
        .as_ref()
        .context("the server's response holds no job")?;
    printer.print(&response, "longrun.v1.WaitJobResponse", |json| {
        text::waited(job, response.done, json)
    })?;
    Ok(if response.done {
        job_exit_code(job)
    } else {
        exit::NOT_DONE
    })
}

/// The instant `wait` from now, refusing one too far off to represent.
pub fn deadline_after(flag: &str, wait: Duration) -> anyhow::Result<Instant> {
    Instant::now()
        .checked_add(wait)
        .with_context(|| format!("{flag}: {wait:?} is too long"))
}

/// Waits until job `job_id` ends or `deadline` (if any) passes, and returns the last answer.
///
/// A lost connection, or a server that answers UNAVAILABLE because it shuts down before the
/// job ends, is not the end of the wait: it is tried again, saying so on stderr, until
/// reconnecting has failed for about `reconnect.reconnect_for` in a row. Each call asks for
/// what is left of the deadline, so reconnects do not stretch it.
pub async fn until_end(
    client: &mut Client,
    job_id: &str,
    deadline: Option<Instant>,
    reconnect: &ReconnectArgs,
) -> anyhow::Result<pb::WaitJobResponse> {
    let mut reconnect = Reconnect::new(reconnect);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let request = pb::WaitJobRequest {
            job_id: job_id.to_owned(),
            timeout: left.map(|t| wire_duration("--timeout", t)).transpose()?,
        };
        let lost = match client.wait_job(request).await {
            Ok(response) => {
                let response = response.into_inner();
                let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
                if response.done || out_of_time {
                    return Ok(response);
                }
                // An answer before the job ended and before the time asked for: a server that
                // stopped waiting (one older than SHUTTING_DOWN answers, draining). Tried again
                // as a lost call, without starting the backoff over, so it cannot spin.
                Status::unavailable("the server stopped waiting before the job ended")
            }
            Err(status) => status,
        };
        if is_transient(&lost) && left.is_some_and(|left| left.is_zero()) {
            // The last call, made with nothing left of the time, found nobody: the job's
            // state is unknown, so this is not "the wait ran out" (exit 4) but an error.
            return Err(anyhow::Error::new(lost).context(
                "WaitJob: the time to wait ran out while the server could not be reached",
            ));
        }
        reconnect.check_speaks_grpc(client, &lost).await?;
        let retry = reconnect.after("WaitJob", lost, "waiting again", "the job's end not seen")?;
        eprintln!("{}", retry.note);
        // Never sleep past the deadline: the last call still gets the job as it is then.
        let delay = left.map_or(retry.delay, |left| retry.delay.min(left));
        tokio::time::sleep(delay).await;
    }
}
