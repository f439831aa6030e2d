//! JSON limits shared by the front doors: how deep and how large a value is.
use serde_json::{Map, Value};

/// Nesting depth: a scalar is 0, `{}` is 1, `{"a": {}}` is 2.
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => object_depth(map),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// [`depth`] of an object.
pub fn object_depth(map: &Map<String, Value>) -> usize {
    1 + map.values().map(depth).max().unwrap_or(0)
}

/// Whether any string or key holds U+0000, which PostgreSQL cannot store
/// (in `text` or `jsonb`): refused by every door so both engines agree.
pub fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Object(map) => object_contains_nul(map),
        Value::Array(items) => items.iter().any(contains_nul),
        _ => false,
    }
}

/// [`contains_nul`] of an object.
pub fn object_contains_nul(map: &Map<String, Value>) -> bool {
    map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v))
}

/// Bytes of the compact JSON encoding.
pub fn encoded_len(value: &(impl serde::Serialize + ?Sized)) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a Value to a counter cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_containers() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!({"a": [{"b": 1}]})), 3);
    }

    #[test]
    fn nul_is_found_in_keys_and_nested_strings() {
        assert!(!contains_nul(&json!({"a": ["b", 1, null]})));
        assert!(contains_nul(&json!({"a": ["b\0"]})));
        assert!(contains_nul(&json!({"a\0": 1})));
    }

    #[test]
    fn encoded_len_matches_to_string() {
        let v = json!({"dwell_time_ms": 1200, "s": "é"});
        assert_eq!(encoded_len(&v), v.to_string().len());
    }
}
