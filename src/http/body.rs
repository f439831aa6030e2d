//! A JSON body read with its lists bounded while it is parsed: an array
//! over `BUCKET_MAX_BATCH` is counted (without building its items) and
//! refused, never materialised. `Json<Value>` built every item first: a
//! 4 MiB array of `{}` was over a million maps before its length was
//! looked at.
//!
//! Answers as axum's `Json` did: 400 malformed, 413 too large, 415 not
//! JSON, in FastAPI's `{"detail": …}` shape; 422 for a list over the limit.
use std::cell::Cell;
use std::fmt;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::error::detail;
use crate::domain::FieldViolation;
use crate::domain::batch::Batch;
use crate::error::Error;

/// What a body may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// One item, or an array of items (a batch).
    ItemOrArray,
    /// An object whose lists are filters (Redrive's `statuses`).
    Filters,
}

/// The body as parsed.
#[derive(Debug, PartialEq)]
pub(super) enum Parsed {
    One(Value),
    Many(Vec<Value>),
}

/// The body, parsed with every bounded list within `max` items; else the
/// answer (boxed: a response is large beside a parsed body).
pub(super) fn read(
    headers: &HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
    shape: Shape,
    max: usize,
) -> Result<Parsed, Box<Response>> {
    if !json_content_type(headers) {
        return Err(Box::new(detail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`",
        )));
    }
    let bytes = bytes.map_err(|r| Box::new(detail(r.status(), r.body_text())))?;
    parse(&bytes, shape, max).map_err(|e| {
        Box::new(match e {
            // The whole body's array is named `body` already; a filter's list
            // by its key, under the body.
            Refusal::Over(violation) if violation.field == "body" => {
                Error::InvalidInput(vec![violation]).into_response()
            }
            Refusal::Over(violation) => Error::InvalidInput(vec![violation])
                .prefixed("body.")
                .into_response(),
            Refusal::Syntax(e) => detail(
                StatusCode::BAD_REQUEST,
                format!("Failed to parse the request body as JSON: {e}"),
            ),
        })
    })
}

#[derive(Debug)]
pub(super) enum Refusal {
    /// A list over the limit, named.
    Over(FieldViolation),
    Syntax(serde_json::Error),
}

/// `bytes` as JSON of `shape`, lists bounded by `max`.
pub(super) fn parse(bytes: &[u8], shape: Shape, max: usize) -> Result<Parsed, Refusal> {
    let over = Cell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = Top {
        shape,
        max,
        over: &over,
    }
    .deserialize(&mut deserializer)
    .and_then(|parsed| deserializer.end().map(|()| parsed));
    match (parsed, over.take()) {
        (_, Some(violation)) => Err(Refusal::Over(violation)),
        (Ok(parsed), None) => Ok(parsed),
        (Err(e), None) => Err(Refusal::Syntax(e)),
    }
}

/// `application/json` or `application/…+json`, as axum's `Json` accepts.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

/// The whole body.
struct Top<'a> {
    shape: Shape,
    max: usize,
    over: &'a Cell<Option<FieldViolation>>,
}

/// Items of a bounded list, built while within the limit; past it only
/// counted, so the answer can say how many came.
fn bounded<'de, A: SeqAccess<'de>>(
    mut seq: A,
    max: usize,
    over: &Cell<Option<FieldViolation>>,
    batch: impl FnOnce(usize) -> FieldViolation,
) -> Result<Vec<Value>, A::Error> {
    let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(max));
    while let Some(item) = seq.next_element::<Value>()? {
        items.push(item);
        if items.len() == max {
            break;
        }
    }
    let mut extra = 0;
    while seq.next_element::<IgnoredAny>()?.is_some() {
        extra += 1;
    }
    if extra > 0 {
        over.set(Some(batch(max + extra)));
        return Err(de::Error::custom("a list over the limit"));
    }
    Ok(items)
}

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = Parsed;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = Parsed;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Parsed, A::Error> {
        let max = self.max;
        let items = bounded(seq, max, self.over, |n| {
            Batch::JsonArray.check(max, n).expect_err("over the limit")
        })?;
        Ok(match self.shape {
            Shape::ItemOrArray => Parsed::Many(items),
            // Not an object: the handler names it.
            Shape::Filters => Parsed::One(Value::Array(items)),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        if self.shape == Shape::ItemOrArray {
            let value = Value::deserialize_map(map)?;
            return Ok(Parsed::One(value));
        }
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(Filter {
                key: &key,
                max: self.max,
                over: self.over,
            })?;
            object.insert(key, value);
        }
        Ok(Parsed::One(Value::Object(object)))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Parsed, E> {
        Ok(Parsed::One(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Parsed, E> {
        Ok(Parsed::One(Value::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Parsed, E> {
        Ok(Parsed::One(Value::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Parsed, E> {
        Ok(Parsed::One(Value::from(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Parsed, E> {
        Ok(Parsed::One(Value::String(v.to_owned())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Parsed, E> {
        Ok(Parsed::One(Value::Null))
    }
}

/// `Value`'s own map visit, for an object read as a whole.
trait DeserializeMap: Sized {
    fn deserialize_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

impl DeserializeMap for Value {
    fn deserialize_map<'de, A: MapAccess<'de>>(map: A) -> Result<Value, A::Error> {
        serde::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))
    }
}

/// One value of a filters object: a list in it is bounded.
struct Filter<'a> {
    key: &'a str,
    max: usize,
    over: &'a Cell<Option<FieldViolation>>,
}

impl<'de> DeserializeSeed<'de> for Filter<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Filter<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        let (key, max) = (self.key, self.max);
        bounded(seq, max, self.over, |n| match key {
            "statuses" => Batch::Statuses.check(max, n).expect_err("over the limit"),
            other => {
                FieldViolation::new(other, format!("a list holds at most {max} items, got {n}"))
            }
        })
        .map(Value::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        Value::deserialize_map(map)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_array_over_the_limit_is_counted_not_built() {
        let three = br#"[{}, {"a": [1, 2, 3, 4]}, 3]"#;
        assert_eq!(
            parse(three, Shape::ItemOrArray, 3).unwrap(),
            Parsed::Many(vec![json!({}), json!({"a": [1, 2, 3, 4]}), json!(3)])
        );
        let Err(Refusal::Over(v)) = parse(three, Shape::ItemOrArray, 2) else {
            panic!("over the limit")
        };
        assert_eq!(v.field, "body");
        assert_eq!(v.description, "an array holds at most 2 items, got 3");
        // Nested lists of an item are the item's business.
        assert!(parse(br#"{"a": [1, 2, 3, 4]}"#, Shape::ItemOrArray, 2).is_ok());
    }

    #[test]
    fn a_filters_list_over_the_limit_is_named() {
        let body = br#"{"statuses": ["failed", "failed", "failed"], "user_id": "u"}"#;
        assert!(parse(body, Shape::Filters, 3).is_ok());
        let Err(Refusal::Over(v)) = parse(body, Shape::Filters, 2) else {
            panic!("over the limit")
        };
        assert_eq!(v.field, "statuses");
    }

    #[test]
    fn what_json_refuses_is_a_syntax_error_and_values_read_back_as_sent() {
        for bad in [&b"[1,"[..], b"{} {}", b"", b"[1] x", b"{\"a\":}"] {
            assert!(
                matches!(parse(bad, Shape::ItemOrArray, 10), Err(Refusal::Syntax(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for text in [
            r#""s""#,
            "null",
            "true",
            "-1",
            "18446744073709551615",
            "1.5",
        ] {
            let value: Value = serde_json::from_str(text).unwrap();
            for shape in [Shape::ItemOrArray, Shape::Filters] {
                assert_eq!(
                    parse(text.as_bytes(), shape, 10).unwrap(),
                    Parsed::One(value.clone())
                );
            }
        }
    }

    #[test]
    fn json_content_types_are_axums() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            json_content_type(&h)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("application/problem+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!json_content_type(&HeaderMap::new()));
    }
}
