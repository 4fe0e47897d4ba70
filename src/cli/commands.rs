//! The one-call subcommands: `status`, `cancel`, `list` and `actions`.

use std::collections::HashMap;

use anyhow::Context as _;
use longrun::api::pb;

use super::{ClientArgs, Format, Printer, connect, error::Usage, exit, text};

/// `longrun status ID`.
#[derive(Debug, clap::Args)]
#[command(after_help = super::PLAIN_EXIT_CODES_HELP)]
pub struct StatusArgs {
    /// The job's id.
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `longrun cancel ID`.
#[derive(Debug, clap::Args)]
#[command(after_help = super::PLAIN_EXIT_CODES_HELP)]
pub struct CancelArgs {
    /// The job's id.
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `longrun delete ID`.
#[derive(Debug, clap::Args)]
#[command(after_help = super::PLAIN_EXIT_CODES_HELP)]
pub struct DeleteArgs {
    /// The job's id.
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `longrun list`.
#[derive(Debug, clap::Args)]
#[command(after_help = super::PLAIN_EXIT_CODES_HELP)]
pub struct ListArgs {
    /// Only jobs in these states (repeat the flag, or separate with commas; `failed` or
    /// `FAILED`, as the text output prints them).
    #[arg(
        long = "state",
        value_enum,
        ignore_case = true,
        value_delimiter = ',',
        value_name = "STATE"
    )]
    pub states: Vec<StateFilter>,
    /// Only jobs carrying this label (KEY=VALUE; repeatable, all must match).
    #[arg(long = "label", value_parser = parse_label, value_name = "KEY=VALUE")]
    pub labels: Vec<(String, String)>,
    /// Jobs per page; 0 for the server's default.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub page_size: i32,
    /// Start at this page token (printed by a previous `list` when more jobs follow).
    #[arg(long, default_value = "")]
    pub page_token: String,
    /// Follow the page tokens and print every matching job.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `longrun actions`.
#[derive(Debug, clap::Args)]
#[command(after_help = super::PLAIN_EXIT_CODES_HELP)]
pub struct ActionsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// A job state to filter `list` by.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StateFilter {
    /// Waiting to run.
    Queued,
    /// Running now.
    Running,
    /// Ended successfully.
    Succeeded,
    /// Ended in failure.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl From<StateFilter> for pb::JobState {
    fn from(state: StateFilter) -> Self {
        match state {
            StateFilter::Queued => pb::JobState::Queued,
            StateFilter::Running => pb::JobState::Running,
            StateFilter::Succeeded => pb::JobState::Succeeded,
            StateFilter::Failed => pb::JobState::Failed,
            StateFilter::Cancelled => pb::JobState::Cancelled,
        }
    }
}

/// Parses `KEY=VALUE`.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// The `--label` pairs as a map; a key given twice with two values is a mistake (a job
/// carries one value per key), not a wish for the last one to win silently.
pub fn label_map(labels: &[(String, String)]) -> Result<HashMap<String, String>, Usage> {
    let mut map = HashMap::with_capacity(labels.len());
    for (key, value) in labels {
        if let Some(other) = map.insert(key.clone(), value.clone())
            && other != *value
        {
            return Err(Usage(format!(
                "--label {key} given twice ({key}={other} and {key}={value})"
            )));
        }
    }
    Ok(map)
}

/// Prints a job response: JSON of the whole response, or the job's summary.
fn print_job<M: prost::Message>(
    printer: &Printer,
    response: &M,
    full_name: &str,
    job: Option<&pb::Job>,
) -> anyhow::Result<()> {
    let job = job.context("the server's response holds no job")?;
    printer.print(response, full_name, |json| text::job(job, json))
}

/// Prints a job's snapshot; exits 0 whatever its state.
pub async fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let printer = Printer::new(args.client.output)?;
    let mut client = connect(&args.client).await?;
    let request = pb::GetStatusRequest { job_id: args.id };
    let response = client
        .get_status(request)
        .await
        .context("GetStatus")?
        .into_inner();
    print_job(
        &printer,
        &response,
        "longrun.v1.GetStatusResponse",
        response.job.as_ref(),
    )?;
    Ok(exit::OK)
}

/// Asks for a job to be cancelled; exits 0 once the server has taken the request (a running
/// job may still be stopping: `wait` or `watch` it to see it end).
pub async fn cancel(args: CancelArgs) -> anyhow::Result<i32> {
    let printer = Printer::new(args.client.output)?;
    let mut client = connect(&args.client).await?;
    let request = pb::CancelRequest { job_id: args.id };
    let response = client.cancel(request).await.context("Cancel")?.into_inner();
    print_job(
        &printer,
        &response,
        "longrun.v1.CancelResponse",
        response.job.as_ref(),
    )?;
    Ok(exit::OK)
}

/// Removes a finished job (and frees its idempotency key); exits 0 once it is gone. An
/// unfinished one is refused (FAILED_PRECONDITION): cancel it first.
pub async fn delete(args: DeleteArgs) -> anyhow::Result<i32> {
    let printer = Printer::new(args.client.output)?;
    let mut client = connect(&args.client).await?;
    let request = pb::DeleteJobRequest {
        job_id: args.id.clone(),
    };
    let response = client
        .delete_job(request)
        .await
        .context("DeleteJob")?
        .into_inner();
    printer.print(&response, "longrun.v1.DeleteJobResponse", |_| {
        format!("{} deleted", args.id)
    })?;
    Ok(exit::OK)
}

/// Lists jobs, one page or (with `--all`) every page.
pub async fn list(args: ListArgs) -> anyhow::Result<i32> {
    if args.page_size < 0 {
        return Err(Usage("--page-size must not be negative".to_owned()).into());
    }
    let printer = Printer::new(args.client.output)?;
    let mut client = connect(&args.client).await?;
    let labels = label_map(&args.labels)?;
    let mut request = pb::ListJobsRequest {
        states: args
            .states
            .into_iter()
            .map(|s| pb::JobState::from(s) as i32)
            .collect(),
        labels,
        page_size: args.page_size,
        page_token: args.page_token,
    };
    loop {
        let page = client
            .list_jobs(request.clone())
            .await
            .context("ListJobs")?
            .into_inner();
        let more = !page.next_page_token.is_empty();
        let show_token = more && !args.all && printer.format == Format::Text;
        printer.print(&page, "longrun.v1.ListJobsResponse", |_| {
            text::job_list(&page.jobs)
        })?;
        if show_token {
            // On stderr: stdout holds one job per line, for scripts to cut.
            eprintln!("(more: --page-token {})", page.next_page_token);
        }
        // Once stdout is closed (`list --all | head`), the pages left would go nowhere.
        if !(args.all && more) || printer.closed() {
            return Ok(exit::OK);
        }
        request.page_token = page.next_page_token;
    }
}

/// Lists the server's actions.
pub async fn actions(args: ActionsArgs) -> anyhow::Result<i32> {
    let printer = Printer::new(args.client.output)?;
    let mut client = connect(&args.client).await?;
    let response = client
        .list_actions(pb::ListActionsRequest {})
        .await
        .context("ListActions")?
        .into_inner();
    printer.print(&response, "longrun.v1.ListActionsResponse", |_| {
        text::actions(&response.actions)
    })?;
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_key_with_two_values_is_refused_and_one_repeated_is_kept_once() {
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let map = label_map(&[pair("a", "1"), pair("b", "2"), pair("a", "1")]).unwrap();
        assert_eq!(map.len(), 2);
        let Usage(message) = label_map(&[pair("a", "1"), pair("a", "2")]).unwrap_err();
        assert_eq!(message, "--label a given twice (a=1 and a=2)");
    }
}
