//! What a followed job looks like: JSON lines, plain text lines when stderr is not a terminal
//! (logs, CI, pipes), or live progress bars (one per action, under a line for the job) when
//! it is. The bars draw on stderr, so stdout carries only the final summary either way.

use std::io::IsTerminal as _;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use longrun::api::pb;

use super::{Format, Printer, text};

const RUNNING_TEMPLATE: &str =
    "{spinner:.cyan} {prefix:<12.bold} [{bar:30.cyan/blue}] {pos:>3}% {wide_msg}";
const SUCCEEDED_TEMPLATE: &str =
    "  {prefix:<12.bold} [{bar:30.green/blue}] {pos:>3}% {wide_msg:.green}";
const UNSUCCESSFUL_TEMPLATE: &str =
    "  {prefix:<12.bold} [{bar:30.red/blue}] {pos:>3}% {wide_msg:.red}";
const HEADER_TEMPLATE: &str = "{spinner:.cyan} {wide_msg}";
/// How often the spinners turn while nothing arrives.
const TICK: std::time::Duration = std::time::Duration::from_millis(120);

/// Shows the snapshots of one followed job.
pub struct View<'a> {
    printer: &'a Printer,
    mode: Mode,
    last: Option<pb::Job>,
}

enum Mode {
    Json,
    Lines,
    Bars(Bars),
}

impl<'a> View<'a> {
    /// Picks JSON lines, text lines or bars from the output format and the terminal.
    pub fn new(printer: &'a Printer) -> Self {
        let mode = match printer.format {
            Format::Json => Mode::Json,
            // indicatif draws nothing on a terminal it cannot redraw (TERM=dumb): lines then.
            Format::Text
                if std::io::stderr().is_terminal()
                    && !indicatif::ProgressDrawTarget::stderr().is_hidden() =>
            {
                Mode::Bars(Bars::new())
            }
            Format::Text => Mode::Lines,
        };
        Self {
            printer,
            mode,
            last: None,
        }
    }

    /// Shows a new snapshot.
    pub fn show(&mut self, job: &pb::Job) -> anyhow::Result<()> {
        match &mut self.mode {
            Mode::Json => {
                let message = pb::WatchJobResponse {
                    job: Some(job.clone()),
                };
                self.printer
                    .print(&message, "longrun.v1.WatchJobResponse", |_| String::new())?;
            }
            Mode::Lines => {
                let lines = changes(self.last.as_ref(), job);
                if !lines.is_empty() {
                    self.printer.print(job, "longrun.v1.Job", |_| lines)?;
                }
            }
            Mode::Bars(bars) => bars.update(job),
        }
        self.last = Some(job.clone());
        Ok(())
    }

    /// The job has ended: settle the display and print its summary (text mode).
    pub fn finish(&mut self, job: &pb::Job) -> anyhow::Result<()> {
        match &mut self.mode {
            Mode::Json => Ok(()),
            Mode::Lines => self
                .printer
                .print(job, "longrun.v1.Job", |json| text::job(job, json)),
            Mode::Bars(bars) => {
                bars.finish(job);
                self.printer
                    .print(job, "longrun.v1.Job", |json| text::job(job, json))
            }
        }
    }

    /// A note for the user on stderr (above the bars when they are drawn).
    pub fn note(&self, note: &str) {
        match &self.mode {
            Mode::Bars(bars) => bars.multi.suspend(|| eprintln!("{note}")),
            Mode::Json | Mode::Lines => eprintln!("{note}"),
        }
    }

    /// Stops drawing, leaving the bars as they are (the watch failed).
    pub fn abandon(&mut self) {
        if let Mode::Bars(bars) = &mut self.mode {
            bars.header.abandon();
            for bar in &bars.actions {
                bar.abandon();
            }
        }
    }
}

/// The lines that tell what changed from `before` to `job`: the job's state, then each action
/// whose state or progress moved.
fn changes(before: Option<&pb::Job>, job: &pb::Job) -> String {
    let mut lines = Vec::new();
    let state_changed = before.is_none_or(|b| b.state != job.state || b.attempt != job.attempt);
    if state_changed {
        lines.push(header(job));
    }
    for (i, action) in job.actions.iter().enumerate() {
        let previous = before.and_then(|b| b.actions.get(i));
        let moved =
            previous.is_none_or(|p| p.state != action.state || p.progress != action.progress);
        if moved {
            let mut line = format!(
                "  [{i}] {} {} {}",
                action.name,
                text::action_state(action.state()),
                text::progress(action.progress.as_ref())
            );
            if let Some(error) = text::last_attempt_error(action) {
                line.push_str(&format!("  last attempt: {}", text::job_error(error)));
            }
            lines.push(line);
        }
    }
    lines.join("\n")
}

fn header(job: &pb::Job) -> String {
    let mut header = format!(
        "job {} {} (attempt {}/{})",
        job.id,
        text::job_state(job.state()),
        job.attempt,
        job.max_attempts
    );
    if let Some((what, time)) = text::waits_for(job) {
        header.push_str(&format!(", {what} {time}"));
    }
    header
}

/// The live bars: a job line and one bar per action.
struct Bars {
    multi: MultiProgress,
    header: ProgressBar,
    actions: Vec<ProgressBar>,
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants checked by a test; fall back rather than panic.
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Bars {
    fn new() -> Self {
        let multi = MultiProgress::new();
        let header = multi.add(ProgressBar::new_spinner().with_style(style(HEADER_TEMPLATE)));
        header.enable_steady_tick(TICK);
        Self {
            multi,
            header,
            actions: Vec::new(),
        }
    }

    fn update(&mut self, job: &pb::Job) {
        self.header.set_message(header(job));
        for (i, action) in job.actions.iter().enumerate() {
            if i == self.actions.len() {
                let bar = self.multi.add(
                    ProgressBar::new(100)
                        .with_style(style(RUNNING_TEMPLATE))
                        .with_prefix(action.name.clone()),
                );
                bar.enable_steady_tick(TICK);
                self.actions.push(bar);
            }
            let bar = &self.actions[i];
            let percent = action.progress.as_ref().map_or(0, |p| p.percent);
            bar.set_position(u64::try_from(percent.clamp(0, 100)).unwrap_or(0));
            match action.state() {
                pb::ActionState::Succeeded
                | pb::ActionState::Failed
                | pb::ActionState::Cancelled
                | pb::ActionState::Skipped => {
                    if !bar.is_finished() {
                        let template = if action.state() == pb::ActionState::Succeeded {
                            SUCCEEDED_TEMPLATE
                        } else {
                            UNSUCCESSFUL_TEMPLATE
                        };
                        bar.set_style(style(template));
                        // Not `finish`, which would fill the bar: keep the percent reached.
                        bar.abandon_with_message(final_message(action));
                    }
                }
                pb::ActionState::Unspecified
                | pb::ActionState::Pending
                | pb::ActionState::Running => {
                    if bar.is_finished() {
                        // A retry runs the action again from the start.
                        bar.reset();
                        bar.set_style(style(RUNNING_TEMPLATE));
                        bar.enable_steady_tick(TICK);
                    }
                    let message = action.progress.as_ref().map(|p| p.message.clone());
                    let state = text::action_state(action.state());
                    bar.set_message(match message {
                        Some(m) if !m.is_empty() => m,
                        _ => state.to_lowercase(),
                    });
                }
            }
        }
    }

    fn finish(&mut self, job: &pb::Job) {
        self.update(job);
        self.header.finish_with_message(header(job));
        for bar in &self.actions {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

/// What a finished action's bar says: its final state, and why when it did not succeed.
fn final_message(action: &pb::ActionStatus) -> String {
    let state = text::action_state(action.state());
    match &action.error {
        Some(error) => format!("{state}: {}", text::job_error(error)),
        None => state.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_valid() {
        for template in [
            RUNNING_TEMPLATE,
            SUCCEEDED_TEMPLATE,
            UNSUCCESSFUL_TEMPLATE,
            HEADER_TEMPLATE,
        ] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }

    #[test]
    fn lines_tell_only_what_changed() {
        let mut job = pb::Job {
            id: "j".to_owned(),
            state: pb::JobState::Running as i32,
            attempt: 1,
            max_attempts: 1,
            actions: vec![
                pb::ActionStatus {
                    name: "a".to_owned(),
                    state: pb::ActionState::Running as i32,
                    ..Default::default()
                },
                pb::ActionStatus {
                    name: "b".to_owned(),
                    state: pb::ActionState::Pending as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let first = changes(None, &job);
        assert_eq!(first.lines().count(), 3, "{first}");
        let before = job.clone();
        job.actions[0].progress = Some(pb::Progress {
            percent: 50,
            message: "half".to_owned(),
            ..Default::default()
        });
        assert_eq!(changes(Some(&before), &job), "  [0] a RUNNING 50% half");
    }

    #[test]
    fn a_retry_says_when_its_attempt_starts() {
        let mut job = pb::Job {
            id: "j".to_owned(),
            state: pb::JobState::Queued as i32,
            attempt: 2,
            max_attempts: 3,
            next_attempt_time: Some(prost_types::Timestamp {
                seconds: 1_796_115_600,
                nanos: 500_000_000,
            }),
            ..Default::default()
        };
        assert_eq!(
            header(&job),
            "job j QUEUED (attempt 2/3), retry at 2026-12-01T09:00:00.500Z"
        );
        job.state = pb::JobState::Running as i32;
        assert_eq!(header(&job), "job j RUNNING (attempt 2/3)");
        let scheduled = pb::Job {
            id: "s".to_owned(),
            state: pb::JobState::Queued as i32,
            attempt: 1,
            max_attempts: 1,
            schedule_time: Some(prost_types::Timestamp {
                seconds: 1_796_115_600,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert_eq!(
            header(&scheduled),
            "job s QUEUED (attempt 1/1), due 2026-12-01T09:00:00Z"
        );
    }

    #[test]
    fn an_action_waiting_for_its_retry_says_why_its_last_attempt_failed() {
        let running = pb::Job {
            id: "j".to_owned(),
            state: pb::JobState::Running as i32,
            attempt: 1,
            max_attempts: 2,
            actions: vec![pb::ActionStatus {
                name: "fail".to_owned(),
                state: pb::ActionState::Running as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut retried = running.clone();
        retried.state = pb::JobState::Queued as i32;
        retried.attempt = 2;
        retried.actions[0].state = pb::ActionState::Pending as i32;
        retried.actions[0].error = Some(pb::JobError {
            code: "INTERNAL".to_owned(),
            reason: "FAILED_AS_ASKED".to_owned(),
            message: "first try fails".to_owned(),
            ..Default::default()
        });
        let lines = changes(Some(&running), &retried);
        assert!(
            lines.ends_with(
                "  [0] fail PENDING 0%  last attempt: INTERNAL FAILED_AS_ASKED: first try fails"
            ),
            "{lines}"
        );
    }
}
