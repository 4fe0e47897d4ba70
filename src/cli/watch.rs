//! Following a job (`longrun watch`, `submit --watch`): one `WatchJob` stream, resumed after
//! any disconnect with `after_version` set to the last version seen, so nothing is missed and
//! nothing is shown twice, with the bounded backoff of [`Reconnect`] between attempts.

use anyhow::Context as _;
use longrun::api::pb;
use tonic::Status;

use super::{
    Client, ClientArgs, Printer,
    bars::View,
    connect, is_terminal, job_exit_code,
    reconnect::{Reconnect, ReconnectArgs},
};

/// `longrun watch ID`.
#[derive(Debug, clap::Args)]
#[command(after_help = super::WATCH_EXIT_CODES_HELP)]
pub struct WatchArgs {
    /// The job's id.
    pub id: String,
    #[command(flatten)]
    pub reconnect: ReconnectArgs,
    #[command(flatten)]
    pub client: ClientArgs,
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
    let mut resume = Resume::new(job_id, after_version, reconnect);
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
        let version = resume.after_version;
        if let Err(error) = resume.reconnect.check_speaks_grpc(client, &lost).await {
            view.abandon();
            return Err(error);
        }
        let retry = resume.reconnect.after(
            "WatchJob",
            lost,
            &format!("resuming after version {version}"),
            &format!("last version seen {version}"),
        );
        let retry = match retry {
            Ok(retry) => retry,
            Err(error) => {
                view.abandon();
                return Err(error);
            }
        };
        view.note(&retry.note);
        tokio::time::sleep(retry.delay).await;
    }
}

/// The bookkeeping of a resumable watch: the last version seen, and the backoff between
/// reconnection attempts, which starts over whenever a message gets through.
#[derive(Debug)]
pub struct Resume {
    job_id: String,
    after_version: i64,
    reconnect: Reconnect,
}

impl Resume {
    /// A watch of `job_id` that has seen everything up to `after_version` and keeps trying to
    /// reconnect as `reconnect` says.
    pub fn new(job_id: String, after_version: i64, reconnect: &ReconnectArgs) -> Self {
        Self {
            job_id,
            after_version,
            reconnect: Reconnect::new(reconnect),
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
        self.reconnect.reset();
        if job.version <= self.after_version {
            return false;
        }
        self.after_version = job.version;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn job(version: i64) -> pb::Job {
        pb::Job {
            version,
            ..Default::default()
        }
    }

    #[test]
    fn resumes_after_the_last_version_seen_and_skips_repeats() {
        let args = ReconnectArgs {
            reconnect_for: Duration::from_secs(60),
        };
        let mut resume = Resume::new("j".to_owned(), 0, &args);
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
}
