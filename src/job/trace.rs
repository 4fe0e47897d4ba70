//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` a Submit
//! arrived with is kept with its job, so that the job's run, the commands it starts and its
//! webhook deliveries can be tied to the trace of the request that created it, long after
//! that request has ended and across restarts.
//!
//! longrun records and passes on the caller's context; it does not start traces or spans of
//! its own, so it passes the header on unchanged (as an intermediary that is not itself traced
//! does): the job's work appears in the trace as a child of the caller's span.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// The header (and gRPC metadata key) that carries a trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The environment variable that carries a trace context into a process: OpenTelemetry's
/// name for it (environment variables as context propagation carriers).
pub const TRACEPARENT_ENV: &str = "TRACEPARENT";

/// The header (and gRPC metadata key) that carries the vendors' state of a trace.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// The environment variable that carries the vendors' state of a trace into a process.
pub const TRACESTATE_ENV: &str = "TRACESTATE";

/// The longest `tracestate` passed on: the recommendation asks every vendor to pass on at
/// least this much, and a longer one is cut to it.
const MAX_TRACE_STATE_BYTES: usize = 512;

/// The most list members a `tracestate` may have.
const MAX_TRACE_STATE_MEMBERS: usize = 32;

/// A valid `traceparent` value: which trace, which span of it is the parent, and its flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

/// Why a `traceparent` (or `tracestate`) value is not valid. Receivers ignore such a header
/// (the W3C rule), so this is seen only where a stored value is read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid W3C trace context: {0}")]
pub struct InvalidTraceParent(&'static str);

/// The length of a version `00` value: `00-` 32 hex `-` 16 hex `-` 2 hex.
const VERSION_00_LEN: usize = 55;

impl TraceParent {
    /// The trace id, as 32 lowercase hex digits when displayed: what log lines carry to be
    /// found by a tracing backend's trace id.
    pub fn trace_id(&self) -> TraceId {
        TraceId(self.trace_id)
    }

    /// Whether the caller sampled (recorded) the trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The one valid value among a request's `traceparent` headers: `None` when there is none,
    /// when it is invalid, or when there are several (the W3C rule: such a context is
    /// ignored, not refused, and the request goes on as if untraced).
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(TRACEPARENT_HEADER).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        value.to_str().ok()?.parse().ok()
    }
}

fn hex_field<const N: usize>(
    text: &str,
    what: &'static str,
) -> Result<[u8; N], InvalidTraceParent> {
    // Only lowercase hex is valid; `hex` also accepts uppercase.
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(InvalidTraceParent(what));
    }
    let mut bytes = [0; N];
    hex::decode_to_slice(text, &mut bytes).map_err(|_| InvalidTraceParent(what))?;
    Ok(bytes)
}

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    /// Parses a value the way the W3C recommendation asks: a version this code does not know
    /// (newer than `00`) is read as far as version `00` defines it, and passed on as `00`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let ascii = value.as_bytes();
        if ascii.len() < VERSION_00_LEN {
            return Err(InvalidTraceParent("too short"));
        }
        // Which also makes every slice below fall on a character boundary.
        if !ascii[..VERSION_00_LEN].is_ascii() {
            return Err(InvalidTraceParent("not ASCII"));
        }
        let version: [u8; 1] =
            hex_field(&value[..2], "the version is not two lowercase hex digits")?;
        match version[0] {
            0xff => return Err(InvalidTraceParent("version ff is forbidden")),
            0 if ascii.len() != VERSION_00_LEN => {
                return Err(InvalidTraceParent("version 00 is exactly 55 characters"));
            }
            _ if ascii.len() > VERSION_00_LEN && ascii[VERSION_00_LEN] != b'-' => {
                return Err(InvalidTraceParent(
                    "fields after the flags must follow a dash",
                ));
            }
            _ => {}
        }
        if ascii[2] != b'-' || ascii[35] != b'-' || ascii[52] != b'-' {
            return Err(InvalidTraceParent("fields are not separated by dashes"));
        }
        let trace_id = hex_field(&value[3..35], "the trace id is not 32 lowercase hex digits")?;
        let parent_id = hex_field(
            &value[36..52],
            "the parent id is not 16 lowercase hex digits",
        )?;
        let [mut flags] = hex_field(&value[53..55], "the flags are not two lowercase hex digits")?;
        if version[0] != 0 {
            // Passed on as version 00, where the bits a newer version may define mean nothing
            // yet: only `sampled` is known.
            flags &= 1;
        }
        if trace_id == [0; 16] {
            return Err(InvalidTraceParent("the trace id is all zeros"));
        }
        if parent_id == [0; 8] {
            return Err(InvalidTraceParent("the parent id is all zeros"));
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    /// The version `00` header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.parent_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl Serialize for TraceParent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TraceParent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A valid `tracestate` value: the vendors' own `key=value` entries that travel with a trace
/// context, passed on as they came (empty members dropped), so that a vendor's sampling and
/// routing decisions hold in what the job does.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceState(Box<str>);

impl TraceState {
    /// The value, as a `tracestate` header carries it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `tracestate` of a request whose `traceparent` is valid: its headers joined, as the
    /// recommendation reads several, and cut to 512 characters; `None` when there is none, or
    /// when it is not valid (then only the trace context's state is dropped).
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let mut joined = String::new();
        for value in headers.get_all(TRACESTATE_HEADER) {
            if !joined.is_empty() {
                joined.push(',');
            }
            joined.push_str(value.to_str().ok()?);
        }
        joined.parse().ok()
    }
}

/// Lowercase letters, digits and `_ - * /`: what a `tracestate` key is made of.
fn key_chars(part: &str) -> bool {
    part.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*/".contains(&b))
}

/// A `tracestate` key (Level 1): a simple key, a lowercase letter and up to 255 more key
/// characters; or a multi-tenant key `tenant@system`, the tenant a lowercase letter or digit
/// and up to 240 more, the system a lowercase letter and up to 13 more.
fn valid_key(key: &str) -> bool {
    match key.split_once('@') {
        None => {
            key.len() <= 256 && key.starts_with(|c: char| c.is_ascii_lowercase()) && key_chars(key)
        }
        Some((tenant, system)) => {
            (1..=241).contains(&tenant.len())
                && tenant.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && key_chars(tenant)
                && (1..=14).contains(&system.len())
                && system.starts_with(|c: char| c.is_ascii_lowercase())
                && key_chars(system)
        }
    }
}

/// Members over this length are the first dropped from a `tracestate` too long to pass on.
const LONG_MEMBER_BYTES: usize = 128;

/// A `tracestate` value: up to 256 printable ASCII characters other than `,` and `=`, not
/// ending with a space.
fn valid_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 256
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
}

impl FromStr for TraceState {
    type Err = InvalidTraceParent;

    /// Parses a value as the recommendation asks: a list that breaks a rule (a member that is
    /// not `key=value`, a key twice, more than 32 members) is not valid; one that is valid but
    /// longer than 512 characters is cut to fit by dropping whole members, those over 128
    /// characters first, then from the end.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut members: Vec<&str> = Vec::new();
        let mut keys = std::collections::HashSet::new();
        for member in value.split(',') {
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                continue;
            }
            let (key, val) = member
                .split_once('=')
                .ok_or(InvalidTraceParent("a tracestate member has no `=`"))?;
            if !valid_key(key) || !valid_value(val) {
                return Err(InvalidTraceParent("a tracestate member is not key=value"));
            }
            if !keys.insert(key) {
                return Err(InvalidTraceParent("a tracestate key appears twice"));
            }
            members.push(member);
        }
        if members.len() > MAX_TRACE_STATE_MEMBERS {
            return Err(InvalidTraceParent(
                "the tracestate has more than 32 members",
            ));
        }
        let length = |members: &[&str]| {
            members.iter().map(|m| m.len()).sum::<usize>() + members.len().saturating_sub(1)
        };
        if length(&members) > MAX_TRACE_STATE_BYTES {
            members.retain(|member| member.len() <= LONG_MEMBER_BYTES);
        }
        while length(&members) > MAX_TRACE_STATE_BYTES {
            members.pop();
        }
        if members.is_empty() {
            return Err(InvalidTraceParent("the tracestate is empty"));
        }
        Ok(Self(members.join(",").into()))
    }
}

impl fmt::Display for TraceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TraceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceState({})", self.0)
    }
}

impl Serialize for TraceState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TraceState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A request's W3C trace context: its `traceparent`, and the `tracestate` that came with it
/// (a state means nothing without a valid parent, so there is none without one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceContext {
    /// Which trace, and which span of it is the parent.
    pub parent: TraceParent,
    /// The vendors' state that came with it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<TraceState>,
}

impl TraceContext {
    /// The trace context of a request's headers: `None` without one valid `traceparent`, and
    /// then its `tracestate` is not read either.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        Some(Self {
            parent: TraceParent::from_headers(headers)?,
            state: TraceState::from_headers(headers),
        })
    }

    /// The trace id.
    pub fn trace_id(&self) -> TraceId {
        self.parent.trace_id()
    }

    /// The context as headers to pass on: `traceparent`, and `tracestate` when there is one.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        self.carried(TRACEPARENT_HEADER, TRACESTATE_HEADER)
    }

    /// The context as environment variables to pass on: `TRACEPARENT`, and `TRACESTATE` when
    /// there is one.
    pub fn env_vars(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        self.carried(TRACEPARENT_ENV, TRACESTATE_ENV)
    }

    fn carried(
        &self,
        parent_name: &'static str,
        state_name: &'static str,
    ) -> impl Iterator<Item = (&'static str, String)> + '_ {
        std::iter::once((parent_name, self.parent.to_string())).chain(
            self.state
                .as_ref()
                .map(|state| (state_name, state.as_str().to_owned())),
        )
    }
}

/// A trace context as stored, before its values are checked.
#[derive(Deserialize)]
struct StoredContext<'a> {
    #[serde(borrow)]
    parent: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    state: Option<std::borrow::Cow<'a, str>>,
}

/// Reads a stored trace context leniently: values that no longer parse (should the rules be
/// tightened after they were stored) read as none, rather than making the whole job
/// unreadable.
pub(super) fn lenient<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<TraceContext>, D::Error> {
    let stored = Option::<StoredContext<'de>>::deserialize(deserializer)?;
    Ok(stored.and_then(|stored| {
        Some(TraceContext {
            parent: stored.parent.parse().ok()?,
            state: stored.state.and_then(|state| state.parse().ok()),
        })
    }))
}

/// A trace id, displayed as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId([u8; 16]);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_value_reads_and_writes_back_the_same() {
        let parent: TraceParent = VALID.parse().unwrap();
        assert_eq!(parent.to_string(), VALID);
        assert_eq!(
            parent.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(parent.sampled());
        let unsampled: TraceParent = VALID.replace("-01", "-00").parse().unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn a_newer_version_is_read_as_version_00_and_passed_on_as_00() {
        let newer = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-adds";
        let parent: TraceParent = newer.parse().unwrap();
        assert_eq!(parent.to_string(), VALID);
        let exact: TraceParent = VALID.replacen("00", "01", 1).parse().unwrap();
        assert_eq!(exact.to_string(), VALID);
        // Flags a newer version may define are not passed on as version 00 flags.
        let flagged: TraceParent = VALID
            .replacen("00", "01", 1)
            .replace("-01", "-ff")
            .parse()
            .unwrap();
        assert_eq!(flagged.to_string(), VALID);
        let unsampled: TraceParent = VALID
            .replacen("00", "01", 1)
            .replace("-01", "-fe")
            .parse()
            .unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn invalid_values_are_refused() {
        let invalid = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Version 00 with more after the flags.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // A newer version with something other than a dash after the flags.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Multi-byte characters: in the version (where nothing is checked before it is
            // sliced), where the flags end and across a field's end.
            "0é-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
            "00-4bf92f3577b34da6a3ce929d0e0e473é00f067aa0ba902b7-01",
        ];
        for value in invalid {
            assert!(
                value.parse::<TraceParent>().is_err(),
                "{value:?} was accepted"
            );
        }
    }

    #[test]
    fn of_a_request_s_headers_only_a_single_valid_one_counts() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(TraceParent::from_headers(&headers), None);
        headers.insert(TRACEPARENT_HEADER, VALID.parse().unwrap());
        assert_eq!(
            TraceParent::from_headers(&headers),
            Some(VALID.parse().unwrap())
        );
        headers.append(TRACEPARENT_HEADER, VALID.parse().unwrap());
        assert_eq!(TraceParent::from_headers(&headers), None);
        headers.insert(TRACEPARENT_HEADER, "garbage".parse().unwrap());
        assert_eq!(TraceParent::from_headers(&headers), None);
    }

    #[test]
    fn a_trace_state_is_kept_as_it_came_without_empty_members() {
        let state: TraceState = "rojo=00f067aa0ba902b7, ,congo=t61rcWkgMzE,tenant@vendor=x y"
            .parse()
            .unwrap();
        assert_eq!(
            state.as_str(),
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,tenant@vendor=x y"
        );
        for invalid in [
            "",
            " , ",
            "novalue",
            "Upper=1",
            "key=",
            "key=a,b=",
            "key=has=equals",
            "a@b@c=1",
            "_key=1",
            "1abc=x",
            "t@=x",
            "t@1x=x",
            "t@abcdefghijklmno=x",
            "rojo=1,rojo=2",
        ] {
            assert!(
                invalid.parse::<TraceState>().is_err(),
                "{invalid:?} was accepted"
            );
        }
        assert!("1tenant@sys=x".parse::<TraceState>().is_ok());
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(many.join(",").parse::<TraceState>().is_err(), "33 members");
    }

    #[test]
    fn a_trace_state_over_512_characters_is_cut_by_whole_members_long_ones_first() {
        let member = |key: &str, len: usize| format!("{key}={}", "v".repeat(len - key.len() - 1));
        let members = [
            member("a", 100),
            member("long", 200),
            member("b", 100),
            member("c", 120),
            member("d", 100),
            member("e", 100),
        ];
        let list = members.join(",");
        assert_eq!(list.len(), 725);
        // Without the long member: 520 characters and 4 commas, still too long, so the last
        // goes too: a, b, c, d are 420 characters and 3 commas.
        let cut: TraceState = list.parse().unwrap();
        let expected = [&members[0], &members[2], &members[3], &members[4]].map(String::as_str);
        assert_eq!(cut.as_str(), expected.join(","));
    }

    #[test]
    fn a_trace_context_is_read_from_headers_and_passed_on_under_each_carrier_s_names() {
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACESTATE_HEADER, "rojo=1".parse().unwrap());
        assert_eq!(
            TraceContext::from_headers(&headers),
            None,
            "no state without a parent"
        );
        headers.insert(TRACEPARENT_HEADER, VALID.parse().unwrap());
        let context = TraceContext::from_headers(&headers).unwrap();
        assert_eq!(
            context.headers().collect::<Vec<_>>(),
            [
                ("traceparent", VALID.to_owned()),
                ("tracestate", "rojo=1".to_owned())
            ]
        );
        let without_state = TraceContext {
            state: None,
            ..context
        };
        assert_eq!(
            without_state.env_vars().collect::<Vec<_>>(),
            [("TRACEPARENT", VALID.to_owned())]
        );
    }

    #[test]
    fn a_request_s_trace_state_headers_are_joined() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(TraceState::from_headers(&headers), None);
        headers.append(TRACESTATE_HEADER, "rojo=1".parse().unwrap());
        headers.append(TRACESTATE_HEADER, "congo=2".parse().unwrap());
        assert_eq!(
            TraceState::from_headers(&headers).unwrap().as_str(),
            "rojo=1,congo=2"
        );
        headers.append(TRACESTATE_HEADER, "Bad".parse().unwrap());
        assert_eq!(TraceState::from_headers(&headers), None);
    }

    #[test]
    fn it_is_stored_as_its_header_value() {
        let parent: TraceParent = VALID.parse().unwrap();
        let json = serde_json::to_string(&parent).unwrap();
        assert_eq!(json, format!("\"{VALID}\""));
        assert_eq!(serde_json::from_str::<TraceParent>(&json).unwrap(), parent);
        assert!(serde_json::from_str::<TraceParent>("\"00-zz\"").is_err());
        // In a stored job, a value that no longer parses reads as none, not as a broken job.
        let read = |json: &str| {
            let mut de = serde_json::Deserializer::from_str(json);
            lenient(&mut de).unwrap()
        };
        let context = TraceContext {
            parent,
            state: Some("rojo=1".parse().unwrap()),
        };
        let stored = serde_json::to_string(&context).unwrap();
        assert_eq!(
            stored,
            format!(r#"{{"parent":"{VALID}","state":"rojo=1"}}"#)
        );
        assert_eq!(read(&stored), Some(context));
        assert_eq!(
            read(&format!(r#"{{"parent":"{VALID}","state":"Not Valid"}}"#)),
            Some(TraceContext {
                parent,
                state: None
            })
        );
        assert_eq!(read(r#"{"parent":"00-zz","state":"rojo=1"}"#), None);
        assert_eq!(read("null"), None);
    }
}
