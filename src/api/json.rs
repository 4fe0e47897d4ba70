//! Helpers for the proto3 JSON that longrun writes (the CLI's output, the Connect protocol).

/// Writes whole doubles as `3`, not `3.0`, as protobuf's reference JSON printers (and so
/// grpcurl) do. Both forms parse as the same double; this one is what users expect to read,
/// and it matters because `google.protobuf.Struct` carries every JSON number as a double.
pub fn integral_numbers_as_integers(value: &mut serde_json::Value) {
    /// Beyond 2^53 not every integer is a double, so leave those as they are.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        serde_json::Value::Number(number) => {
            if let Some(f) = number
                .as_f64()
                .filter(|f| number.is_f64() && f.fract() == 0.0 && f.abs() <= EXACT)
            {
                // In range and whole, so the cast is exact.
                #[allow(clippy::cast_possible_truncation)]
                let whole = f as i64;
                *number = whole.into();
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_numbers_as_integers),
        serde_json::Value::Object(map) => map.values_mut().for_each(integral_numbers_as_integers),
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::String(_) => {}
    }
}
