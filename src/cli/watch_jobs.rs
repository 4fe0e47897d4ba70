//! `longrun watch-jobs`: one `WatchJobs` stream for every job carrying some labels, printed a
//! line per change, resumed after any disconnect from the cursor of the last message, so
//! nothing is missed and nothing is printed twice. With `--until-done` it ends once every job
//! it follows has ended, which makes it the way to wait for a whole batch from a script.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Context as _;
use longrun::api::pb;
use tonic::Status;

use super::{
    Client, ClientArgs, Printer,
    commands::{StateFilter, label_map, parse_label},
    connect, exit, is_terminal,
    reconnect::{Reconnect, ReconnectArgs},
    text,
};

/// The exit codes, as `--help` shows them.
const EXIT_CODES_HELP: &str = "Exit codes: with --until-done, 0 every job that ended while \
watched SUCCEEDED, 1 one FAILED, 3 one was CANCELLED (and none failed); 130 interrupted \
(Ctrl-C), after naming the cursor to resume from; 2 a mistake on the command line; 5 any other \
error (the server unreachable, an RPC error, a cursor whose history was removed).";

/// Ctrl-C's conventional exit code (128 + SIGINT).
const INTERRUPTED: i32 = 130;

/// `longrun watch-jobs`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct WatchJobsArgs {
    /// Only jobs carrying this label (KEY=VALUE; repeatable, all must match); none for every job.
    #[arg(long = "label", value_parser = parse_label, value_name = "KEY=VALUE")]
    pub labels: Vec<(String, String)>,
    /// Only print snapshots in these states (repeat the flag, or separate with commas); the
    /// jobs are still followed through the others.
    #[arg(
        long = "state",
        value_enum,
        ignore_case = true,
        value_delimiter = ',',
        value_name = "STATE",
        conflicts_with = "until_done"
    )]
    pub states: Vec<StateFilter>,
    /// Resume after this cursor: the `cursor` of the last message a previous run printed (with
    /// --output json), or the one it named when interrupted. Without it the watch starts with
    /// the current snapshot of each matching unfinished job.
    #[arg(long, value_name = "CURSOR")]
    pub after_cursor: Option<String>,
    /// End once every matching job has ended (those unfinished at the start and those
    /// submitted meanwhile); the exit code tells how they ended. Without it the watch goes on
    /// until interrupted. Not with --after-cursor: what a resumed stream replays cannot be
    /// told apart from what happens next, so run it again without one instead.
    #[arg(long, conflicts_with = "after_cursor")]
    pub until_done: bool,
    #[command(flatten)]
    pub reconnect: ReconnectArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Watches until interrupted, or with `--until-done` until every matching job has ended.
pub async fn run(args: WatchJobsArgs) -> anyhow::Result<i32> {
    let printer = Printer::new(args.client.output)?;
    let mut client = connect(&args.client).await?;
    let labels = label_map(&args.labels)?;
    let mut watch = Watch {
        request: pb::WatchJobsRequest {
            labels,
            states: args
                .states
                .into_iter()
                .map(|s| pb::JobState::from(s) as i32)
                .collect(),
            after_cursor: args.after_cursor.unwrap_or_default(),
        },
        reconnect: Reconnect::new(&args.reconnect),
        batch: args.until_done.then(Batch::default),
    };
    tokio::select! {
        code = watch.follow(&mut client, &printer) => code,
        interrupted = tokio::signal::ctrl_c() => {
            interrupted.context("listening for Ctrl-C")?;
            if !watch.request.after_cursor.is_empty() {
                eprintln!(
                    "interrupted; resume with --after-cursor {}",
                    watch.request.after_cursor
                );
            }
            Ok(INTERRUPTED)
        }
    }
}

/// How long a watch with nothing to wait for still reads what the stream already holds (see
/// [`Watch::session`]): the stream's first snapshots are ready when it opens, so they follow at
/// once; this only has to cover a busy server.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

/// How one stream of a watch ended.
enum Stop {
    /// The watch is done: exit with this code.
    Done(i32),
    /// This call was lost (or refused) with this status: reconnect, or give up.
    Lost(&'static str, Status),
    /// Something that reconnecting cannot mend.
    Failed(anyhow::Error),
}

/// A resumable watch: the request that resumes it (its cursor kept up to date), the backoff
/// between reconnections, and with `--until-done` the jobs still to end.
struct Watch {
    request: pb::WatchJobsRequest,
    reconnect: Reconnect,
    batch: Option<Batch>,
}

impl Watch {
    async fn follow(&mut self, client: &mut Client, printer: &Printer) -> anyhow::Result<i32> {
        loop {
            let (call, lost) = match self.session(client, printer).await {
                Stop::Done(code) => return Ok(code),
                Stop::Failed(error) => return Err(error),
                Stop::Lost(call, lost) => (call, lost),
            };
            if let Some(batch) = self.batch.as_mut()
                && self.request.after_cursor.is_empty()
            {
                // No message got through: the next stream starts over from fresh snapshots,
                // which leave out the jobs that ended meanwhile, so the batch is listed again.
                batch.listed = false;
            }
            self.reconnect.check_speaks_grpc(client, &lost).await?;
            let retry = self.reconnect.after(
                call,
                lost,
                "resuming from the last cursor",
                "at the last cursor",
            )?;
            eprintln!("{}", retry.note);
            tokio::time::sleep(retry.delay).await;
        }
    }

    /// One stream, from opening it until it is lost or the watch is done.
    async fn session(&mut self, client: &mut Client, printer: &Printer) -> Stop {
        let mut stream = match client.watch_jobs(self.request.clone()).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Stop::Lost("WatchJobs", status),
        };
        if let Some(batch) = self.batch.as_mut().filter(|b| !b.listed) {
            // Listed once the stream is open, so that every job listed unfinished has its end
            // still to come on the stream (see `Batch`).
            if let Err((call, status)) = batch.list(client, &self.request.labels).await {
                return Stop::Lost(call, status);
            }
            if batch.unfinished.is_empty() {
                // Nothing to wait for, unless jobs unfinished when the stream opened ended
                // before the listing: their snapshots and ends are on the stream already,
                // sent as soon as it opened.
                while let Ok(next) = tokio::time::timeout(SETTLE, stream.message()).await {
                    if let Some(stop) = self.on_message(printer, next) {
                        return stop;
                    }
                }
            }
        }
        if let Some(code) = self.batch.as_ref().and_then(Batch::done) {
            return Stop::Done(code);
        }
        loop {
            let next = stream.message().await;
            if let Some(stop) = self.on_message(printer, next) {
                return stop;
            }
        }
    }

    /// What the stream's next item means: `None` to read on.
    fn on_message(
        &mut self,
        printer: &Printer,
        next: Result<Option<pb::WatchJobsResponse>, Status>,
    ) -> Option<Stop> {
        match next {
            Ok(Some(message)) => match self.observe(printer, &message) {
                Ok(None) => None,
                Ok(Some(code)) => Some(Stop::Done(code)),
                Err(error) => Some(Stop::Failed(error)),
            },
            // A WatchJobs stream only ends on an error or at a shutdown: one that ends is
            // resumed.
            Ok(None) => Some(Stop::Lost(
                "WatchJobs",
                Status::unavailable("the stream ended"),
            )),
            Err(status) => Some(Stop::Lost("WatchJobs", status)),
        }
    }

    /// Prints a message and moves the cursor past it; `Some(code)` once `--until-done` is done.
    fn observe(
        &mut self,
        printer: &Printer,
        message: &pb::WatchJobsResponse,
    ) -> anyhow::Result<Option<i32>> {
        self.reconnect.reset();
        let job = message
            .job
            .as_ref()
            .context("a watch message holds no job")?;
        printer.print(message, "longrun.v1.WatchJobsResponse", |_| {
            text::job_change(job)
        })?;
        self.request.after_cursor.clone_from(&message.cursor);
        match self.batch.as_mut() {
            Some(batch) => {
                batch.observe(job);
                Ok(batch.done())
            }
            // Its reader has gone (`| head -5`): an endless watch has nothing left to do.
            None if printer.closed() => Ok(Some(exit::OK)),
            None => Ok(None),
        }
    }
}

/// The jobs `--until-done` waits for. The stream follows every matching job unfinished when
/// it opened or submitted after; the listing, made after it opened, adds the unfinished ones
/// whose snapshots are still to come. A job listed that had in fact ended by then has its end
/// on the stream too, so the set only ever waits for ends that will arrive.
#[derive(Default)]
struct Batch {
    listed: bool,
    unfinished: HashSet<String>,
    ended: HashSet<String>,
    /// How many of the jobs seen ending ended in each state.
    outcomes: BTreeMap<&'static str, usize>,
    any_failed: bool,
    any_cancelled: bool,
}

impl Batch {
    /// Lists the matching jobs that are unfinished. On a second listing (a stream that started
    /// over), the jobs listed before and not now have ended unseen: each is read, so that how
    /// it ended counts.
    async fn list(
        &mut self,
        client: &mut Client,
        labels: &HashMap<String, String>,
    ) -> Result<(), (&'static str, Status)> {
        let before = std::mem::take(&mut self.unfinished);
        let mut request = pb::ListJobsRequest {
            states: vec![pb::JobState::Queued as i32, pb::JobState::Running as i32],
            labels: labels.clone(),
            page_size: 0,
            page_token: String::new(),
        };
        loop {
            let page = client
                .list_jobs(request.clone())
                .await
                .map_err(|status| ("ListJobs", status))?
                .into_inner();
            for job in page.jobs {
                if !self.ended.contains(&job.id) {
                    self.unfinished.insert(job.id);
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            request.page_token = page.next_page_token;
        }
        let gone: Vec<String> = before.difference(&self.unfinished).cloned().collect();
        for id in gone {
            let request = pb::GetStatusRequest { job_id: id };
            match client.get_status(request).await {
                Ok(response) => {
                    if let Some(job) = response.into_inner().job {
                        self.observe(&job);
                    }
                }
                // Deleted since: how it ended is gone with it.
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => {
                    // Kept for the next try.
                    let ended = &self.ended;
                    self.unfinished
                        .extend(before.into_iter().filter(|id| !ended.contains(id)));
                    return Err(("GetStatus", status));
                }
            }
        }
        self.listed = true;
        Ok(())
    }

    fn observe(&mut self, job: &pb::Job) {
        if is_terminal(job) {
            self.unfinished.remove(&job.id);
            if self.ended.insert(job.id.clone()) {
                *self
                    .outcomes
                    .entry(text::job_state(job.state()))
                    .or_default() += 1;
                self.any_failed |= job.state() == pb::JobState::Failed;
                self.any_cancelled |= job.state() == pb::JobState::Cancelled;
            }
        } else if !self.ended.contains(&job.id) {
            self.unfinished.insert(job.id.clone());
        }
    }

    /// The exit code once every job followed has ended, after saying how they ended.
    fn done(&self) -> Option<i32> {
        if !self.listed || !self.unfinished.is_empty() {
            return None;
        }
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(state, count)| format!("{count} {state}"))
            .collect();
        if outcomes.is_empty() {
            eprintln!("no matching job is unfinished");
        } else {
            eprintln!("every job followed has ended: {}", outcomes.join(", "));
        }
        Some(if self.any_failed {
            exit::JOB_FAILED
        } else if self.any_cancelled {
            exit::JOB_CANCELLED
        } else {
            exit::OK
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, state: pb::JobState) -> pb::Job {
        pb::Job {
            id: id.to_owned(),
            state: state as i32,
            ..Default::default()
        }
    }

    fn listed(ids: &[&str]) -> Batch {
        Batch {
            listed: true,
            unfinished: ids.iter().map(|id| (*id).to_owned()).collect(),
            ..Batch::default()
        }
    }

    #[test]
    fn a_batch_is_done_once_every_job_followed_has_ended() {
        let mut batch = listed(&["a", "b"]);
        assert_eq!(batch.done(), None);
        batch.observe(&job("a", pb::JobState::Running));
        batch.observe(&job("c", pb::JobState::Queued));
        batch.observe(&job("a", pb::JobState::Succeeded));
        batch.observe(&job("b", pb::JobState::Succeeded));
        assert_eq!(
            batch.done(),
            None,
            "c, submitted meanwhile, is still queued"
        );
        batch.observe(&job("c", pb::JobState::Cancelled));
        assert_eq!(batch.done(), Some(exit::JOB_CANCELLED));
    }

    #[test]
    fn a_failure_outweighs_a_cancellation() {
        let mut batch = listed(&["a", "b"]);
        batch.observe(&job("a", pb::JobState::Cancelled));
        batch.observe(&job("b", pb::JobState::Failed));
        assert_eq!(batch.done(), Some(exit::JOB_FAILED));
    }

    #[test]
    fn an_older_snapshot_after_the_end_does_not_bring_a_job_back() {
        let mut batch = Batch::default();
        // Seen ending before the listing, which no longer shows it.
        batch.observe(&job("a", pb::JobState::Succeeded));
        batch.observe(&job("a", pb::JobState::Running));
        batch.listed = true;
        assert_eq!(batch.done(), Some(exit::OK));
    }

    #[test]
    fn nothing_is_done_before_the_listing() {
        assert_eq!(Batch::default().done(), None);
        assert_eq!(listed(&[]).done(), Some(exit::OK));
    }
}
