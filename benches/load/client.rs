//! The client side: job requests, and many open streams (WatchJob or the bare Subscribe)
//! reporting what each one saw to one place.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use longrun::api::pb::{self, jobs_client::JobsClient};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;

use crate::{
    echo,
    harness::{PATIENCE, echo_client},
};

/// A one-action job request; `params` is a JSON object of numbers and strings.
pub fn job(action: &str, params: Value) -> pb::SubmitRequest {
    let fields = params
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let kind = match v {
                Value::String(s) => prost_types::value::Kind::StringValue(s.clone()),
                other => prost_types::value::Kind::NumberValue(other.as_f64().unwrap_or(0.0)),
            };
            (k.clone(), prost_types::Value { kind: Some(kind) })
        })
        .collect();
    pb::SubmitRequest {
        actions: vec![pb::ActionSpec {
            name: action.to_owned(),
            params: Some(prost_types::Struct { fields }),
            input: Default::default(),
        }],
        ..Default::default()
    }
}

pub fn is_terminal(job: &pb::Job) -> bool {
    job.state >= pb::JobState::Succeeded as i32
}

/// The first action's progress step and the message of its report (the bench handlers put
/// the report's unix time in nanoseconds there); `None` before the handler reported.
pub fn step(job: &pb::Job) -> Option<(u64, &str)> {
    let progress = job.actions.first()?.progress.as_ref()?;
    (!progress.message.is_empty()).then_some((progress.current as u64, &progress.message))
}

/// Submits `requests` made by `make`, `in_flight` at a time; returns the ids in order.
pub async fn submit_all(
    channel: &Channel,
    count: usize,
    in_flight: usize,
    make: impl Fn(usize) -> pb::SubmitRequest + Send + Sync + 'static,
) -> anyhow::Result<Vec<String>> {
    let make = Arc::new(make);
    let mut tasks = Vec::new();
    for worker in 0..in_flight {
        let (make, mut client) = (Arc::clone(&make), JobsClient::new(channel.clone()));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in (worker..count).step_by(in_flight) {
                let job = client.submit(make(n)).await?.into_inner().job;
                ids.push((n, job.map(|j| j.id).unwrap_or_default()));
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = vec![String::new(); count];
    for task in tasks {
        for (n, id) in task.await?? {
            ids[n] = id;
        }
    }
    Ok(ids)
}

/// Submits one job and waits until a watcher is told it ended; fails unless it SUCCEEDED.
pub async fn submit_and_see(
    client: &mut JobsClient<Channel>,
    mut request: pb::SubmitRequest,
    waiting: &Waiting,
) -> anyhow::Result<()> {
    if let Waiting::Stream(ends) = waiting {
        request
            .labels
            .insert(ends.label.0.clone(), ends.label.1.clone());
    }
    let job_id = client
        .submit(request)
        .await?
        .into_inner()
        .job
        .map(|j| j.id)
        .unwrap_or_default();
    let last = match waiting {
        Waiting::Watch => {
            let mut stream = client
                .watch_job(pb::WatchJobRequest {
                    job_id,
                    after_version: 0,
                })
                .await?
                .into_inner();
            let mut last = None;
            while let Some(message) = stream.message().await? {
                last = message.job;
            }
            last
        }
        Waiting::Wait => {
            client
                .wait_job(pb::WaitJobRequest {
                    job_id,
                    timeout: Some(prost_types::Duration {
                        seconds: PATIENCE.as_secs() as i64,
                        nanos: 0,
                    }),
                })
                .await?
                .into_inner()
                .job
        }
        Waiting::Stream(ends) => Some(ends.wait(job_id).await?),
    };
    match last {
        Some(job) if job.state == pb::JobState::Succeeded as i32 => Ok(()),
        other => anyhow::bail!("job did not succeed: {other:?}"),
    }
}

/// How a client learns that its job ended.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Waiter {
    /// Submit, then WatchJob until the terminal message.
    Watch,
    /// Submit, then WaitJob.
    Wait,
    /// Submit with a label; one WatchJobs stream, opened before the first Submit, reports
    /// the end of every job carrying it (the way a service that submits many jobs waits).
    Stream,
}

/// A [`Waiter`], ready to wait: for [`Waiter::Stream`], with its stream open.
pub enum Waiting {
    Watch,
    Wait,
    Stream(Arc<Ends>),
}

impl Waiting {
    pub async fn open(waiter: Waiter, channel: &Channel) -> anyhow::Result<Self> {
        Ok(match waiter {
            Waiter::Watch => Self::Watch,
            Waiter::Wait => Self::Wait,
            Waiter::Stream => Self::Stream(Ends::open(channel).await?),
        })
    }
}

/// The ends of the jobs carrying one label, as one WatchJobs stream reports them, handed to
/// whoever waits for each job (the end may arrive before its Submit's answer).
pub struct Ends {
    label: (String, String),
    jobs: Mutex<HashMap<String, End>>,
    _stop: DropGuard,
}

enum End {
    Awaited(oneshot::Sender<pb::Job>),
    Seen(Box<pb::Job>),
}

impl Ends {
    /// Opens the stream; every job submitted with [`Ends`]'s label after this returns is seen.
    async fn open(channel: &Channel) -> anyhow::Result<Arc<Self>> {
        let label = ("bench_run".to_owned(), uuid::Uuid::now_v7().to_string());
        let request = pb::WatchJobsRequest {
            labels: HashMap::from([label.clone()]),
            states: vec![
                pb::JobState::Succeeded as i32,
                pb::JobState::Failed as i32,
                pb::JobState::Cancelled as i32,
            ],
            after_cursor: String::new(),
        };
        let mut stream = JobsClient::new(channel.clone())
            .watch_jobs(request)
            .await?
            .into_inner();
        let stop = CancellationToken::new();
        let ends = Arc::new(Self {
            label,
            jobs: Mutex::default(),
            _stop: stop.clone().drop_guard(),
        });
        let weak = Arc::downgrade(&ends);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    message = stream.message() => message,
                };
                let job = match message {
                    Ok(Some(pb::WatchJobsResponse { job: Some(job), .. })) => job,
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(e) => {
                        eprintln!("WatchJobs stream failed: {e}");
                        return;
                    }
                };
                let Some(ends) = weak.upgrade() else { return };
                let mut jobs = ends.lock();
                match jobs.remove(&job.id) {
                    Some(End::Awaited(waiter)) => {
                        let _ = waiter.send(job);
                    }
                    _ => {
                        jobs.insert(job.id.clone(), End::Seen(Box::new(job)));
                    }
                }
            }
        });
        Ok(ends)
    }

    /// The job's terminal snapshot, once the stream has reported it.
    async fn wait(&self, job_id: String) -> anyhow::Result<pb::Job> {
        let ended = {
            let mut jobs = self.lock();
            match jobs.remove(&job_id) {
                Some(End::Seen(job)) => return Ok(*job),
                _ => {
                    let (sender, ended) = oneshot::channel();
                    jobs.insert(job_id.clone(), End::Awaited(sender));
                    ended
                }
            }
        };
        tokio::time::timeout(PATIENCE, ended)
            .await
            .map_err(|_| anyhow::anyhow!("job {job_id}: no end on the stream in {PATIENCE:?}"))?
            .map_err(|_| anyhow::anyhow!("job {job_id}: the WatchJobs stream ended"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, End>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one stream saw: its index, the step it shows (bare: the broadcast's seq; longrun:
/// the first action's progress step), whether it is terminal, and when it arrived.
pub struct Seen {
    pub index: usize,
    pub step: Option<u64>,
    pub terminal: bool,
    pub at: Instant,
}

/// Many open streams, each reporting every message it reads.
pub struct Watchers {
    seen: mpsc::UnboundedReceiver<Seen>,
    stop: CancellationToken,
    steps: Vec<Option<u64>>,
    terminal: Vec<bool>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Watchers {
    fn new(count: usize) -> (Self, mpsc::UnboundedSender<Seen>, CancellationToken) {
        let (sender, seen) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let watchers = Self {
            seen,
            stop: stop.clone(),
            steps: vec![None; count],
            terminal: vec![false; count],
        };
        (watchers, sender, stop)
    }

    /// One bare Subscribe stream per topic, spread over `channels`.
    pub fn subscribe(channels: &[Channel], topics: Vec<String>) -> Self {
        let (watchers, sender, stop) = Self::new(topics.len());
        for (index, topic) in topics.into_iter().enumerate() {
            let mut client = echo_client(channels[index % channels.len()].clone());
            let (sender, stop) = (sender.clone(), stop.clone());
            tokio::spawn(async move {
                let opened = client.subscribe(echo::SubscribeRequest { topic }).await;
                let mut stream = match opened {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        eprintln!("subscribe {index}: {e}");
                        return;
                    }
                };
                loop {
                    let message = tokio::select! {
                        _ = stop.cancelled() => return,
                        message = stream.message() => message,
                    };
                    let Ok(Some(event)) = message else { return };
                    let seen = Seen {
                        index,
                        step: Some(event.seq),
                        terminal: false,
                        at: Instant::now(),
                    };
                    if sender.send(seen).is_err() {
                        return;
                    }
                }
            });
        }
        watchers
    }

    /// One WatchJob stream per job, spread over `channels`.
    pub fn watch(channels: &[Channel], ids: Vec<String>) -> Self {
        let (watchers, sender, stop) = Self::new(ids.len());
        for (index, job_id) in ids.into_iter().enumerate() {
            let mut client = JobsClient::new(channels[index % channels.len()].clone());
            let (sender, stop) = (sender.clone(), stop.clone());
            tokio::spawn(async move {
                let request = pb::WatchJobRequest {
                    job_id,
                    after_version: 0,
                };
                let Ok(mut stream) = client.watch_job(request).await.map(|r| r.into_inner()) else {
                    return;
                };
                loop {
                    let message = tokio::select! {
                        _ = stop.cancelled() => return,
                        message = stream.message() => message,
                    };
                    let Ok(Some(pb::WatchJobResponse { job: Some(job) })) = message else {
                        return;
                    };
                    let seen = Seen {
                        index,
                        // A snapshot without progress yet counts as step 0: heard.
                        step: Some(step(&job).map_or(0, |(s, _)| s)),
                        terminal: is_terminal(&job),
                        at: Instant::now(),
                    };
                    if sender.send(seen).is_err() {
                        return;
                    }
                }
            });
        }
        watchers
    }

    /// The next message any stream read, with what that stream showed before it.
    async fn next(&mut self) -> anyhow::Result<(Seen, Option<u64>, bool)> {
        let seen = tokio::time::timeout(PATIENCE, self.seen.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no stream heard of in {PATIENCE:?}"))?
            .ok_or_else(|| anyhow::anyhow!("every stream closed"))?;
        let i = seen.index;
        let before = (self.steps[i], self.terminal[i]);
        self.steps[i] = self.steps[i].max(seen.step);
        self.terminal[i] |= seen.terminal;
        Ok((seen, before.0, before.1))
    }

    /// The step stream `index` shows now.
    pub fn step_of(&self, index: usize) -> Option<u64> {
        self.steps[index]
    }

    /// Waits until every stream shows at least `step`; returns when the last one got there.
    pub async fn all_reach(&mut self, step: u64) -> anyhow::Result<Instant> {
        let mut remaining = self.steps.iter().filter(|s| **s < Some(step)).count();
        let (mut last, deadline) = (Instant::now(), Instant::now() + PATIENCE);
        while remaining > 0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{remaining} streams not told in time"
            );
            let (seen, before, _) = anyhow::Context::with_context(self.next().await, || {
                format!("{remaining} streams not at step {step}")
            })?;
            if before < Some(step) && seen.step >= Some(step) {
                remaining -= 1;
                last = seen.at;
            }
        }
        Ok(last)
    }

    /// Waits until every stream saw a terminal message; returns when the last one did.
    pub async fn all_terminal(&mut self) -> anyhow::Result<Instant> {
        let mut remaining = self.terminal.iter().filter(|t| !**t).count();
        let (mut last, deadline) = (Instant::now(), Instant::now() + PATIENCE);
        while remaining > 0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{remaining} streams not told in time"
            );
            let (seen, _, was_terminal) = self.next().await?;
            if seen.terminal && !was_terminal {
                remaining -= 1;
                last = seen.at;
            }
        }
        Ok(last)
    }

    /// Waits until stream `index` shows a step above `above`; returns when it arrived.
    pub async fn next_step_of(&mut self, index: usize, above: u64) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            let (seen, _, _) = self.next().await?;
            if seen.index == index && seen.step > Some(above) {
                return Ok(seen.at);
            }
        }
        anyhow::bail!("stream {index} not told in time")
    }
}
