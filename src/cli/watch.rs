//! Following a job (`longrun watch`, `submit --watch`): one `WatchJob` stream, resumed after
//! any disconnect with `after_version` set to the last version seen, so nothing is missed and
//! nothing is shown twice, with a bounded exponential backoff between attempts.

use std::time::Duration;

use anyhow::Context as _;
use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use longrun::api::pb;
use tonic::{Code, Status};

use super::{
    Client, ClientArgs, Printer, bars::View, connect, error::describe_status, is_terminal,
    job_exit_code, parse_duration,
};

/// The first wait before reconnecting; doubled per failed attempt.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between two attempts (before jitter, which adds up to as much again).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// `longrun watch ID`.
#[derive(Debug, clap::Args)]
#[command(after_help = super::EXIT_CODES_HELP)]
pub struct WatchArgs {
    /// The job's id.
    pub id: String,
    #[command(flatten)]
    pub reconnect: ReconnectArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// How long a watch keeps trying to get back a lost connection.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconnectArgs {
    /// Give up when reconnecting has failed for about this long in a row (e.g. 30s, 10m).
    #[arg(long, value_parser = parse_duration, default_value = "5m", value_name = "DURATION")]
    pub reconnect_for: Duration,
}

/// Follows job `id` from now until it ends; the exit code tells how it ended.
pub async fn run(args: WatchArgs) -> anyhow::Result<i32> {
    let printer = Printer::new(args.client.output)?;
    let mut client = connect(&args.client).await?;
    // after_version 0: the stream starts with the current snapshot.
    let end = follow_from(&mut client, &printer, args.id, 0, &args.reconnect).await?;
    Ok(job_exit_code(&end))
}

/// Follows a job already shown at `job.version` (just submitted) until it ends; returns the
/// last snapshot. A job that has already ended (an idempotent resubmission, a submit that
/// waited) is shown and finished at once: nothing follows a terminal version.
pub async fn follow(
    client: &mut Client,
    printer: &Printer,
    job: pb::Job,
    reconnect: &ReconnectArgs,
) -> anyhow::Result<pb::Job> {
    if is_terminal(&job) {
        let mut view = View::new(printer);
        view.show(&job)?;
        view.finish(&job)?;
        return Ok(job);
    }
    follow_from(client, printer, job.id, job.version, reconnect).await
}

async fn follow_from(
    client: &mut Client,
    printer: &Printer,
    job_id: String,
    after_version: i64,
    reconnect: &ReconnectArgs,
) -> anyhow::Result<pb::Job> {
    let mut view = View::new(printer);
    let mut resume = Resume::new(job_id, after_version, reconnect.reconnect_for);
    loop {
        let lost = match client.watch_job(resume.request()).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            let job = message.job.context("a watch message holds no job")?;
                            if resume.observe(&job) {
                                view.show(&job)?;
                                if is_terminal(&job) {
                                    view.finish(&job)?;
                                    return Ok(job);
                                }
                            }
                        }
                        // The server closed the stream before the job ended: resume.
                        Ok(None) => break Status::unavailable("the stream ended early"),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        if !is_transient(&lost) {
            view.abandon();
            return Err(anyhow::Error::new(lost).context("WatchJob"));
        }
        let Some(delay) = resume.next_delay() else {
            view.abandon();
            return Err(anyhow::Error::new(lost).context(format!(
                "WatchJob: gave up reconnecting after about {}, last version seen {}",
                humantime::format_duration(reconnect.reconnect_for),
                resume.after_version,
            )));
        };
        view.note(&format!(
            "connection lost ({}), resuming after version {} in {}",
            describe_status(&lost).lines().next().unwrap_or_default(),
            resume.after_version,
            humantime::format_duration(round_to_millis(delay)),
        ));
        tokio::time::sleep(delay).await;
    }
}

fn round_to_millis(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether a watch that ended with `status` may be resumed: the server or the network went
/// away, as opposed to the server refusing the watch (NOT_FOUND, INVALID_ARGUMENT...).
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        // Made by the client itself from a broken connection (h2 or I/O error), not sent by
        // the server: the connection dropped mid-stream.
        Code::Unknown | Code::Internal | Code::Cancelled => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// The bookkeeping of a resumable watch: the last version seen, and the backoff between
/// reconnection attempts, which starts over whenever a message gets through.
#[derive(Debug)]
pub struct Resume {
    job_id: String,
    after_version: i64,
    policy: ExponentialBuilder,
    delays: ExponentialBackoff,
    /// How long to keep waiting between failed attempts in a row.
    budget: Duration,
    /// The waits handed out since the last message got through.
    waited: Duration,
}

impl Resume {
    /// A watch of `job_id` that has seen everything up to `after_version` and keeps trying to
    /// reconnect for about `give_up_after` of waiting.
    pub fn new(job_id: String, after_version: i64, give_up_after: Duration) -> Self {
        let policy = ExponentialBuilder::default()
            .with_min_delay(FIRST_RETRY_DELAY)
            .with_max_delay(MAX_RETRY_DELAY)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            job_id,
            after_version,
            delays: policy.build(),
            policy,
            budget: give_up_after,
            waited: Duration::ZERO,
        }
    }

    /// The request that resumes the watch.
    pub fn request(&self) -> pb::WatchJobRequest {
        pb::WatchJobRequest {
            job_id: self.job_id.clone(),
            after_version: self.after_version,
        }
    }

    /// Records a received snapshot. Returns false for one already seen (never shown twice);
    /// any message means the connection works, so the backoff starts over.
    pub fn observe(&mut self, job: &pb::Job) -> bool {
        self.delays = self.policy.build();
        self.waited = Duration::ZERO;
        if job.version <= self.after_version {
            return false;
        }
        self.after_version = job.version;
        true
    }

    /// How long to wait before the next attempt, or `None` to give up once the waits since
    /// the last message add up to the budget. The last wait is cut to what is left of it, so
    /// the watch gives up after the budget, not as soon as a full wait would overrun it.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let left = self
            .budget
            .checked_sub(self.waited)
            .filter(|d| !d.is_zero())?;
        let delay = self.delays.next()?.min(left);
        self.waited += delay;
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(version: i64) -> pb::Job {
        pb::Job {
            version,
            ..Default::default()
        }
    }

    #[test]
    fn resumes_after_the_last_version_seen_and_skips_repeats() {
        let mut resume = Resume::new("j".to_owned(), 0, Duration::from_secs(60));
        assert_eq!(resume.request().after_version, 0);
        assert!(resume.observe(&job(3)));
        assert!(resume.observe(&job(5)));
        assert!(
            !resume.observe(&job(5)),
            "a repeated version is not shown again"
        );
        assert!(!resume.observe(&job(4)), "versions never go backwards");
        let request = resume.request();
        assert_eq!((request.job_id.as_str(), request.after_version), ("j", 5));
    }

    #[test]
    fn backoff_grows_is_capped_and_starts_over_after_a_message() {
        let mut resume = Resume::new("j".to_owned(), 0, Duration::from_secs(3600));
        let delays: Vec<Duration> = (0..12).map(|_| resume.next_delay().unwrap()).collect();
        // Jitter adds between 0 and 100% of each delay.
        assert!(delays[0] >= FIRST_RETRY_DELAY && delays[0] <= 2 * FIRST_RETRY_DELAY);
        assert!(delays[3] >= 8 * FIRST_RETRY_DELAY, "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= 2 * MAX_RETRY_DELAY),
            "{delays:?}"
        );
        assert!(delays[11] >= MAX_RETRY_DELAY, "{delays:?}");
        resume.observe(&job(1));
        assert!(resume.next_delay().unwrap() <= 2 * FIRST_RETRY_DELAY);
    }

    #[test]
    fn gives_up_once_the_waiting_budget_is_spent() {
        let budget = Duration::from_secs(2);
        let mut resume = Resume::new("j".to_owned(), 0, budget);
        let mut waited = Duration::ZERO;
        let mut attempts = 0;
        while let Some(delay) = resume.next_delay() {
            waited += delay;
            attempts += 1;
            assert!(attempts < 100, "never gave up");
        }
        assert_eq!(waited, budget, "gave up after the whole budget, not before");
        assert!(attempts >= 3, "only {attempts} attempts");
        resume.observe(&job(1));
        assert!(
            resume.next_delay().is_some(),
            "a message starts the budget over"
        );
    }

    #[test]
    fn only_connection_failures_are_retried() {
        assert!(is_transient(&Status::unavailable("server restarting")));
        assert!(!is_transient(&Status::not_found("no such job")));
        assert!(!is_transient(&Status::invalid_argument("after_version")));
        // Sent by the server, so not a broken connection.
        assert!(!is_transient(&Status::internal("bug")));
        let broken = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert!(is_transient(&broken), "{broken:?}");
    }
}
