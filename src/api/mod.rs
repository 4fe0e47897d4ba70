//! The gRPC surface: generated types, conversion to and from the domain, `Status` mapping, and
//! the `longrun.v1.Jobs` service. This layer validates and delegates; it holds no job state.

pub mod auth;
pub mod codec;
pub mod convert;
mod jobs;
pub mod json;
mod operations;
mod operations_convert;
mod paging;
pub mod quotas;
pub mod status;
mod wait;
mod watch_jobs;

pub use auth::{ApiKeys, Authenticator, Tenant};
pub use jobs::JobsService;
pub use operations::OperationsService;

/// The generated `longrun.v1` types, server and client.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("longrun.v1");
}

/// The generated `google.longrunning` types, server and client: the standard Operations API
/// that longrun serves over its jobs (see [`OperationsService`]). `google.rpc.Status` is
/// `tonic_types::pb::Status`.
pub mod longrunning {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("google.longrunning");
}

/// The encoded descriptors of every served proto file (and their imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("longrun_descriptor");

/// Size and count limits enforced at the edge, each with a documented default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest request or response message, in bytes (default 16 MiB).
    pub max_message_bytes: usize,
    /// Actions a job may have (default 100).
    pub max_actions_per_job: usize,
    /// An action's encoded params, in bytes (default 64 KiB).
    pub max_params_bytes: usize,
    /// An action's binary input, in bytes (default 8 MiB).
    pub max_input_bytes: usize,
    /// Labels a job or a filter may have (default 64).
    pub max_labels: usize,
    /// A label key, in bytes (default 256).
    pub max_label_key_bytes: usize,
    /// A label value, in bytes (default 256).
    pub max_label_value_bytes: usize,
    /// How deep an action's params may nest: objects and lists within the top-level object
    /// (default 32).
    pub max_params_depth: usize,
    /// An idempotency key, in bytes (default 256).
    pub max_idempotency_key_bytes: usize,
    /// How far ahead of the server's clock a Submit's `schedule_time` may be (default 30
    /// days); 0 allows no scheduling ahead.
    pub max_schedule_delay: std::time::Duration,
    /// `ListJobs` page size when the request gives none (default 50).
    pub default_page_size: usize,
    /// The largest `ListJobs`/`ListOperations` page; a larger `page_size` is refused with
    /// INVALID_ARGUMENT rather than clamped, so a client never mistakes a short page for the
    /// end (default 1000).
    pub max_page_size: usize,
    /// `WatchJob` and `WatchJobs` streams open at once on one connection (default 1000).
    pub max_watches_per_connection: usize,
    /// `WatchJob` and `WatchJobs` streams open at once by one tenant (default 10000).
    pub max_watches_per_tenant: usize,
    /// The shortest time between two messages of one job's progress on one watch stream
    /// (default 100 ms; zero sends every report). Reports in between are coalesced to the
    /// newest; state changes are never held back. Without it, a reader slower than the
    /// reports is sent every one of them until its HTTP/2 window is full (megabytes, once a
    /// client grows it), and sees a job's end that long after it happened.
    pub watch_progress_interval: std::time::Duration,
}

impl Limits {
    /// The limits of a submitted job among these, for the executor to check jobs submitted
    /// in-process against.
    pub fn submit_limits(&self) -> crate::job::SubmitLimits {
        crate::job::SubmitLimits {
            max_message_bytes: self.max_message_bytes,
            max_actions_per_job: self.max_actions_per_job,
            max_params_bytes: self.max_params_bytes,
            max_input_bytes: self.max_input_bytes,
            max_labels: self.max_labels,
            max_label_key_bytes: self.max_label_key_bytes,
            max_label_value_bytes: self.max_label_value_bytes,
            max_params_depth: self.max_params_depth,
            max_idempotency_key_bytes: self.max_idempotency_key_bytes,
            max_schedule_delay: self.max_schedule_delay,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        // One set of defaults for a job's limits, wherever it is submitted.
        let job = crate::job::SubmitLimits::default();
        Self {
            max_message_bytes: job.max_message_bytes,
            max_actions_per_job: job.max_actions_per_job,
            max_params_bytes: job.max_params_bytes,
            max_input_bytes: job.max_input_bytes,
            max_labels: job.max_labels,
            max_label_key_bytes: job.max_label_key_bytes,
            max_label_value_bytes: job.max_label_value_bytes,
            max_params_depth: job.max_params_depth,
            max_idempotency_key_bytes: job.max_idempotency_key_bytes,
            max_schedule_delay: job.max_schedule_delay,
            default_page_size: 50,
            max_page_size: 1000,
            max_watches_per_connection: 1000,
            max_watches_per_tenant: 10_000,
            watch_progress_interval: std::time::Duration::from_millis(100),
        }
    }
}
