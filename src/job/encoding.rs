//! How a [`Job`](super::Job) is written as JSON in a durable store's snapshots.
//!
//! Every logged transition stores a whole snapshot, so its size is paid in every WAL frame,
//! every checkpoint and every replay. Snapshots are therefore written compactly: times as
//! integer nanoseconds since the Unix epoch, and fields that hold nothing (no error, no end
//! time, no labels, no input, untouched progress) left out. Snapshots written before that —
//! times as `{"secs_since_epoch":…,"nanos_since_epoch":…}` and every field present — still
//! read the same.

use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{self, MapAccess, Visitor},
};

/// True when `value` is its type's default: such a field is left out of a snapshot.
pub(super) fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A time as integer nanoseconds since the Unix epoch. Times after 2554, which do not fit,
/// keep serde's own form (which also still reads, and refuses times before the epoch).
pub(super) mod unix_nanos {
    use super::*;

    pub fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        match time
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|since| u64::try_from(since.as_nanos()).ok())
        {
            Some(nanos) => serializer.serialize_u64(nanos),
            None => time.serialize(serializer),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemTime, D::Error> {
        deserializer.deserialize_any(TimeVisitor)
    }
}

/// [`unix_nanos`] for an optional time; pair with `default` and
/// `skip_serializing_if = "Option::is_none"`, so that a missing field reads as `None`.
pub(super) mod opt_unix_nanos {
    use super::*;

    pub fn serialize<S: Serializer>(
        time: &Option<SystemTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => unix_nanos::serialize(time, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        deserializer.deserialize_option(OptionalTimeVisitor)
    }
}

/// Reads a time written either way: integer nanoseconds, or serde's `SystemTime` map.
struct TimeVisitor;

impl<'de> Visitor<'de> for TimeVisitor {
    type Value = SystemTime;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("nanoseconds since the Unix epoch, or a SystemTime")
    }

    fn visit_u64<E: de::Error>(self, nanos: u64) -> Result<SystemTime, E> {
        Ok(UNIX_EPOCH + Duration::from_nanos(nanos))
    }

    fn visit_i64<E: de::Error>(self, nanos: i64) -> Result<SystemTime, E> {
        u64::try_from(nanos)
            .map(|nanos| UNIX_EPOCH + Duration::from_nanos(nanos))
            .map_err(|_| E::custom("a time as nanoseconds cannot be negative"))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SystemTime, A::Error> {
        SystemTime::deserialize(de::value::MapAccessDeserializer::new(map))
    }
}

struct OptionalTimeVisitor;

impl<'de> Visitor<'de> for OptionalTimeVisitor {
    type Value = Option<SystemTime>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a time or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        unix_nanos::deserialize(deserializer).map(Some)
    }
}

/// Binary inputs as base64 strings: a quarter bigger than the bytes, where serde's default (an
/// array of numbers) would be three to four times bigger.
pub(super) mod base64_bytes {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD
            .decode(text)
            .map(Bytes::from)
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{ActionState, Job, JobError, JobState};
    use super::*;

    /// A snapshot as versions before the compact encoding wrote it (SUCCEEDED, one action).
    const LEGACY: &str = r#"{"id":"01a21b17-cc48-739b-b8c8-3c74e3efc9d8","state":"SUCCEEDED","version":5,"logged_version":5,"actions":[{"name":"echo","params":{"message":"hi"},"input":"","state":"SUCCEEDED","progress":{"percent":100,"message":"","current":0,"total":0},"result":{"input":"","input_encoding":"utf8","params":{"message":"hi"}},"error":null,"start_time":{"secs_since_epoch":1795750874,"nanos_since_epoch":184950030},"end_time":{"secs_since_epoch":1795750874,"nanos_since_epoch":185957397}}],"error":null,"attempt":1,"max_attempts":1,"priority":0,"labels":{},"idempotency_key":null,"tenant":"default","timeout":null,"create_time":{"secs_since_epoch":1795750874,"nanos_since_epoch":184942579},"start_time":{"secs_since_epoch":1795750874,"nanos_since_epoch":184950030},"end_time":{"secs_since_epoch":1795750874,"nanos_since_epoch":185958609},"update_time":{"secs_since_epoch":1795750874,"nanos_since_epoch":185958609}}"#;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn legacy_snapshots_read_the_same_and_rewrite_far_smaller() {
        let job: Job = serde_json::from_str(LEGACY).unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(job.create_time, at(1_795_750_874, 184_942_579));
        assert_eq!(job.end_time, Some(at(1_795_750_874, 185_958_609)));
        let action = &job.actions[0];
        assert_eq!(action.state, ActionState::Succeeded);
        assert_eq!(action.progress.percent, 100);
        assert_eq!(action.start_time, Some(at(1_795_750_874, 184_950_030)));
        assert_eq!((action.error.as_ref(), job.timeout), (None, None));

        let compact = serde_json::to_string(&job).unwrap();
        // 561 bytes against 900 here, where the action's result and progress are kept whole;
        // a QUEUED snapshot shrinks from about 600 bytes to about 300.
        assert!(compact.len() * 3 < LEGACY.len() * 2, "{compact}");
        assert!(
            compact.contains(r#""create_time":1795750874184942579"#),
            "{compact}"
        );
        assert_eq!(serde_json::from_str::<Job>(&compact).unwrap(), job);
    }

    #[test]
    fn empty_fields_are_left_out_and_full_ones_round_trip() {
        let mut job: Job = serde_json::from_str(LEGACY).unwrap();
        let compact = serde_json::to_value(&job).unwrap();
        for absent in ["error", "labels", "idempotency_key", "timeout"] {
            assert!(compact.get(absent).is_none(), "{absent} in {compact}");
        }
        assert!(compact["actions"][0].get("input").is_none(), "{compact}");
        assert!(compact["actions"][0].get("error").is_none(), "{compact}");

        job.error = Some(JobError {
            details: json!({"k": 1}).as_object().cloned().unwrap_or_default(),
            ..JobError::new("INTERNAL", "BROKEN", "it broke")
        });
        job.labels.insert("team".into(), "a".into());
        job.idempotency_key = Some("key".into());
        job.timeout = Some(Duration::from_millis(1500));
        job.actions[0].input = bytes::Bytes::from_static(b"\x00\x01");
        job.actions[0].end_time = None;
        let text = serde_json::to_string(&job).unwrap();
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), job);
    }

    #[test]
    fn times_past_u64_nanoseconds_keep_the_legacy_form() {
        let mut job: Job = serde_json::from_str(LEGACY).unwrap();
        job.update_time = UNIX_EPOCH + Duration::from_secs(600 * 365 * 86_400);
        let text = serde_json::to_string(&job).unwrap();
        assert!(text.contains("secs_since_epoch"), "{text}");
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), job);
    }

    #[test]
    fn a_negative_time_is_refused() {
        let text = LEGACY.replacen(
            r#"{"secs_since_epoch":1795750874,"nanos_since_epoch":184942579}"#,
            "-5",
            1,
        );
        let error = serde_json::from_str::<Job>(&text).unwrap_err();
        assert!(error.to_string().contains("negative"), "{error}");
    }
}
