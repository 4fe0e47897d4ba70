//! Declared action parameters and the check of submitted params against them, so every
//! handler gets type checking and clear field names for free.

use serde_json::{Map, Value};

use crate::job::FieldViolation;

/// The JSON type a parameter takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// Any JSON number.
    Number,
    /// A whole, non-negative number.
    Integer,
    /// A string.
    String,
    /// `true` or `false`.
    Boolean,
    /// An array.
    Array,
    /// An object.
    Object,
}

impl ParamType {
    /// The name shown in `ListActions`.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Number => "number",
            ParamType::Integer => "integer",
            ParamType::String => "string",
            ParamType::Boolean => "boolean",
            ParamType::Array => "array",
            ParamType::Object => "object",
        }
    }

    fn accepts(self, value: &Value) -> bool {
        match self {
            ParamType::Number => value.is_number(),
            // Struct carries every number as a double, so 5.0 is an integer here.
            ParamType::Integer => value
                .as_f64()
                .is_some_and(|n| n >= 0.0 && n.fract() == 0.0 && n <= u64::MAX as f64),
            ParamType::String => value.is_string(),
            ParamType::Boolean => value.is_boolean(),
            ParamType::Array => value.is_array(),
            ParamType::Object => value.is_object(),
        }
    }
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// Its key in the params object.
    pub name: String,
    /// Its JSON type.
    pub kind: ParamType,
    /// What it does and its default.
    pub description: String,
    /// Whether it must be given.
    pub required: bool,
}

impl ParamInfo {
    /// An optional parameter.
    pub fn optional(name: &str, kind: ParamType, description: &str) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            description: description.to_owned(),
            required: false,
        }
    }

    /// A required parameter.
    pub fn required(name: &str, kind: ParamType, description: &str) -> Self {
        Self {
            required: true,
            ..Self::optional(name, kind, description)
        }
    }
}

/// Checks `params` against the declared ones: required ones present, none undeclared, each of
/// its type. `null` counts as absent.
pub fn check(declared: &[ParamInfo], params: &Map<String, Value>) -> Vec<FieldViolation> {
    let mut violations = Vec::new();
    for (key, value) in params {
        match declared.iter().find(|p| &p.name == key) {
            None => {
                let names: Vec<&str> = declared.iter().map(|p| p.name.as_str()).collect();
                let expected = if names.is_empty() {
                    "this action takes no params".to_owned()
                } else {
                    format!("expected one of: {}", names.join(", "))
                };
                violations.push(FieldViolation::new(
                    key.clone(),
                    format!("unknown param; {expected}"),
                ));
            }
            Some(param) if !value.is_null() && !param.kind.accepts(value) => {
                let expected = match param.kind {
                    // "integer" alone reads as if -1 were one.
                    ParamType::Integer => "must be a whole number, 0 or more".to_owned(),
                    kind => format!("must be of type {}", kind.as_str()),
                };
                violations.push(FieldViolation::new(key.clone(), expected));
            }
            Some(_) => {}
        }
    }
    for param in declared.iter().filter(|p| p.required) {
        if params.get(&param.name).is_none_or(Value::is_null) {
            violations.push(FieldViolation::new(param.name.clone(), "is required"));
        }
    }
    violations
}

/// Reads an optional whole-number param, with a default. Types were checked at submission.
pub fn u64_param(params: &Map<String, Value>, name: &str, default: u64) -> u64 {
    params
        .get(name)
        .and_then(Value::as_f64)
        .map(|n| n as u64)
        .unwrap_or(default)
}

/// Reads an optional string param, with a default.
pub fn str_param<'a>(params: &'a Map<String, Value>, name: &str, default: &'a str) -> &'a str {
    params.get(name).and_then(Value::as_str).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn declared() -> Vec<ParamInfo> {
        vec![
            ParamInfo::required("n", ParamType::Integer, ""),
            ParamInfo::optional("s", ParamType::String, ""),
        ]
    }

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn integers_accept_whole_doubles_only() {
        assert!(check(&declared(), &map(json!({"n": 5.0}))).is_empty());
        assert_eq!(check(&declared(), &map(json!({"n": 5.5})))[0].field, "n");
        let negative = &check(&declared(), &map(json!({"n": -1})))[0];
        assert_eq!(negative.field, "n");
        assert_eq!(negative.description, "must be a whole number, 0 or more");
    }

    #[test]
    fn missing_required_and_null_are_reported() {
        assert_eq!(check(&declared(), &Map::new())[0].field, "n");
        assert_eq!(check(&declared(), &map(json!({"n": null})))[0].field, "n");
        assert!(check(&declared(), &map(json!({"n": 1, "s": null}))).is_empty());
    }

    #[test]
    fn wrong_types_and_unknown_keys_are_named() {
        let violations = check(&declared(), &map(json!({"n": 1, "s": 2, "x": true})));
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["s", "x"]);
    }
}
