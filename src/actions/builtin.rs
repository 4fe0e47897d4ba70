//! The built-in actions: `sleep` (steps with progress, for demos and tests), `echo`, `fail`
//! and `sha256` (real CPU work on the input, with progress).

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use serde_json::{Map, Value, json};
use sha2::Digest as _;

use super::{
    ActionContext, ActionDescription, Handler, HandlerError, ParamInfo, ParamType,
    params::{str_param, u64_param},
};
use crate::job::FieldViolation;

/// The most `sleep` may sleep: a day, so a typo cannot park a worker for a year.
const MAX_SLEEP_MS: u64 = 24 * 60 * 60 * 1000;
/// The most progress steps `sleep` may take.
const MAX_SLEEP_STEPS: u64 = 1_000_000;
/// How much `sha256` hashes between progress reports and cancellation checks.
const SHA256_CHUNK: usize = 64 * 1024;

/// Sleeps for `duration_ms` in `steps` equal steps, reporting progress after each; stops at
/// once when cancelled.
pub struct Sleep;

#[async_trait]
impl Handler for Sleep {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Sleeps in equal steps, reporting progress after each; stops at once when cancelled.".to_owned(),
            params: vec![
                ParamInfo::optional("duration_ms", ParamType::Integer, "How long to sleep in all, in milliseconds (default 1000, at most a day)."),
                ParamInfo::optional("steps", ParamType::Integer, "How many progress updates to make (default 10, at least 1)."),
            ],
            uses_input: false,
        }
    }

    fn validate(&self, params: &Map<String, Value>) -> Result<(), Vec<FieldViolation>> {
        let mut violations = Vec::new();
        if u64_param(params, "duration_ms", 1000) > MAX_SLEEP_MS {
            violations.push(FieldViolation::new(
                "duration_ms",
                format!("must be at most {MAX_SLEEP_MS}"),
            ));
        }
        let steps = u64_param(params, "steps", 10);
        if !(1..=MAX_SLEEP_STEPS).contains(&steps) {
            violations.push(FieldViolation::new(
                "steps",
                format!("must be between 1 and {MAX_SLEEP_STEPS}"),
            ));
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        let duration_ms = u64_param(&ctx.params, "duration_ms", 1000);
        let steps = u64_param(&ctx.params, "steps", 10).max(1);
        let total = Duration::from_millis(duration_ms);
        let start = tokio::time::Instant::now();
        // `validate` bounds steps to MAX_SLEEP_STEPS, well within u32.
        let steps_u32 = u32::try_from(steps).unwrap_or(u32::MAX);
        for done in 1..=steps_u32 {
            // Each step ends at its share of the whole from the start: a thousand steps of a
            // second take a second, not a thousand rounded-up timer ticks.
            ctx.sleep_until(start + total * done / steps_u32).await?;
            ctx.progress
                .units(u64::from(done), steps, format!("step {done} of {steps}"));
        }
        Ok(json!({ "slept_ms": duration_ms, "steps": steps }))
    }
}

/// Returns its params and its input.
pub struct Echo;

#[async_trait]
impl Handler for Echo {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Returns its params and its input: {\"params\": ..., \"input\": text, \"input_encoding\": \"utf8\" or \"base64\"}.".to_owned(),
            params: vec![ParamInfo::optional("message", ParamType::String, "Any text; every other param is refused.")],
            uses_input: true,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        let (input, encoding) = match std::str::from_utf8(&ctx.input) {
            Ok(text) => (text.to_owned(), "utf8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&ctx.input),
                "base64",
            ),
        };
        Ok(json!({
            "params": Value::Object(ctx.params),
            "input": input,
            "input_encoding": encoding,
        }))
    }
}

/// Fails with the error it is given: for trying out failure handling and retries.
pub struct Fail;

#[async_trait]
impl Handler for Fail {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Fails with the given error; with fail_attempts, fails only the first attempts and then succeeds.".to_owned(),
            params: vec![
                ParamInfo::optional("code", ParamType::String, "The canonical gRPC code name to fail with, not OK (default INTERNAL)."),
                ParamInfo::optional("reason", ParamType::String, "The machine-readable reason (default FAILED_AS_ASKED)."),
                ParamInfo::optional("message", ParamType::String, "The human-readable message."),
                ParamInfo::optional("fail_attempts", ParamType::Integer, "Fail only attempts up to this number, then succeed (default: every attempt)."),
                ParamInfo::optional("retryable", ParamType::Boolean, "Whether the job may be retried after this failure (default true)."),
            ],
            uses_input: false,
        }
    }

    fn validate(&self, params: &Map<String, Value>) -> Result<(), Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let code = str_param(params, "code", "INTERNAL");
        // OK names no failure: a FAILED job with code OK would contradict itself.
        if !crate::job::is_error_code_name(code) {
            violations.push(FieldViolation::new(
                "code",
                format!(
                    "must be the canonical gRPC code name of an error, such as INTERNAL, not {code:?}"
                ),
            ));
        }
        // The proto promises clients an UPPER_SNAKE_CASE reason to match on.
        let reason = str_param(params, "reason", "FAILED_AS_ASKED");
        let upper_snake = reason.split('_').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        }) && reason.starts_with(|c: char| c.is_ascii_uppercase());
        if !upper_snake {
            violations.push(FieldViolation::new(
                "reason",
                format!("must be UPPER_SNAKE_CASE, such as FAILED_AS_ASKED, not {reason:?}"),
            ));
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        let fail_attempts = u64_param(&ctx.params, "fail_attempts", u64::MAX);
        if u64::from(ctx.attempt) > fail_attempts {
            return Ok(json!({ "succeeded_on_attempt": ctx.attempt }));
        }
        let mut error = HandlerError::new(
            str_param(&ctx.params, "code", "INTERNAL"),
            str_param(&ctx.params, "reason", "FAILED_AS_ASKED"),
            str_param(&ctx.params, "message", "the fail action failed as asked"),
        );
        error.retryable = ctx
            .params
            .get("retryable")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        error
            .error
            .details
            .insert("attempt".to_owned(), json!(ctx.attempt));
        Err(error)
    }
}

/// Hashes its input with SHA-256, reporting progress per 64 KiB chunk.
pub struct Sha256;

#[async_trait]
impl Handler for Sha256 {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Hashes the action's input with SHA-256, reporting progress per 64 KiB; returns {\"sha256\": hex, \"bytes\": n}.".to_owned(),
            params: Vec::new(),
            uses_input: true,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        let total = ctx.input.len() as u64;
        let mut hasher = sha2::Sha256::new();
        let mut done = 0u64;
        for chunk in ctx.input.chunks(SHA256_CHUNK) {
            if ctx.cancel.is_cancelled() {
                return Err(HandlerError::cancelled());
            }
            hasher.update(chunk);
            done += chunk.len() as u64;
            ctx.progress.units(done, total, "hashing");
            // Hashing is CPU work: give other tasks on this worker thread a turn per chunk.
            tokio::task::yield_now().await;
        }
        Ok(json!({ "sha256": hex::encode(hasher.finalize()), "bytes": total }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::ProgressReporter;
    use crate::job::JobId;
    use bytes::Bytes;
    use tokio_util::sync::CancellationToken;

    fn ctx(params: Value, input: &'static [u8], attempt: u32) -> ActionContext {
        ActionContext {
            job_id: JobId::generate(),
            action_index: 0,
            attempt,
            max_attempts: attempt,
            labels: Default::default(),
            tenant: "default".to_owned(),
            params: params.as_object().cloned().unwrap_or_default(),
            input: Bytes::from_static(input),
            progress: ProgressReporter::channel().0,
            cancel: CancellationToken::new(),
            deadline: None,
            trace: None,
        }
    }

    #[tokio::test]
    async fn sha256_hashes_the_input() {
        let result = Sha256.run(ctx(json!({}), b"abc", 1)).await.unwrap();
        assert_eq!(
            result["sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn echo_returns_binary_input_as_base64() {
        let result = Echo
            .run(ctx(json!({"message": "hi"}), b"\xff\x00", 1))
            .await
            .unwrap();
        assert_eq!(result["input"], "/wA=");
        assert_eq!(result["input_encoding"], "base64");
        assert_eq!(result["params"]["message"], "hi");
    }

    #[tokio::test]
    async fn fail_succeeds_after_its_failing_attempts() {
        let params = json!({"fail_attempts": 1, "code": "UNAVAILABLE"});
        let error = Fail.run(ctx(params.clone(), b"", 1)).await.unwrap_err();
        assert_eq!(error.error.code, "UNAVAILABLE");
        assert!(error.retryable);
        assert!(Fail.run(ctx(params, b"", 2)).await.is_ok());
    }

    #[test]
    fn fail_takes_only_the_code_names_of_errors() {
        let code = |code: &str| {
            let params = json!({ "code": code });
            Fail.validate(params.as_object().unwrap())
        };
        assert!(code("UNAVAILABLE").is_ok());
        assert_eq!(code("OK").unwrap_err()[0].field, "code");
        assert_eq!(code("BROKEN").unwrap_err()[0].field, "code");
    }

    #[test]
    fn fail_takes_only_upper_snake_case_reasons() {
        let reason = |reason: &str| {
            let params = json!({ "reason": reason });
            Fail.validate(params.as_object().unwrap())
        };
        for good in ["FAILED_AS_ASKED", "E2E", "X"] {
            assert!(reason(good).is_ok(), "{good}");
        }
        for bad in [
            "bad reason",
            "Lower",
            "TRAILING_",
            "_LEADING",
            "DOUBLE__SCORE",
            "",
            "9LIVES",
        ] {
            assert_eq!(reason(bad).unwrap_err()[0].field, "reason", "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_takes_its_duration_however_many_steps_it_makes() {
        // Timers round up to the millisecond: 5,000 steps of 0.04 ms each took 5 s, not 200 ms.
        let start = tokio::time::Instant::now();
        let result = Sleep
            .run(ctx(json!({"duration_ms": 200, "steps": 5_000}), b"", 1))
            .await
            .unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_millis(210),
            "{took:?}"
        );
        assert_eq!(result["slept_ms"], 200);
    }

    #[tokio::test]
    async fn sleep_stops_when_cancelled() {
        let context = ctx(json!({"duration_ms": 60_000, "steps": 2}), b"", 1);
        context.cancel.cancel();
        let error = Sleep.run(context).await.unwrap_err();
        assert_eq!(error.error.code, "CANCELLED");
    }
}
