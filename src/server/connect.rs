//! The Connect protocol (<https://connectrpc.com/docs/protocol>) on the gRPC port.
//!
//! `buf curl` speaks Connect unless told `--protocol grpc`, as do the Connect clients
//! (connect-es, connect-go, connect-kotlin, connect-swift), and a Connect unary call is a plain
//! HTTP POST of JSON that `curl` can make. Without this layer all of them got a gRPC error for a
//! request that was never gRPC (`buf curl` said the service was missing from the schema).
//!
//! Each Connect request is translated into the gRPC request it stands for and handed to the
//! same services, behind the same authentication, limits and handlers; the gRPC response is
//! translated back. Both codecs are served: `proto` passes messages through untouched, `json`
//! is transcoded through the descriptors the build embeds (the protobuf JSON mapping, as
//! grpcurl prints it). Unary calls (`application/proto`, `application/json`) and streams
//! (`application/connect+proto`, `application/connect+json`: WatchJob, WatchJobs, and the
//! reflection stream `buf curl` reads the schema through) are served; compressed Connect
//! requests and Connect's GET form are not, and are refused with a Connect error saying so.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use base64::Engine as _;
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use futures::{
    TryFutureExt as _,
    future::{BoxFuture, Either, MapOk},
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt as _, Full, Limited};
use prost::Message as _;
use prost_reflect::{DescriptorError, DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::{Value, json};
use tonic::{Code, Status, body::Body};

use crate::api::{FILE_DESCRIPTOR_SET, json::integral_numbers_as_integers};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The bytes before each message of a stream: a flags byte and the length, big-endian.
const ENVELOPE_HEADER: usize = 5;
/// Flags of a compressed message (gRPC's and Connect's alike).
const COMPRESSED: u8 = 0b01;
/// Flags of the message that ends a Connect stream.
const END_STREAM: u8 = 0b10;

/// How a Connect message is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Proto,
    Json,
}

/// What kind of Connect request a request is, from its method and content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary(Codec),
    Stream(Codec),
}

fn connect_kind<B>(request: &Request<B>) -> Option<Kind> {
    let content_type = request.headers().get(header::CONTENT_TYPE)?.as_bytes();
    // Every gRPC call passes here: it is told apart at the first bytes, with no allocation.
    if content_type.starts_with(b"application/grpc") {
        return None;
    }
    let essence = content_type.split(|&b| b == b';').next()?.trim_ascii();
    [
        (b"application/proto".as_slice(), Kind::Unary(Codec::Proto)),
        (b"application/json", Kind::Unary(Codec::Json)),
        (b"application/connect+proto", Kind::Stream(Codec::Proto)),
        (b"application/connect+json", Kind::Stream(Codec::Json)),
    ]
    .into_iter()
    .find(|(name, _)| essence.eq_ignore_ascii_case(name))
    .map(|(_, kind)| kind)
}

/// A method's request and response types, for the JSON codec.
#[derive(Debug, Clone)]
struct MethodTypes {
    input: MessageDescriptor,
    output: MessageDescriptor,
    /// Whether the method streams its responses (WatchJob, WatchJobs, reflection).
    streams: bool,
}

#[derive(Debug)]
struct Shared {
    /// By path (`/longrun.v1.Jobs/Submit`).
    methods: HashMap<String, MethodTypes>,
    /// For the `debug` form of error details.
    pool: DescriptorPool,
    max_message: usize,
}

/// The refusal of a Connect request that is not a POST: Connect's GET form (unary calls of
/// side-effect-free methods) is not served.
fn only_post() -> Response<Body> {
    let status = Status::unimplemented(
        "the Connect protocol is served for POST requests only, not its GET form",
    );
    unary_error(&status, None, HeaderMap::new())
}

impl Shared {
    /// The answer to a GET or POST of one of the methods that is neither gRPC (nor gRPC-Web)
    /// nor Connect: Connect's GET form, or a content type no protocol here takes. Told in
    /// Connect's JSON, with 415 for the content type as Connect asks, where the gRPC service
    /// below would answer an empty 400. Anything else (a CORS preflight, another path) passes.
    fn unserved<B>(&self, request: &Request<B>) -> Option<Response<Body>> {
        let method = request.method();
        if method != Method::GET && method != Method::POST {
            return None;
        }
        let content_type = request.headers().get(header::CONTENT_TYPE);
        if content_type.is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
            || !self.methods.contains_key(request.uri().path())
        {
            return None;
        }
        if method == Method::GET {
            return Some(only_post());
        }
        let given = content_type
            .map(|value| {
                format!(
                    "content-type {:?}",
                    String::from_utf8_lossy(value.as_bytes())
                )
            })
            .unwrap_or_else(|| "a request without a content-type".to_owned());
        let status = Status::unimplemented(format!(
            "{given} is not served: use application/json or application/proto (Connect unary), \
             application/connect+json or application/connect+proto (Connect streams), or \
             application/grpc (gRPC, gRPC-Web)"
        ));
        let mut response = unary_error(&status, None, HeaderMap::new());
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        Some(response)
    }
}

/// Serves the Connect protocol in front of the gRPC services; every other request passes
/// through untouched.
#[derive(Debug, Clone)]
pub(super) struct ConnectLayer {
    shared: Arc<Shared>,
}

impl ConnectLayer {
    /// A layer for the services of the embedded descriptors (longrun's, google.longrunning's
    /// and health's; reflection is served over Connect's `proto` codec only), taking messages
    /// of up to `max_message` bytes.
    pub(super) fn new(max_message: usize) -> Result<Self, DescriptorError> {
        let mut pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET)?;
        pool.decode_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)?;
        let methods = pool
            .services()
            .flat_map(|service| service.methods().collect::<Vec<_>>())
            .map(|method| {
                let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
                let types = MethodTypes {
                    input: method.input(),
                    output: method.output(),
                    streams: method.is_server_streaming(),
                };
                (path, types)
            })
            .collect();
        Ok(Self {
            shared: Arc::new(Shared {
                methods,
                pool,
                max_message,
            }),
        })
    }
}

impl<S> tower::Layer<S> for ConnectLayer {
    type Service = ConnectService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service [`ConnectLayer`] wraps around the gRPC services.
#[derive(Debug, Clone)]
pub(super) struct ConnectService<S> {
    inner: S,
    shared: Arc<Shared>,
}

type ToBody<B> = fn(Response<B>) -> Response<Body>;

fn to_body<B>(response: Response<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(Body::new)
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for ConnectService<S>
where
    S: tower::Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    // gRPC calls pass through without a boxed future of their own.
    type Future = Either<
        MapOk<S::Future, ToBody<ResBody>>,
        BoxFuture<'static, Result<Response<Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let Some(kind) = connect_kind(&request) else {
            if let Some(refusal) = self.shared.unserved(&request) {
                return Either::Right(Box::pin(async move { Ok(refusal) }));
            }
            let to_body: ToBody<ResBody> = to_body;
            return Either::Left(self.inner.call(request.map(Body::new)).map_ok(to_body));
        };
        if request.method() != Method::POST {
            return Either::Right(Box::pin(async move { Ok(only_post()) }));
        }
        // The service that poll_ready readied is the one called; a clone takes its place.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        let shared = Arc::clone(&self.shared);
        Either::Right(Box::pin(async move {
            match kind {
                Kind::Unary(codec) => unary(inner, shared, codec, request).await,
                Kind::Stream(codec) => stream(inner, shared, codec, request).await,
            }
        }))
    }
}

/// A Connect unary call: the bare request message in the body, the response message (or an
/// error as JSON, with an HTTP status to match) in the response's.
async fn unary<S, ReqBody, ResBody>(
    mut inner: S,
    shared: Arc<Shared>,
    codec: Codec,
    request: Request<ReqBody>,
) -> Result<Response<Body>, S::Error>
where
    S: tower::Service<Request<Body>, Response = Response<ResBody>>,
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let path = request.uri().path().to_owned();
    let types = shared.methods.get(&path).cloned();
    let prepared = async {
        if types.as_ref().is_some_and(|types| types.streams) {
            // Answered as one response, a stream would be held until it ended: a WatchJob of a
            // job that runs for days, say.
            return Err(Status::unimplemented(format!(
                "{path} streams its responses: call it with content-type \
                 application/connect+json or application/connect+proto"
            )));
        }
        let (parts, body) = request.into_parts();
        refuse_compression(&parts.headers, header::CONTENT_ENCODING)?;
        let body = Limited::new(body, shared.max_message)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Status::resource_exhausted(format!(
                        "the request is over the server's limit of {} bytes",
                        shared.max_message
                    ))
                } else {
                    Status::internal(format!("reading the request: {e}"))
                }
            })?
            .to_bytes();
        let message = match codec {
            Codec::Proto => body,
            Codec::Json => json_to_proto(&body, input_type(types.as_ref(), &parts.uri)?)?,
        };
        let grpc = grpc_request(parts, Body::new(Full::new(envelope(0, &message))))?;
        Ok::<_, Status>(grpc)
    };
    let grpc = match prepared.await {
        Ok(grpc) => grpc,
        Err(status) => return Ok(unary_error(&status, Some(&shared.pool), HeaderMap::new())),
    };
    let response = inner.call(grpc).await?;
    let (parts, body) = response.into_parts();
    let mut metadata = leading_metadata(&parts.headers);
    if let Some(status) = Status::from_header_map(&parts.headers) {
        // A trailers-only response: an error before any message.
        return Ok(unary_error(&status, Some(&shared.pool), metadata));
    }
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(e) => {
            let status = Status::unavailable(format!("the call failed: {}", e.into()));
            return Ok(unary_error(&status, Some(&shared.pool), metadata));
        }
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    add_trailers(&mut metadata, &trailers);
    let status = Status::from_header_map(&trailers)
        .unwrap_or_else(|| Status::internal("the call ended without a status"));
    if status.code() != Code::Ok {
        return Ok(unary_error(&status, Some(&shared.pool), metadata));
    }
    let mut frames = collected.to_bytes();
    let message = match take_envelope(&mut frames, usize::MAX) {
        Ok(Some((0, message))) if frames.is_empty() => message,
        _ => {
            let status = Status::internal("the call did not answer with exactly one message");
            return Ok(unary_error(&status, Some(&shared.pool), metadata));
        }
    };
    let body = match codec {
        Codec::Proto => message,
        Codec::Json => match types
            .as_ref()
            .ok_or_else(|| unknown_method(&path))
            .and_then(|types| proto_to_json(&message, &types.output))
        {
            Ok(json) => json,
            Err(status) => return Ok(unary_error(&status, Some(&shared.pool), metadata)),
        },
    };
    let content_type = match codec {
        Codec::Proto => "application/proto",
        Codec::Json => "application/json",
    };
    Ok(respond(
        StatusCode::OK,
        metadata,
        content_type,
        Body::new(Full::new(body)),
    ))
}

/// A Connect stream: enveloped messages both ways; the response always has HTTP status 200
/// and ends with an end-stream message carrying the status and the trailers.
async fn stream<S, ReqBody, ResBody>(
    mut inner: S,
    shared: Arc<Shared>,
    codec: Codec,
    request: Request<ReqBody>,
) -> Result<Response<Body>, S::Error>
where
    S: tower::Service<Request<Body>, Response = Response<ResBody>>,
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let types = shared.methods.get(request.uri().path()).cloned();
    let content_type = match codec {
        Codec::Proto => "application/connect+proto",
        Codec::Json => "application/connect+json",
    };
    let prepared = (|| {
        let (parts, body) = request.into_parts();
        refuse_compression(&parts.headers, CONNECT_CONTENT_ENCODING)?;
        let (body, output) = match codec {
            // Connect's envelopes are gRPC's: the messages pass as they are.
            Codec::Proto => (Body::new(body), None),
            Codec::Json => {
                let types = types.ok_or_else(|| unknown_method(parts.uri.path()))?;
                let requests = Envelopes {
                    inner: Body::new(body),
                    shared: Arc::clone(&shared),
                    buffer: BytesMut::new(),
                    transcode: Transcode::ToProto(types.input),
                    done: false,
                };
                (Body::new(requests), Some(types.output))
            }
        };
        Ok::<_, Status>((grpc_request(parts, body)?, output))
    })();
    let (grpc, output) = match prepared {
        Ok(prepared) => prepared,
        Err(status) => {
            return Ok(respond(
                StatusCode::OK,
                HeaderMap::new(),
                content_type,
                Body::new(Full::new(end_stream(
                    Some(&status),
                    &HeaderMap::new(),
                    &shared.pool,
                ))),
            ));
        }
    };
    let response = inner.call(grpc).await?;
    let (parts, body) = response.into_parts();
    let metadata = leading_metadata(&parts.headers);
    if let Some(status) = Status::from_header_map(&parts.headers) {
        let end = end_stream(Some(&status), &HeaderMap::new(), &shared.pool);
        return Ok(respond(
            StatusCode::OK,
            metadata,
            content_type,
            Body::new(Full::new(end)),
        ));
    }
    let responses = Envelopes {
        inner: Body::new(body),
        shared: Arc::clone(&shared),
        buffer: BytesMut::new(),
        transcode: match output {
            Some(output) => Transcode::ToJson(output),
            None => Transcode::Pass,
        },
        done: false,
    };
    Ok(respond(
        StatusCode::OK,
        metadata,
        content_type,
        Body::new(responses),
    ))
}

const CONNECT_CONTENT_ENCODING: HeaderName = HeaderName::from_static("connect-content-encoding");
const CONNECT_TIMEOUT_MS: HeaderName = HeaderName::from_static("connect-timeout-ms");

/// A response of `status` with the call's `metadata` as its headers, and `content_type`.
fn respond(
    status: StatusCode,
    metadata: HeaderMap,
    content_type: &'static str,
    body: Body,
) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = metadata;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Compressed Connect requests are not served (gRPC clients' compressed requests are).
fn refuse_compression(headers: &HeaderMap, name: HeaderName) -> Result<(), Status> {
    match headers.get(&name).map(HeaderValue::to_str) {
        None => Ok(()),
        Some(Ok(encoding)) if encoding.eq_ignore_ascii_case("identity") => Ok(()),
        Some(encoding) => Err(Status::unimplemented(format!(
            "{name} {:?} is not served over the Connect protocol: send the request \
             uncompressed (gRPC clients may compress with gzip or deflate)",
            encoding.unwrap_or("?")
        ))),
    }
}

fn unknown_method(path: &str) -> Status {
    Status::unimplemented(format!(
        "{path} is not a method served over the Connect protocol's JSON codec"
    ))
}

fn input_type<'a>(
    types: Option<&'a MethodTypes>,
    uri: &http::Uri,
) -> Result<&'a MessageDescriptor, Status> {
    types
        .map(|types| &types.input)
        .ok_or_else(|| unknown_method(uri.path()))
}

/// The gRPC request a Connect request stands for: same path and metadata, gRPC's content
/// type, the deadline in gRPC's header, and the body given.
fn grpc_request(parts: http::request::Parts, body: Body) -> Result<Request<Body>, Status> {
    let timeout = match parts.headers.get(&CONNECT_TIMEOUT_MS) {
        None => None,
        Some(value) => Some(grpc_timeout(value)?),
    };
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = parts.uri;
    // The services below (gRPC-Web's layer first) serve gRPC over HTTP/2 only.
    *request.version_mut() = http::Version::HTTP_2;
    *request.extensions_mut() = parts.extensions;
    let headers = request.headers_mut();
    for (name, value) in &parts.headers {
        if !is_protocol_header(name) {
            headers.append(name, value.clone());
        }
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(timeout) = timeout {
        headers.insert(HeaderName::from_static("grpc-timeout"), timeout);
    }
    Ok(request)
}

/// Headers of the HTTP exchange or of either protocol, as opposed to the call's metadata.
fn is_protocol_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("connect-")
        || name.starts_with("grpc-")
        || matches!(
            name,
            "content-type"
                | "content-length"
                | "content-encoding"
                | "accept-encoding"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "upgrade"
        )
}

/// `Connect-Timeout-Ms` (at most 10 digits) as `grpc-timeout` (at most 8 digits and a unit).
fn grpc_timeout(value: &HeaderValue) -> Result<HeaderValue, Status> {
    let millis: u64 = value
        .to_str()
        .ok()
        .filter(|text| !text.is_empty() && text.len() <= 10 && text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "connect-timeout-ms must be a whole number of milliseconds of at most 10 digits, not {value:?}"
            ))
        })?;
    let text = if millis <= 99_999_999 {
        format!("{millis}m")
    } else {
        format!("{}S", millis.div_ceil(1000))
    };
    HeaderValue::from_str(&text).map_err(|e| Status::internal(e.to_string()))
}

/// The response's headers that are the call's metadata.
fn leading_metadata(headers: &HeaderMap) -> HeaderMap {
    let mut metadata = HeaderMap::new();
    for (name, value) in headers {
        if !is_protocol_header(name) && name != header::DATE {
            metadata.append(name, value.clone());
        }
    }
    metadata
}

/// A unary response carries the call's trailers as headers prefixed `trailer-`.
fn add_trailers(metadata: &mut HeaderMap, trailers: &HeaderMap) {
    for (name, value) in trailers {
        if is_protocol_header(name) {
            continue;
        }
        if let Ok(prefixed) = HeaderName::from_bytes(format!("trailer-{name}").as_bytes()) {
            metadata.append(prefixed, value.clone());
        }
    }
}

fn envelope(flags: u8, message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(ENVELOPE_HEADER + message.len());
    framed.put_u8(flags);
    // A message longer than u32 never gets here: every message is held to max_message.
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.extend_from_slice(message);
    framed.freeze()
}

/// The first whole message of `buffer`, with its flags, taken off it; `None` until one has
/// arrived whole.
fn take_envelope<B: bytes::Buf>(
    buffer: &mut B,
    max_message: usize,
) -> Result<Option<(u8, Bytes)>, Status> {
    let chunk = buffer.chunk();
    if buffer.remaining() < ENVELOPE_HEADER || chunk.len() < ENVELOPE_HEADER {
        return Ok(None);
    }
    let flags = chunk[0];
    let length = u32::from_be_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]) as usize;
    if length > max_message {
        return Err(Status::resource_exhausted(format!(
            "a message of {length} bytes is over the server's limit of {max_message} bytes"
        )));
    }
    if buffer.remaining() < ENVELOPE_HEADER + length {
        return Ok(None);
    }
    buffer.advance(ENVELOPE_HEADER);
    Ok(Some((flags, buffer.copy_to_bytes(length))))
}

fn json_to_proto(json: &[u8], descriptor: &MessageDescriptor) -> Result<Bytes, Status> {
    // `curl -X POST` with no body means the empty message.
    let json = if json.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        json
    };
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let message = DynamicMessage::deserialize(descriptor.clone(), &mut deserializer)
        .and_then(|message| deserializer.end().map(|()| message))
        .map_err(|e| {
            Status::invalid_argument(format!(
                "the request is not a {} in protobuf's JSON form: {e}",
                descriptor.full_name()
            ))
        })?;
    Ok(message.encode_to_vec().into())
}

fn proto_to_json(message: &[u8], descriptor: &MessageDescriptor) -> Result<Bytes, Status> {
    let failed = |e: &dyn std::fmt::Display| {
        Status::internal(format!("writing a {} as JSON: {e}", descriptor.full_name()))
    };
    let message = DynamicMessage::decode(descriptor.clone(), message).map_err(|e| failed(&e))?;
    let mut value = serde_json::to_value(&message).map_err(|e| failed(&e))?;
    integral_numbers_as_integers(&mut value);
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| failed(&e))
}

/// Connect's name of a status code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status of a unary call that failed with `code`, as Connect maps it.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // 499 Client Closed Request, a status every Connect implementation uses for it.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A Connect error: `code`, `message`, and each `google.rpc` detail as `type` and base64
/// `value`, with its JSON form as `debug` for people reading it with `curl`.
fn error_json(status: &Status, pool: Option<&DescriptorPool>) -> Value {
    let mut error = json!({ "code": code_name(status.code()) });
    if !status.message().is_empty() {
        error["message"] = Value::String(status.message().to_owned());
    }
    let details = tonic_types::pb::Status::decode(status.details())
        .map(|decoded| decoded.details)
        .unwrap_or_default();
    if !details.is_empty() {
        let details = details
            .iter()
            .map(|any| {
                let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
                let mut detail = json!({
                    "type": type_name,
                    "value": base64::engine::general_purpose::STANDARD_NO_PAD.encode(&any.value),
                });
                let debug = pool
                    .and_then(|pool| pool.get_message_by_name(type_name))
                    .and_then(|descriptor| {
                        DynamicMessage::decode(descriptor, any.value.as_slice()).ok()
                    })
                    .and_then(|message| serde_json::to_value(&message).ok());
                if let Some(debug) = debug {
                    detail["debug"] = debug;
                }
                detail
            })
            .collect();
        error["details"] = Value::Array(details);
    }
    error
}

fn unary_error(
    status: &Status,
    pool: Option<&DescriptorPool>,
    metadata: HeaderMap,
) -> Response<Body> {
    let body = serde_json::to_vec(&error_json(status, pool)).unwrap_or_default();
    respond(
        http_status(status.code()),
        metadata,
        "application/json",
        Body::new(Full::new(Bytes::from(body))),
    )
}

/// The message that ends a Connect stream: the error, if the call failed, and the trailers.
fn end_stream(status: Option<&Status>, trailers: &HeaderMap, pool: &DescriptorPool) -> Bytes {
    let mut end = json!({});
    if let Some(status) = status.filter(|status| status.code() != Code::Ok) {
        end["error"] = error_json(status, Some(pool));
    }
    let mut metadata = serde_json::Map::new();
    for (name, value) in trailers {
        if is_protocol_header(name) {
            continue;
        }
        if let Ok(value) = value.to_str() {
            let values = metadata
                .entry(name.as_str())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(values) = values {
                values.push(Value::String(value.to_owned()));
            }
        }
    }
    if !metadata.is_empty() {
        end["metadata"] = Value::Object(metadata);
    }
    envelope(END_STREAM, &serde_json::to_vec(&end).unwrap_or_default())
}

/// What [`Envelopes`] does to each message.
enum Transcode {
    /// Protobuf both ways: messages pass as they are.
    Pass,
    /// A JSON request message to protobuf.
    ToProto(MessageDescriptor),
    /// A protobuf response message to JSON.
    ToJson(MessageDescriptor),
}

/// A stream's body, message by message: requests transcoded for the gRPC service, or
/// responses for the Connect client, ending (on the response side) with the end-stream
/// message made from the gRPC trailers.
struct Envelopes {
    inner: Body,
    shared: Arc<Shared>,
    buffer: BytesMut,
    transcode: Transcode,
    done: bool,
}

impl Envelopes {
    fn is_response(&self) -> bool {
        !matches!(self.transcode, Transcode::ToProto(_))
    }

    /// Requests are held to the server's limit; responses were held to it by the service.
    fn max_message(&self) -> usize {
        if self.is_response() {
            usize::MAX
        } else {
            self.shared.max_message
        }
    }

    fn convert(&self, flags: u8, message: Bytes) -> Result<Bytes, Status> {
        if flags & COMPRESSED != 0 {
            return Err(Status::unimplemented(
                "compressed messages are not served over the Connect protocol",
            ));
        }
        let converted = match &self.transcode {
            Transcode::Pass => message,
            Transcode::ToProto(descriptor) => json_to_proto(&message, descriptor)?,
            Transcode::ToJson(descriptor) => proto_to_json(&message, descriptor)?,
        };
        Ok(envelope(0, &converted))
    }

    /// Ends the stream: on the response side with the end-stream message, on the request
    /// side with the error (which the gRPC service answers, the client then reads).
    fn finish(
        &mut self,
        status: Option<&Status>,
        trailers: &HeaderMap,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        if self.is_response() {
            Poll::Ready(Some(Ok(Frame::data(end_stream(
                status,
                trailers,
                &self.shared.pool,
            )))))
        } else {
            match status {
                Some(status) => Poll::Ready(Some(Err(status.clone()))),
                None => Poll::Ready(None),
            }
        }
    }
}

impl HttpBody for Envelopes {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            // Empty, and so passed at once, when the messages are passed through.
            let max_message = this.max_message();
            match take_envelope(&mut this.buffer, max_message) {
                Ok(Some((flags, message))) => match this.convert(flags, message) {
                    Ok(converted) => return Poll::Ready(Some(Ok(Frame::data(converted)))),
                    Err(status) => return this.finish(Some(&status), &HeaderMap::new()),
                },
                Ok(None) => {}
                Err(status) => return this.finish(Some(&status), &HeaderMap::new()),
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    // Protobuf responses need no parsing: each chunk goes on as it came.
                    Ok(data) if matches!(this.transcode, Transcode::Pass) => {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(data) => this.buffer.extend_from_slice(&data),
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        let status = Status::from_header_map(&trailers);
                        return this.finish(status.as_ref(), &trailers);
                    }
                },
                Some(Err(status)) => return this.finish(Some(&status), &HeaderMap::new()),
                None if this.is_response() => {
                    let status = Status::internal("the stream ended without a status");
                    return this.finish(Some(&status), &HeaderMap::new());
                }
                None if this.buffer.is_empty() => return this.finish(None, &HeaderMap::new()),
                None => {
                    let status =
                        Status::invalid_argument("the request stream ends inside a message");
                    return this.finish(Some(&status), &HeaderMap::new());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(content_type: &str) -> Request<()> {
        Request::post("/longrun.v1.Jobs/Submit")
            .header(header::CONTENT_TYPE, content_type)
            .body(())
            .unwrap()
    }

    #[test]
    fn connect_requests_are_told_apart_from_grpc_by_content_type() {
        assert_eq!(connect_kind(&post("application/grpc")), None);
        assert_eq!(connect_kind(&post("application/grpc+proto")), None);
        assert_eq!(connect_kind(&post("application/grpc-web-text")), None);
        assert_eq!(connect_kind(&post("text/plain")), None);
        assert_eq!(
            connect_kind(&post("Application/JSON; charset=utf-8")),
            Some(Kind::Unary(Codec::Json))
        );
        assert_eq!(
            connect_kind(&post("application/proto")),
            Some(Kind::Unary(Codec::Proto))
        );
        assert_eq!(
            connect_kind(&post("application/connect+json")),
            Some(Kind::Stream(Codec::Json))
        );
        assert_eq!(
            connect_kind(&post("application/connect+proto")),
            Some(Kind::Stream(Codec::Proto))
        );
    }

    #[test]
    fn the_connect_timeout_becomes_grpc_timeout_within_its_eight_digits() {
        let timeout = |ms: &str| grpc_timeout(&HeaderValue::from_str(ms).unwrap());
        assert_eq!(timeout("250").unwrap(), "250m");
        assert_eq!(timeout("99999999").unwrap(), "99999999m");
        // Past 8 digits of milliseconds, whole seconds, rounded up so no deadline shrinks.
        assert_eq!(timeout("100000001").unwrap(), "100001S");
        assert_eq!(timeout("9999999999").unwrap(), "10000000S");
        for bad in ["", "-1", "1.5", "soon", "12345678901"] {
            let status = timeout(bad).expect_err(bad);
            assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn envelopes_are_taken_whole_and_held_to_the_limit() {
        let framed = envelope(0, b"hello");
        let mut partial = BytesMut::from(&framed[..7]);
        assert_eq!(take_envelope(&mut partial, 100).unwrap(), None);
        assert_eq!(partial.len(), 7, "nothing taken until the message is whole");
        let mut whole = BytesMut::from(&framed[..]);
        whole.extend_from_slice(&envelope(END_STREAM, b"{}"));
        assert_eq!(
            take_envelope(&mut whole, 100).unwrap(),
            Some((0, Bytes::from_static(b"hello")))
        );
        assert_eq!(
            take_envelope(&mut whole, 100).unwrap(),
            Some((END_STREAM, Bytes::from_static(b"{}")))
        );
        let status = take_envelope(&mut BytesMut::from(&framed[..]), 4).unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
    }

    #[test]
    fn the_end_stream_message_carries_the_error_and_the_trailers() {
        let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET).unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        trailers.insert("x-request-id", HeaderValue::from_static("r1"));
        let status = Status::not_found("no job");
        let end = end_stream(Some(&status), &trailers, &pool);
        assert_eq!(end[0], END_STREAM);
        let body: Value = serde_json::from_slice(&end[ENVELOPE_HEADER..]).unwrap();
        assert_eq!(
            body,
            json!({
                "error": { "code": "not_found", "message": "no job" },
                "metadata": { "x-request-id": ["r1"] },
            })
        );
        let ok = end_stream(Some(&Status::ok("")), &HeaderMap::new(), &pool);
        assert_eq!(&ok[ENVELOPE_HEADER..], b"{}");
    }

    #[test]
    fn each_code_has_connects_name_and_http_status() {
        for (code, name, http) in [
            (Code::InvalidArgument, "invalid_argument", 400),
            (Code::FailedPrecondition, "failed_precondition", 400),
            (Code::NotFound, "not_found", 404),
            (Code::AlreadyExists, "already_exists", 409),
            (Code::ResourceExhausted, "resource_exhausted", 429),
            (Code::Cancelled, "canceled", 499),
            (Code::Unauthenticated, "unauthenticated", 401),
            (Code::PermissionDenied, "permission_denied", 403),
            (Code::Unimplemented, "unimplemented", 501),
            (Code::Unavailable, "unavailable", 503),
            (Code::DeadlineExceeded, "deadline_exceeded", 504),
            (Code::Internal, "internal", 500),
        ] {
            assert_eq!(code_name(code), name);
            assert_eq!(http_status(code).as_u16(), http, "{name}");
        }
    }
}
