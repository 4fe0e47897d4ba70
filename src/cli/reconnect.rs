//! Getting a lost connection back, for the commands that follow a job to its end (`watch`,
//! `wait`, `submit --watch`, `submit --wait`): which failures are worth another try, and a
//! bounded exponential backoff between the tries, which starts over whenever an answer gets
//! through and gives up after about `--reconnect-for` of failing in a row.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use longrun::api::pb;
use tonic::{Code, Status};

use super::{Client, error::describe_status, parse_duration};

/// The first wait before reconnecting; doubled per failed attempt.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between two attempts (before jitter, which adds up to as much again).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// How long each call that checks a server speaks gRPC may take, how many there are at most,
/// and the pause between them (see [`Reconnect::check_speaks_grpc`]).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const PROBES: usize = 5;
const PROBE_SPACING: Duration = Duration::from_millis(50);

/// Whether the call broke on bytes that are not HTTP/2: a framing or protocol error that this
/// side's HTTP/2 found in what the peer sent (not one the peer reported).
fn not_http2(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>()
            && !h2.is_remote()
            && matches!(
                h2.reason(),
                Some(h2::Reason::PROTOCOL_ERROR | h2::Reason::FRAME_SIZE_ERROR)
            )
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// How long a command that follows a job keeps trying to get back a lost connection.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconnectArgs {
    /// Give up when reconnecting has failed for about this long in a row (e.g. 30s, 10m).
    #[arg(long, value_parser = parse_duration, default_value = "5m", value_name = "DURATION")]
    pub reconnect_for: Duration,
}

/// Whether a call that ended with `status` may be made again: the server or the network went
/// away (a restart, a drain, a dropped connection), as opposed to the server refusing the call
/// (NOT_FOUND, INVALID_ARGUMENT...).
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        // Made by the client itself from a broken connection (h2 or I/O error), not sent by
        // the server: the connection dropped mid-call.
        Code::Unknown | Code::Internal | Code::Cancelled => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// The backoff between attempts to get a call through again.
#[derive(Debug)]
pub struct Reconnect {
    policy: ExponentialBuilder,
    delays: ExponentialBackoff,
    /// How long to keep waiting between failed attempts in a row.
    budget: Duration,
    /// The waits handed out since the last answer got through.
    waited: Duration,
    /// Whether the server at `--addr` has answered a call of this command (or a probe).
    heard_from_server: bool,
}

/// What to do after a lost call: wait `delay`, then try again; `note` tells the user so.
#[derive(Debug)]
pub struct Retry {
    pub delay: Duration,
    pub note: String,
}

impl Reconnect {
    /// Keeps trying for about `args.reconnect_for` of waiting.
    pub fn new(args: &ReconnectArgs) -> Self {
        let policy = ExponentialBuilder::default()
            .with_min_delay(FIRST_RETRY_DELAY)
            .with_max_delay(MAX_RETRY_DELAY)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: policy.build(),
            policy,
            budget: args.reconnect_for,
            waited: Duration::ZERO,
            heard_from_server: false,
        }
    }

    /// An answer got through: the connection works, so the backoff and the budget start over.
    pub fn reset(&mut self) {
        self.delays = self.policy.build();
        self.waited = Duration::ZERO;
        self.heard_from_server = true;
    }

    /// Before a lost call is made again: fails when `--addr` does not speak gRPC over
    /// plaintext HTTP/2 (a TLS server addressed with `http://`, an HTTP/1 server), which no
    /// reconnect mends, so the command says so at once instead of after `--reconnect-for`.
    /// Such a connection breaks with the same errors as one to a server that died mid-call
    /// (a broken pipe, a closed stream), and sometimes with an HTTP/2 framing error, which only
    /// bytes that are not HTTP/2 cause. So when nothing of this command got an answer yet, a
    /// few short calls look for that error; any answer, a refused connection (a server gone)
    /// or no framing error in them (a proxy whose backend restarts) means retrying as usual.
    pub async fn check_speaks_grpc(
        &mut self,
        client: &mut Client,
        lost: &Status,
    ) -> anyhow::Result<()> {
        if self.heard_from_server || !is_transient(lost) || lost.code() == Code::Unavailable {
            return Ok(());
        }
        let mut status = lost.clone();
        for probe in 0..PROBES {
            if not_http2(&status) {
                return Err(anyhow::Error::new(status)
                    .context("the server at --addr does not answer gRPC over plaintext HTTP/2"));
            }
            if probe > 0 {
                tokio::time::sleep(PROBE_SPACING).await;
            }
            let call = client.list_actions(pb::ListActionsRequest::default());
            status = match tokio::time::timeout(PROBE_TIMEOUT, call).await {
                Err(_) => return Ok(()),
                Ok(Ok(_)) => {
                    self.heard_from_server = true;
                    return Ok(());
                }
                Ok(Err(status)) if !is_transient(&status) => {
                    // A refusal is an answer: it speaks gRPC.
                    self.heard_from_server = true;
                    return Ok(());
                }
                Ok(Err(status)) if status.code() == Code::Unavailable => return Ok(()),
                Ok(Err(status)) => status,
            };
        }
        if not_http2(&status) {
            return Err(anyhow::Error::new(status)
                .context("the server at --addr does not answer gRPC over plaintext HTTP/2"));
        }
        Ok(())
    }

    /// How long to wait before the next attempt, or `None` to give up once the waits since
    /// the last answer add up to the budget. The last wait is cut to what is left of it, so
    /// the caller gives up after the budget, not as soon as a full wait would overrun it.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let left = self
            .budget
            .checked_sub(self.waited)
            .filter(|d| !d.is_zero())?;
        let delay = self.delays.next()?.min(left);
        self.waited += delay;
        Some(delay)
    }

    /// After `call` was lost with `lost`: when to try again (`next` says what happens then,
    /// e.g. "resuming after version 12"), or the error that ends the command, for a refusal
    /// or once reconnecting has failed for too long (`last` says where it got to).
    pub fn after(
        &mut self,
        call: &str,
        lost: Status,
        next: &str,
        last: &str,
    ) -> anyhow::Result<Retry> {
        if !is_transient(&lost) {
            return Err(anyhow::Error::new(lost).context(call.to_owned()));
        }
        let Some(delay) = self.next_delay() else {
            return Err(anyhow::Error::new(lost).context(format!(
                "{call}: gave up reconnecting after about {}, {last}",
                humantime::format_duration(self.budget),
            )));
        };
        let note = format!(
            "connection lost ({}), {next} in {}",
            describe_status(&lost).lines().next().unwrap_or_default(),
            humantime::format_duration(round_to_millis(delay)),
        );
        Ok(Retry { delay, note })
    }
}

fn round_to_millis(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconnect_for(budget: Duration) -> Reconnect {
        Reconnect::new(&ReconnectArgs {
            reconnect_for: budget,
        })
    }

    #[test]
    fn backoff_grows_is_capped_and_starts_over_after_an_answer() {
        let mut reconnect = reconnect_for(Duration::from_secs(3600));
        let delays: Vec<Duration> = (0..12).map(|_| reconnect.next_delay().unwrap()).collect();
        // Jitter adds between 0 and 100% of each delay.
        assert!(delays[0] >= FIRST_RETRY_DELAY && delays[0] <= 2 * FIRST_RETRY_DELAY);
        assert!(delays[3] >= 8 * FIRST_RETRY_DELAY, "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= 2 * MAX_RETRY_DELAY),
            "{delays:?}"
        );
        assert!(delays[11] >= MAX_RETRY_DELAY, "{delays:?}");
        reconnect.reset();
        assert!(reconnect.next_delay().unwrap() <= 2 * FIRST_RETRY_DELAY);
    }

    #[test]
    fn gives_up_once_the_waiting_budget_is_spent() {
        let budget = Duration::from_secs(2);
        let mut reconnect = reconnect_for(budget);
        let mut waited = Duration::ZERO;
        let mut attempts = 0;
        while let Some(delay) = reconnect.next_delay() {
            waited += delay;
            attempts += 1;
            assert!(attempts < 100, "never gave up");
        }
        assert_eq!(waited, budget, "gave up after the whole budget, not before");
        assert!(attempts >= 3, "only {attempts} attempts");
        reconnect.reset();
        assert!(
            reconnect.next_delay().is_some(),
            "an answer starts the budget over"
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

    #[test]
    fn a_refusal_ends_at_once_and_a_loss_is_retried_with_a_note() {
        let mut reconnect = reconnect_for(Duration::from_secs(60));
        let refused = reconnect.after("WaitJob", Status::not_found("no job"), "", "");
        assert!(refused.is_err());
        let retry = reconnect
            .after(
                "WaitJob",
                Status::unavailable("draining"),
                "waiting again",
                "",
            )
            .unwrap();
        assert!(
            retry
                .note
                .starts_with("connection lost (draining (UNAVAILABLE)), waiting again in "),
            "{}",
            retry.note
        );
    }
}
