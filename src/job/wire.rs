//! How large a JSON value is once sent as a `google.protobuf.Value`, so that the executor can
//! keep a job's snapshot within one response without encoding it.

use serde_json::Value;

/// The encoded size of `value` as a `google.protobuf.Value` message (its fields, without an
/// enclosing tag and length).
pub fn wire_size(value: &Value) -> usize {
    match value {
        // A tag and a one-byte varint.
        Value::Null | Value::Bool(_) => 2,
        // A tag and a fixed 64-bit double.
        Value::Number(_) => 9,
        Value::String(s) => framed(s.len()),
        Value::Array(items) => framed(items.iter().map(|v| framed(wire_size(v))).sum()),
        Value::Object(fields) => framed(
            fields
                .iter()
                .map(|(key, v)| framed(framed(key.len()) + framed(wire_size(v))))
                .sum(),
        ),
    }
}

/// Room in a response for what surrounds a job: an operation's name, its `Any` type URLs,
/// framing.
const ENVELOPE_BYTES: usize = 1024;

/// The most one job's snapshot may take, as sent, in responses of at most
/// `max_message_bytes`: half of one, less an envelope, because a finished
/// `google.longrunning.Operation` carries the job twice (as `metadata` and as `response`).
/// A Submit may fill half of it (params, labels, names: [`submitted_budget`]), results seven
/// sixteenths ([`results_budget`]), and the last sixteenth is left for what a run adds
/// (states, times, progress, errors).
pub fn job_budget(max_message_bytes: usize) -> usize {
    (max_message_bytes / 2).saturating_sub(ENVELOPE_BYTES)
}

/// What a Submit may put in its job's snapshot: half of [`job_budget`].
pub fn submitted_budget(max_message_bytes: usize) -> usize {
    job_budget(max_message_bytes) / 2
}

/// What a job's results may take together, as sent: seven sixteenths of [`job_budget`].
pub fn results_budget(max_message_bytes: usize) -> usize {
    job_budget(max_message_bytes) / 16 * 7
}

/// A length-delimited field of `len` bytes: tag, length varint, bytes.
pub fn framed(len: usize) -> usize {
    1 + varint_len(len) + len
}

fn varint_len(n: usize) -> usize {
    let bits = usize::BITS - n.leading_zeros();
    (bits.max(1) as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn varints_take_seven_bits_a_byte() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(16_384), 3);
    }

    #[test]
    fn sizes_follow_the_protobuf_encoding() {
        assert_eq!(wire_size(&json!(null)), 2);
        assert_eq!(wire_size(&json!(1.5)), 9);
        assert_eq!(wire_size(&json!("abc")), 5);
        // ListValue { values: [Value{number}] }: entry framed(9) = 11, list framed(11) = 13.
        assert_eq!(wire_size(&json!([1])), 13);
        // Struct { fields: {"a": Value{"b"}} }: key framed(1) = 3, value framed(framed(1)=3) =
        // 5, entry framed(8) = 10, struct framed(10) = 12.
        assert_eq!(wire_size(&json!({"a": "b"})), 12);
    }
}
