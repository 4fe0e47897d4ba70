//! How errors reach the user: gRPC statuses with their code and rich details (each
//! `BadRequest` field violation on its own line), an unreachable server with the likely fix,
//! and mistakes on the command line told apart from failures (exit code 2, not 5).

use std::fmt::Write as _;

use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// A mistake in what the user typed that clap cannot see (JSON in `--action`, a missing file).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The server could not be reached at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach longrun at {addr}: {hint} ({cause})")]
pub struct Unreachable {
    addr: String,
    hint: &'static str,
    cause: String,
}

impl Unreachable {
    /// Wraps a connection failure, keeping its innermost cause (e.g. "Connection refused").
    pub fn new(addr: &str, error: &(dyn std::error::Error + 'static)) -> Self {
        let cause = root_cause(error);
        // rustls reading a plaintext HTTP/2 server's first bytes as a TLS record.
        let hint = if cause.contains("InvalidContentType") {
            "it does not answer TLS; for a server without TLS use an http:// address"
        } else if names_certificate(&cause) {
            UNTRUSTED_CERTIFICATE
        } else {
            "is `longrun serve` running?"
        };
        Self {
            addr: addr.to_owned(),
            hint,
            cause,
        }
    }
}

const UNTRUSTED_CERTIFICATE: &str = "the server's TLS certificate is not trusted: give --ca-cert \
     with the CA that signed it, and an address whose host name the certificate names";

/// Whether a TLS failure is about the server's certificate (rustls: "invalid peer
/// certificate: UnknownIssuer", NotValidForName, Expired…).
fn names_certificate(cause: &str) -> bool {
    cause.contains("invalid peer certificate")
}

/// What the command line said about the connection, for [`transport_hint`].
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    /// An https:// address.
    pub tls: bool,
    /// --client-cert was given.
    pub client_certificate: bool,
}

/// The likely fix of a failure in the connection, printed after the error: a TLS client is
/// told no more than "connection closed" when an mTLS server drops it after the handshake,
/// and a plaintext client of a TLS server sees an HTTP/2 framing error.
pub fn transport_hint(error: &anyhow::Error, connection: Connection) -> Option<&'static str> {
    if !failed_in_transport(error) {
        return None;
    }
    // A connection that could not be opened says what is likely wrong in its own message.
    let unreachable = error.chain().any(|c| c.is::<Unreachable>());
    if names_certificate(&error.root_cause().to_string()) {
        return (!unreachable).then_some(UNTRUSTED_CERTIFICATE);
    }
    match connection {
        // A TLS server answers a plaintext HTTP/2 preface with an alert, which the client
        // reads as a malformed frame, or drops the connection: the client sees one of several
        // failures ("frame with invalid size", "connection closed", "broken pipe"…) on its
        // first call.
        Connection { tls: false, .. } => (!unreachable)
            .then_some("if the server serves TLS, use an https:// address (and --ca-cert)"),
        Connection {
            tls: true,
            client_certificate: false,
        } => Some(
            "if the server requires client certificates (mTLS), give --client-cert and \
             --client-key",
        ),
        Connection {
            tls: true,
            client_certificate: true,
        } => Some(
            "if the server requires client certificates (mTLS), check that --client-cert is \
             signed by the CA it trusts for clients and that --client-key is its key",
        ),
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    innermost.to_string()
}

/// Whether `error` came from the connection rather than from the server's answer: it could
/// not be opened, or a call's status was made by the client from a transport failure.
pub fn failed_in_transport(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<Unreachable>()
            || cause
                .downcast_ref::<Status>()
                .is_some_and(|status| std::error::Error::source(status).is_some())
    })
}

/// Whether `error` is the user's mistake on the command line.
pub fn is_usage(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<Usage>())
}

/// The text printed on stderr for a failed command.
pub fn report(error: &anyhow::Error) -> String {
    if let Some(status) = error.chain().find_map(|c| c.downcast_ref::<Status>()) {
        // The context (which call failed) first, then the status in full.
        let context = error
            .chain()
            .take_while(|c| !c.is::<Status>())
            .map(ToString::to_string)
            .collect::<Vec<_>>();
        let mut text = String::from("error: ");
        for part in context {
            let _ = write!(text, "{part}: ");
        }
        text.push_str(&describe_status(status));
        return text;
    }
    format!("error: {error:#}")
}

/// A status as the user should read it: code, message, then each rich detail.
pub fn describe_status(status: &Status) -> String {
    let mut text = if status.message().is_empty() {
        code_name(status.code()).to_owned()
    } else {
        format!("{} ({})", status.message(), code_name(status.code()))
    };
    let details = status.get_error_details();
    if let Some(bad_request) = details.bad_request() {
        for violation in &bad_request.field_violations {
            let _ = write!(text, "\n  {}: {}", violation.field, violation.description);
        }
    }
    if let Some(info) = details.error_info() {
        let _ = write!(text, "\n  reason: {}", info.reason);
    }
    if let Some(retry) = details.retry_info().and_then(|r| r.retry_delay) {
        let _ = write!(
            text,
            "\n  retry after: {}",
            humantime::format_duration(retry)
        );
    }
    if let Some(source) = std::error::Error::source(status) {
        // A status made by the client itself from a transport error, whose message is only
        // "transport error": the innermost cause says what went wrong (a refused connection,
        // a TLS alert such as a client certificate the server requires).
        let cause = root_cause(source);
        if !cause.is_empty() && cause != status.message() {
            let _ = write!(text, "\n  cause: {cause}");
        }
        if status.code() == Code::Unavailable {
            text.push_str("\n  (the server cannot be reached; is `longrun serve` running?)");
        }
    }
    if status.code() == Code::Unauthenticated {
        // The server speaks to every client; this one takes the key as a flag.
        text.push_str("\n  (give the key with --api-key or LONGRUN_API_KEY)");
    }
    text
}

/// The canonical upper-case name of a gRPC code, as the protos and other tools spell it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::ErrorDetails;

    use super::*;

    #[test]
    fn invalid_argument_lists_every_field_violation() {
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation("actions[0].params.steps", "must be between 1 and 1000");
        details.add_bad_request_violation("labels", "too many");
        let status = Status::with_error_details(Code::InvalidArgument, "invalid request", details);
        let error = anyhow::Error::new(status).context("Submit");
        let text = report(&error);
        assert!(
            text.starts_with("error: Submit: invalid request (INVALID_ARGUMENT)"),
            "{text}"
        );
        assert!(
            text.contains("\n  actions[0].params.steps: must be between 1 and 1000"),
            "{text}"
        );
        assert!(text.contains("\n  labels: too many"), "{text}");
    }

    #[test]
    fn unauthenticated_says_how_this_client_takes_a_key() {
        let status = Status::unauthenticated("this call needs an API key");
        let text = report(&anyhow::Error::new(status).context("GetStatus"));
        assert!(
            text.ends_with("(give the key with --api-key or LONGRUN_API_KEY)"),
            "{text}"
        );
    }

    #[test]
    fn usage_errors_are_recognised_through_context() {
        let error = anyhow::Error::new(Usage("bad --label".to_owned())).context("submit");
        assert!(is_usage(&error));
        assert!(!is_usage(&anyhow::anyhow!("other")));
    }
}
