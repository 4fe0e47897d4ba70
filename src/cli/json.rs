//! Proto3 canonical JSON for the wire types, the form grpcurl and `buf curl` show.
//!
//! prost's generated types know nothing of JSON, so each message is transcoded through
//! prost-reflect: encoded to bytes, decoded as a `DynamicMessage` of the same descriptor (from
//! the descriptor set the build embeds for reflection), then serialized with serde. Going
//! through the descriptors keeps the JSON mapping (lowerCamelCase names, enum names, int64 as
//! strings, well-known types) exactly the protobuf one, with no hand-written mapping to drift.

use anyhow::Context as _;
use longrun::api::json::integral_numbers_as_integers;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

/// Transcodes between prost messages and their proto3 JSON form.
pub struct Json {
    pool: DescriptorPool,
}

impl Json {
    /// Loads the descriptors embedded in the library.
    pub fn new() -> anyhow::Result<Self> {
        let pool = DescriptorPool::decode(longrun::api::FILE_DESCRIPTOR_SET)
            .context("loading the embedded proto descriptors (a build problem)")?;
        Ok(Self { pool })
    }

    fn descriptor(&self, full_name: &str) -> anyhow::Result<MessageDescriptor> {
        self.pool
            .get_message_by_name(full_name)
            .with_context(|| format!("no descriptor for {full_name} (a build problem)"))
    }

    /// `message`, of the proto type `full_name`, as one line of proto3 JSON. Fields at their
    /// default are written too (`"jobs": []`, `"done": false`, `"percent": 0`), as grpcurl's
    /// `-emit-defaults` does: a script reads `.done` or iterates `.jobs[]` without first
    /// checking that the field is there. Unset messages stay absent.
    pub fn encode<M: prost::Message>(
        &self,
        message: &M,
        full_name: &str,
    ) -> anyhow::Result<String> {
        let dynamic = DynamicMessage::decode(
            self.descriptor(full_name)?,
            message.encode_to_vec().as_slice(),
        )
        .with_context(|| format!("transcoding {full_name} to JSON"))?;
        let options = SerializeOptions::new().skip_default_fields(false);
        let mut value = dynamic
            .serialize_with_options(serde_json::value::Serializer, &options)
            .with_context(|| format!("writing {full_name} as JSON"))?;
        integral_numbers_as_integers(&mut value);
        serde_json::to_string(&value).with_context(|| format!("writing {full_name} as JSON"))
    }

    /// Parses proto3 JSON (either field-name style) as the proto type `full_name`.
    pub fn decode<M: prost::Message + Default>(
        &self,
        text: &str,
        full_name: &str,
    ) -> anyhow::Result<M> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let dynamic = DynamicMessage::deserialize(self.descriptor(full_name)?, &mut deserializer)
            .with_context(|| format!("not a valid {full_name} in proto3 JSON"))?;
        deserializer
            .end()
            .with_context(|| format!("trailing characters after the {full_name}"))?;
        M::decode(dynamic.encode_to_vec().as_slice())
            .with_context(|| format!("transcoding {full_name} from JSON"))
    }

    /// A `google.protobuf.Value` (an action's result) as compact JSON.
    pub fn value(&self, value: &prost_types::Value) -> String {
        // Every Value has a JSON form; fall back to Debug rather than fail a whole summary.
        self.encode(value, "google.protobuf.Value")
            .unwrap_or_else(|_| format!("{value:?}"))
    }
}

#[cfg(test)]
mod tests {
    use longrun::api::pb;

    use super::*;

    #[test]
    fn jobs_use_canonical_names_enum_names_and_string_int64() {
        let json = Json::new().unwrap();
        let job = pb::Job {
            id: "j1".to_owned(),
            state: pb::JobState::Running as i32,
            version: 7,
            max_attempts: 2,
            ..Default::default()
        };
        let text = json.encode(&job, "longrun.v1.Job").unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["state"], "JOB_STATE_RUNNING");
        assert_eq!(parsed["version"], "7");
        assert_eq!(parsed["maxAttempts"], 2);
        assert_eq!(parsed["attempt"], 0, "defaults are written: {text}");
        assert_eq!(parsed["labels"], serde_json::json!({}));
        assert!(
            parsed.get("error").is_none(),
            "unset messages are not: {text}"
        );
        let empty = json
            .encode(
                &pb::ListJobsResponse::default(),
                "longrun.v1.ListJobsResponse",
            )
            .unwrap();
        assert_eq!(empty, r#"{"jobs":[],"nextPageToken":""}"#);
    }

    #[test]
    fn whole_doubles_print_as_integers_and_fractions_stay() {
        let json = Json::new().unwrap();
        let value =
            longrun::api::convert::json_to_value(&serde_json::json!({"a": 3, "b": 0.5, "c": [-2]}));
        assert_eq!(json.value(&value), r#"{"a":3,"b":0.5,"c":[-2]}"#);
    }

    #[test]
    fn submit_requests_parse_from_either_name_style() {
        let json = Json::new().unwrap();
        let request: pb::SubmitRequest = json
            .decode(
                r#"{"actions":[{"name":"sleep","params":{"steps":2}}],
                    "max_attempts":3,"idempotencyKey":"k","wait":"1.5s"}"#,
                "longrun.v1.SubmitRequest",
            )
            .unwrap();
        assert_eq!(request.actions[0].name, "sleep");
        assert_eq!(request.max_attempts, 3);
        assert_eq!(request.idempotency_key, "k");
        assert_eq!(request.wait.unwrap().nanos, 500_000_000);
        let error = json
            .decode::<pb::SubmitRequest>(r#"{"actionz":[]}"#, "longrun.v1.SubmitRequest")
            .unwrap_err();
        assert!(format!("{error:#}").contains("actionz"), "{error:#}");
    }
}
