//! Hostile input against a live server: proptest over the request messages (arbitrary and
//! huge strings, deep params, long repeated fields, unknown enum numbers, malformed durations,
//! random ids, page tokens and cursors) and raw frames that are not valid protobuf at all,
//! sent with a bytes codec to every method. The server must never panic or crash (it still
//! answers health afterwards), every answer must be a status with a clear code, and nothing is
//! stored for a rejected request.
//!
//! A message that is not valid protobuf is answered INTERNAL by tonic, as gRPC's status code
//! guide prescribes for parse errors; everything that parses and is wrong is INVALID_ARGUMENT
//! (or RESOURCE_EXHAUSTED / OUT_OF_RANGE for size limits).

mod common;

use std::{collections::HashMap, time::Duration};

use bytes::{Buf, BufMut};
use common::*;
use longrun::{
    api::{
        longrunning::{
            GetOperationRequest, ListOperationsRequest, operations_client::OperationsClient,
        },
        pb,
    },
    store::ListQuery,
};
use proptest::{
    collection::{hash_map, vec},
    prelude::*,
    test_runner::{Config as ProptestConfig, TestRunner},
};
use prost::Message;
use prost_types::{ListValue, Struct, Value, value::Kind};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// Every method of the two authenticated services, as a path.
const METHODS: &[&str] = &[
    "/longrun.v1.Jobs/Submit",
    "/longrun.v1.Jobs/GetStatus",
    "/longrun.v1.Jobs/WaitJob",
    "/longrun.v1.Jobs/Cancel",
    "/longrun.v1.Jobs/ListJobs",
    "/longrun.v1.Jobs/DeleteJob",
    "/longrun.v1.Jobs/ListActions",
    "/google.longrunning.Operations/GetOperation",
    "/google.longrunning.Operations/ListOperations",
    "/google.longrunning.Operations/CancelOperation",
    "/google.longrunning.Operations/DeleteOperation",
    "/google.longrunning.Operations/WaitOperation",
];
const STREAMING_METHODS: &[&str] = &["/longrun.v1.Jobs/WatchJob", "/longrun.v1.Jobs/WatchJobs"];

const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Sends and receives raw bytes as the message.
#[derive(Debug, Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Strings from empty to over the message limit, with any Unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => any::<String>(),
        2 => "[a-z0-9-]{0,40}",
        1 => Just("x".repeat(MAX_MESSAGE_BYTES + 10)),
        1 => Just("é".repeat(300)),
    ]
}

/// A `Value` tree, sometimes nested past every limit.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<f64>().prop_map(|n| Value {
            kind: Some(Kind::NumberValue(n))
        }),
        any::<bool>().prop_map(|b| Value {
            kind: Some(Kind::BoolValue(b))
        }),
        any::<String>().prop_map(|s| Value {
            kind: Some(Kind::StringValue(s))
        }),
        Just(Value { kind: None }),
        any::<i32>().prop_map(|n| Value {
            kind: Some(Kind::NullValue(n))
        }),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(|values| Value {
                kind: Some(Kind::ListValue(ListValue { values }))
            }),
            hash_map(any::<String>(), inner, 0..8).prop_map(|fields| Value {
                kind: Some(Kind::StructValue(Struct {
                    fields: fields.into_iter().collect()
                }))
            }),
        ]
    })
}

/// Params nested `depth` objects deep.
fn deep(depth: usize) -> Struct {
    let mut value = Value {
        kind: Some(Kind::NumberValue(1.0)),
    };
    for _ in 0..depth {
        value = Value {
            kind: Some(Kind::StructValue(Struct {
                fields: [("x".to_owned(), value)].into(),
            })),
        };
    }
    match value.kind {
        Some(Kind::StructValue(s)) => s,
        _ => Struct::default(),
    }
}

fn params() -> impl Strategy<Value = Option<Struct>> {
    prop_oneof![
        3 => hash_map(any::<String>(), value(), 0..6)
            .prop_map(|fields| Some(Struct { fields: fields.into_iter().collect() })),
        1 => (0usize..80).prop_map(|d| Some(deep(d))),
        1 => Just(None),
    ]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    prop_oneof![
        2 => Just(None),
        2 => (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
        1 => (0i64..2, 0i32..1_000_000_000)
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
    ]
}

fn action_spec() -> impl Strategy<Value = pb::ActionSpec> {
    (
        prop_oneof![Just("echo".to_owned()), Just("sleep".to_owned()), text()],
        params(),
        prop_oneof![
            4 => vec(any::<u8>(), 0..64),
            1 => Just(vec![0u8; 300]),
        ],
    )
        .prop_map(|(name, params, input)| pb::ActionSpec {
            name,
            params,
            input: input.into(),
        })
}

fn submit_request() -> impl Strategy<Value = pb::SubmitRequest> {
    (
        prop_oneof![
            8 => vec(action_spec(), 0..5),
            1 => Just(vec![pb::ActionSpec { name: "echo".into(), ..Default::default() }; 400]),
        ],
        text(),
        duration(),
        any::<i32>(),
        any::<i32>(),
        labels(),
        // `wait` only ever briefly, so that a valid sync Submit cannot hold the test.
        prop_oneof![
            Just(None),
            (-5i64..1, 0i32..300_000_000)
                .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
        ],
    )
        .prop_map(
            |(actions, idempotency_key, timeout, max_attempts, priority, labels, wait)| {
                // Fields added to the request later start out default here.
                #[allow(clippy::needless_update)]
                pb::SubmitRequest {
                    actions,
                    idempotency_key,
                    timeout,
                    max_attempts,
                    priority,
                    labels,
                    wait,
                    ..Default::default()
                }
            },
        )
}

/// Label maps: a few arbitrary ones, or thousands.
fn labels() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        6 => hash_map(text(), text(), 0..6),
        1 => Just((0..5000).map(|i| (format!("k{i}"), format!("v{i}"))).collect()),
    ]
}

/// Enum values: known, unknown, negative, and very many of them.
fn states() -> impl Strategy<Value = Vec<i32>> {
    prop_oneof![
        6 => vec(any::<i32>(), 0..4),
        1 => Just(vec![1; 20_000]),
    ]
}

/// Ids, tokens and cursors: garbage, near-misses and valid-looking ones.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        Just(String::new()),
        any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        (0i64..i64::MAX).prop_map(|n| format!("e{n}")),
        Just("e-1".to_owned()),
    ]
}

/// Another request than Submit: one of the reads, watches and writes by id.
#[derive(Debug, Clone)]
enum Call {
    GetStatus(String),
    WaitJob(String, Option<prost_types::Duration>),
    Cancel(String),
    Delete(String),
    List(i32, String, Vec<i32>, HashMap<String, String>),
    WatchJob(String, i64),
    WatchJobs(String, Vec<i32>, HashMap<String, String>),
    GetOperation(String),
    ListOperations(String, String, i32, String),
}

fn call() -> impl Strategy<Value = Call> {
    let short_wait = prop_oneof![
        Just(None),
        (-3i64..1, -5i32..200_000_000)
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
    ];
    prop_oneof![
        id().prop_map(Call::GetStatus),
        (id(), short_wait).prop_map(|(id, wait)| Call::WaitJob(id, wait)),
        id().prop_map(Call::Cancel),
        id().prop_map(Call::Delete),
        (any::<i32>(), id(), states(), labels())
            .prop_map(|(size, token, states, labels)| Call::List(size, token, states, labels)),
        (id(), any::<i64>()).prop_map(|(id, v)| Call::WatchJob(id, v)),
        (
            id(),
            vec(any::<i32>(), 0..4),
            hash_map(text(), text(), 0..4)
        )
            .prop_map(|(cursor, states, labels)| Call::WatchJobs(cursor, states, labels)),
        id().prop_map(|id| Call::GetOperation(format!("operations/{id}"))),
        (text(), text(), any::<i32>(), id()).prop_map(|(name, filter, size, token)| {
            Call::ListOperations(name, filter, size, token)
        }),
    ]
}

/// Raw messages: random bytes, and valid messages truncated or with bytes flipped.
fn raw_message() -> impl Strategy<Value = Vec<u8>> {
    let valid = pb::SubmitRequest {
        actions: vec![action("echo", serde_json::json!({"a": [1, 2, {"b": "c"}]}))],
        labels: [("k".to_owned(), "v".to_owned())].into(),
        idempotency_key: "key".to_owned(),
        ..Default::default()
    }
    .encode_to_vec();
    let len = valid.len();
    prop_oneof![
        vec(any::<u8>(), 0..512),
        (0..len).prop_map({
            let valid = valid.clone();
            move |cut| valid[..cut].to_vec()
        }),
        vec((0..len, any::<u8>()), 1..6).prop_map(move |flips| {
            let mut bytes = valid.clone();
            for (at, byte) in flips {
                bytes[at] ^= byte | 1;
            }
            bytes
        }),
        // A field tag announcing far more bytes than follow.
        Just(vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]),
        // A string field that is not UTF-8.
        Just(vec![0x3a, 0x02, 0xc3, 0x28]),
    ]
}

/// Whether an error answer is one a client can act on.
fn clear(status: &Status) -> bool {
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::ResourceExhausted
        | Code::OutOfRange
        | Code::FailedPrecondition
        | Code::Unimplemented => !status.message().is_empty(),
        // tonic's answer to bytes that do not parse as the request message.
        Code::Internal => status.message().contains("decod"),
        _ => false,
    }
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    server: TestServer,
    jobs: pb::jobs_client::JobsClient<Channel>,
    operations: OperationsClient<Channel>,
    channel: Channel,
}

impl Harness {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (server, channel) = runtime.block_on(async {
            let mut config = test_config();
            config.limits.max_message_bytes = MAX_MESSAGE_BYTES;
            config.limits.max_actions_per_job = 4;
            config.limits.max_input_bytes = 256;
            config.limits.max_params_bytes = 2048;
            config.limits.max_labels = 4;
            config.limits.max_label_key_bytes = 32;
            config.limits.max_label_value_bytes = 32;
            config.limits.max_page_size = 100;
            let server =
                TestServer::start_with(config, longrun::actions::Registry::with_builtins()).await;
            let channel = channel(server.addr).await;
            (server, channel)
        });
        Self {
            jobs: pb::jobs_client::JobsClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES * 4)
                .max_encoding_message_size(usize::MAX),
            operations: OperationsClient::new(channel.clone()),
            channel,
            server,
            runtime,
        }
    }

    async fn stored(&self) -> usize {
        self.server
            .executor
            .store()
            .list(&ListQuery {
                limit: usize::MAX,
                ..ListQuery::default()
            })
            .await
            .expect("the store answers")
            .len()
    }

    /// The server is alive and well: health says SERVING.
    fn assert_healthy(&self) {
        self.runtime.block_on(async {
            let answer = HealthClient::new(channel(self.server.addr).await)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect("health answers after the fuzzing");
            assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
        });
    }
}

/// Bounds a call: a valid request may legitimately wait (sync Submit, WaitJob).
fn bounded<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    request.set_timeout(Duration::from_secs(5));
    request
}

#[test]
fn arbitrary_submits_are_answered_clearly_and_rejected_ones_store_nothing() {
    let harness = Harness::new();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&submit_request(), |request| {
            let (before, answer, after) = harness.runtime.block_on(async {
                let before = harness.stored().await;
                let mut jobs = harness.jobs.clone();
                let answer = jobs.submit(bounded(tonic::Request::new(request))).await;
                (before, answer, harness.stored().await)
            });
            match answer {
                Ok(_) => prop_assert!(after <= before + 1, "one job at most"),
                Err(status) => {
                    prop_assert!(clear(&status), "unclear answer: {status:?}");
                    prop_assert_eq!(after, before, "a refused Submit stores nothing");
                }
            }
            Ok(())
        })
        .unwrap();
    harness.assert_healthy();
}

#[test]
fn arbitrary_reads_watches_and_writes_by_id_are_answered_clearly() {
    let harness = Harness::new();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&call(), |call| {
            let (before, answer, after) = harness.runtime.block_on(async {
                let before = harness.stored().await;
                let jobs = &mut harness.jobs.clone();
                let mut operations = harness.operations.clone();
                let answer: Result<(), Status> = match call {
                    Call::GetStatus(job_id) => jobs
                        .get_status(pb::GetStatusRequest { job_id })
                        .await
                        .map(drop),
                    Call::WaitJob(job_id, timeout) => jobs
                        .wait_job(bounded(tonic::Request::new(pb::WaitJobRequest {
                            job_id,
                            timeout,
                        })))
                        .await
                        .map(drop),
                    Call::Cancel(job_id) => {
                        jobs.cancel(pb::CancelRequest { job_id }).await.map(drop)
                    }
                    Call::Delete(job_id) => jobs
                        .delete_job(pb::DeleteJobRequest { job_id })
                        .await
                        .map(drop),
                    Call::List(page_size, page_token, states, labels) => jobs
                        .list_jobs(pb::ListJobsRequest {
                            page_size,
                            page_token,
                            states,
                            labels,
                        })
                        .await
                        .map(drop),
                    // A watch that opens is a valid answer; it is dropped at once.
                    Call::WatchJob(job_id, after_version) => jobs
                        .watch_job(pb::WatchJobRequest {
                            job_id,
                            after_version,
                        })
                        .await
                        .map(drop),
                    Call::WatchJobs(after_cursor, states, labels) => jobs
                        .watch_jobs(pb::WatchJobsRequest {
                            after_cursor,
                            states,
                            labels,
                        })
                        .await
                        .map(drop),
                    Call::GetOperation(name) => operations
                        .get_operation(GetOperationRequest { name })
                        .await
                        .map(drop),
                    Call::ListOperations(name, filter, page_size, page_token) => operations
                        .list_operations(ListOperationsRequest {
                            name,
                            filter,
                            page_size,
                            page_token,
                            return_partial_success: false,
                        })
                        .await
                        .map(drop),
                };
                (before, answer, harness.stored().await)
            });
            if let Err(status) = answer {
                prop_assert!(clear(&status), "unclear answer: {status:?}");
            }
            prop_assert_eq!(after, before, "no read or refused write stores anything");
            Ok(())
        })
        .unwrap();
    harness.assert_healthy();
}

#[test]
fn raw_bytes_that_are_not_the_request_are_answered_clearly_on_every_method() {
    let harness = Harness::new();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let methods: Vec<&'static str> = METHODS.iter().chain(STREAMING_METHODS).copied().collect();
    runner
        .run(&(raw_message(), 0..methods.len()), |(bytes, method)| {
            let path = methods[method];
            let (before, answer, after) = harness.runtime.block_on(async {
                let before = harness.stored().await;
                let mut grpc = tonic::client::Grpc::new(harness.channel.clone());
                grpc.ready().await.expect("the connection is ready");
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
                let request = bounded(tonic::Request::new(bytes));
                let answer = if STREAMING_METHODS.contains(&path.as_str()) {
                    grpc.server_streaming(request, path, RawCodec)
                        .await
                        .map(drop)
                } else {
                    grpc.unary(request, path, RawCodec).await.map(drop)
                };
                (before, answer, harness.stored().await)
            });
            match answer {
                // Some byte strings happen to be valid requests.
                Ok(()) => prop_assert!(after <= before + 1),
                Err(status) => {
                    prop_assert!(clear(&status), "{path}: unclear answer: {status:?}");
                    prop_assert_eq!(after, before, "{}: a refused call stores nothing", path);
                }
            }
            Ok(())
        })
        .unwrap();
    harness.assert_healthy();
}
