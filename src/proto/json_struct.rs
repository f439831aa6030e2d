//! `google.protobuf.Struct` as the JSON object it stands for.
//!
//! Past the doors the contract's Structs (`raw_signals`, `karma_actions`)
//! are serde_json objects. With prost's own `Struct` every packet was read
//! into prost's tree, converted into serde_json's and dropped, and every
//! delivery built a prost tree again to send: ~3 % of the server's samples
//! at 5,000 packets/s (BENCHMARKS.md, nineteenth session). This type is
//! read from the wire into serde_json's map and written from it directly.
//!
//! Invariant: it reads and writes exactly what prost's `Struct` with the
//! conversions it replaced did (a property test holds the two alike, both
//! ways): on reading, a number that is whole and within ±2^53 becomes a
//! JSON integer, any other finite number a float, NaN, the infinities and
//! a value of no kind null; a repeated field merges as protobuf merges
//! (the last scalar wins, Structs merge, lists append); prost's recursion
//! limit holds. On writing, every JSON number is sent as a double.
use prost::bytes::{Buf, BufMut};
use prost::encoding::{
    self, DecodeContext, WireType, check_wire_type, encode_key, encode_varint, encoded_len_varint,
    key_len, skip_field,
};
use prost::{DecodeError, Message};
use serde_json::{Map, Number, Value};

/// A `google.protobuf.Struct`, held as a JSON object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JsonStruct(pub Map<String, Value>);

impl Message for JsonStruct {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_fields(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        merge_struct_field(&mut self.0, tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        fields_len(&self.0)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

// Field numbers of struct.proto.
const STRUCT_FIELDS: u32 = 1;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;
const NULL_VALUE: u32 = 1;
const NUMBER_VALUE: u32 = 2;
const STRING_VALUE: u32 = 3;
const BOOL_VALUE: u32 = 4;
const STRUCT_VALUE: u32 = 5;
const LIST_VALUE: u32 = 6;
const LIST_VALUES: u32 = 1;

/// Whole and within ±2^53: read back as an integer.
const LARGEST_WHOLE: f64 = 9.007_199_254_740_992e15;

/// What a `NumberValue` reads as.
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < LARGEST_WHOLE {
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

fn delimited_len(len: usize) -> usize {
    encoded_len_varint(len as u64) + len
}

/// A map entry: the key unless empty (prost leaves out a default key), and
/// the value, which always has a kind.
fn entry_len(key: &str, value: &Value) -> usize {
    let key = match key.is_empty() {
        true => 0,
        false => key_len(ENTRY_KEY) + delimited_len(key.len()),
    };
    key + key_len(ENTRY_VALUE) + delimited_len(value_len(value))
}

fn fields_len(map: &Map<String, Value>) -> usize {
    map.iter()
        .map(|(k, v)| key_len(STRUCT_FIELDS) + delimited_len(entry_len(k, v)))
        .sum()
}

fn list_len(items: &[Value]) -> usize {
    items
        .iter()
        .map(|v| key_len(LIST_VALUES) + delimited_len(value_len(v)))
        .sum()
}

/// The length of a `Value` message: its one kind field.
fn value_len(value: &Value) -> usize {
    match value {
        Value::Null => key_len(NULL_VALUE) + 1,
        Value::Bool(_) => key_len(BOOL_VALUE) + 1,
        Value::Number(_) => key_len(NUMBER_VALUE) + 8,
        Value::String(s) => key_len(STRING_VALUE) + delimited_len(s.len()),
        Value::Array(items) => key_len(LIST_VALUE) + delimited_len(list_len(items)),
        Value::Object(map) => key_len(STRUCT_VALUE) + delimited_len(fields_len(map)),
    }
}

fn encode_fields(map: &Map<String, Value>, buf: &mut impl BufMut) {
    for (key, value) in map {
        encode_key(STRUCT_FIELDS, WireType::LengthDelimited, buf);
        encode_varint(entry_len(key, value) as u64, buf);
        encode_entry(key, value, buf);
    }
}

/// A map entry's content (see [`entry_len`]).
fn encode_entry(key: &str, value: &Value, buf: &mut impl BufMut) {
    if !key.is_empty() {
        // prost's string::encode, which takes a `&String`.
        encode_key(ENTRY_KEY, WireType::LengthDelimited, buf);
        encode_varint(key.len() as u64, buf);
        buf.put_slice(key.as_bytes());
    }
    encode_value_field(ENTRY_VALUE, value, buf);
}

fn encode_list(items: &[Value], buf: &mut impl BufMut) {
    for item in items {
        encode_value_field(LIST_VALUES, item, buf);
    }
}

/// A `Value` message as field `tag`: its key, its length, its content.
fn encode_value_field(tag: u32, value: &Value, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value_len(value) as u64, buf);
    encode_value(value, buf);
}

/// A `Value` message's content.
fn encode_value(value: &Value, buf: &mut impl BufMut) {
    match value {
        Value::Null => encoding::int32::encode(NULL_VALUE, &0, buf),
        Value::Bool(b) => encoding::bool::encode(BOOL_VALUE, b, buf),
        Value::Number(n) => encoding::double::encode(NUMBER_VALUE, &n.as_f64().unwrap_or(0.0), buf),
        Value::String(s) => encoding::string::encode(STRING_VALUE, s, buf),
        Value::Array(items) => {
            encode_key(LIST_VALUE, WireType::LengthDelimited, buf);
            encode_varint(list_len(items) as u64, buf);
            encode_list(items, buf);
        }
        Value::Object(map) => {
            encode_key(STRUCT_VALUE, WireType::LengthDelimited, buf);
            encode_varint(fields_len(map) as u64, buf);
            encode_fields(map, buf);
        }
    }
}

/// One field of a `Struct`, as prost's generated `merge_field` reads it.
fn merge_struct_field(
    map: &mut Map<String, Value>,
    tag: u32,
    wire_type: WireType,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    match tag {
        STRUCT_FIELDS => {
            let mut key = String::new();
            let mut value = Value::Null;
            // Checks the wire type, the recursion limit, then reads the
            // entry: prost's map merge.
            encoding::message::merge(
                wire_type,
                &mut Entry {
                    key: &mut key,
                    value: &mut value,
                },
                buf,
                ctx,
            )
            .map_err(|mut e| {
                e.push("Struct", "fields");
                e
            })?;
            map.insert(key, value);
            Ok(())
        }
        _ => skip_field(wire_type, tag, buf, ctx),
    }
}

/// A map entry being read.
#[derive(Debug)]
struct Entry<'a> {
    key: &'a mut String,
    value: &'a mut Value,
}

impl Message for Entry<'_> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_entry(self.key, self.value, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            ENTRY_KEY => encoding::string::merge(wire_type, self.key, buf, ctx),
            ENTRY_VALUE => {
                encoding::message::merge(wire_type, &mut ValueSlot(self.value), buf, ctx)
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        entry_len(self.key, self.value)
    }

    fn clear(&mut self) {
        self.key.clear();
        *self.value = Value::Null;
    }
}

/// A `Value` message being read into a JSON value. Its kind is a oneof:
/// a scalar replaces what was read before; a Struct or a list merges into
/// one read before, else replaces it.
#[derive(Debug)]
struct ValueSlot<'a>(&'a mut Value);

impl Message for ValueSlot<'_> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_value(self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        merge_kind(self.0, tag, wire_type, buf, ctx).map_err(|mut e| {
            if (NULL_VALUE..=LIST_VALUE).contains(&tag) {
                e.push("Value", "kind");
            }
            e
        })
    }

    fn encoded_len(&self) -> usize {
        value_len(self.0)
    }

    fn clear(&mut self) {
        *self.0 = Value::Null;
    }
}

fn merge_kind(
    value: &mut Value,
    tag: u32,
    wire_type: WireType,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    match tag {
        NULL_VALUE => {
            let mut ignored = 0;
            encoding::int32::merge(wire_type, &mut ignored, buf, ctx)?;
            *value = Value::Null;
        }
        NUMBER_VALUE => {
            let mut n = 0.0;
            encoding::double::merge(wire_type, &mut n, buf, ctx)?;
            *value = number(n);
        }
        STRING_VALUE => {
            let mut s = String::new();
            encoding::string::merge(wire_type, &mut s, buf, ctx)?;
            *value = Value::String(s);
        }
        BOOL_VALUE => {
            let mut b = false;
            encoding::bool::merge(wire_type, &mut b, buf, ctx)?;
            *value = Value::Bool(b);
        }
        STRUCT_VALUE => {
            // Merged into the object read before, if one was.
            let mut read = match std::mem::take(value) {
                Value::Object(map) => JsonStruct(map),
                _ => JsonStruct::default(),
            };
            encoding::message::merge(wire_type, &mut read, buf, ctx)?;
            *value = Value::Object(read.0);
        }
        LIST_VALUE => {
            if !value.is_array() {
                *value = Value::Array(Vec::new());
            }
            let Value::Array(items) = value else {
                unreachable!("made an array above")
            };
            encoding::message::merge(wire_type, &mut ListSlot(items), buf, ctx)?;
        }
        _ => skip_field(wire_type, tag, buf, ctx)?,
    }
    Ok(())
}

/// A `ListValue` being read: each value read is appended.
#[derive(Debug)]
struct ListSlot<'a>(&'a mut Vec<Value>);

impl Message for ListSlot<'_> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_list(self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            LIST_VALUES => check_wire_type(WireType::LengthDelimited, wire_type)
                .and_then(|()| {
                    let mut item = Value::Null;
                    encoding::message::merge(wire_type, &mut ValueSlot(&mut item), buf, ctx)?;
                    self.0.push(item);
                    Ok(())
                })
                .map_err(|mut e| {
                    e.push("ListValue", "values");
                    e
                }),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        list_len(self.0)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost_types::value::Kind;
    use serde_json::json;

    use super::*;

    // What the doors did with prost's Struct before this type: the model
    // it must match.
    fn struct_to_json(s: prost_types::Struct) -> Map<String, Value> {
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect()
    }

    fn value_to_json(v: prost_types::Value) -> Value {
        match v.kind {
            None | Some(Kind::NullValue(_)) => Value::Null,
            Some(Kind::BoolValue(b)) => Value::Bool(b),
            Some(Kind::StringValue(s)) => Value::String(s),
            Some(Kind::NumberValue(n))
                if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 =>
            {
                Value::Number(Number::from(n as i64))
            }
            Some(Kind::NumberValue(n)) => Number::from_f64(n).map_or(Value::Null, Value::Number),
            Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
            Some(Kind::ListValue(l)) => {
                Value::Array(l.values.into_iter().map(value_to_json).collect())
            }
        }
    }

    fn json_to_struct(map: &Map<String, Value>) -> prost_types::Struct {
        prost_types::Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }
    }

    fn json_to_value(v: &Value) -> prost_types::Value {
        let kind = match v {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Array(items) => Kind::ListValue(prost_types::ListValue {
                values: items.iter().map(json_to_value).collect(),
            }),
            Value::Object(map) => Kind::StructValue(json_to_struct(map)),
        };
        prost_types::Value { kind: Some(kind) }
    }

    #[test]
    fn json_round_trips_through_the_wire() {
        let v = json!({"dwell_time_ms": 1200, "mouse_velocity": 0.5, "tags": ["a", null, true], "n": {"x": -3}, "": 1});
        let Value::Object(map) = v.clone() else {
            unreachable!()
        };
        let bytes = JsonStruct(map).encode_to_vec();
        assert_eq!(
            Value::Object(JsonStruct::decode(bytes.as_slice()).unwrap().0),
            v
        );
    }

    fn kind() -> impl Strategy<Value = prost_types::Value> {
        let leaf = prop_oneof![
            Just(None),
            any::<i32>().prop_map(|n| Some(Kind::NullValue(n))),
            any::<f64>().prop_map(|n| Some(Kind::NumberValue(n))),
            prop_oneof![
                Just(0.0),
                Just(-0.0),
                Just(1e300),
                Just(9.007_199_254_740_992e15),
                (-1_000_000i64..1_000_000).prop_map(|n| n as f64)
            ]
            .prop_map(|n| Some(Kind::NumberValue(n))),
            ".{0,6}".prop_map(|s| Some(Kind::StringValue(s))),
            any::<bool>().prop_map(|b| Some(Kind::BoolValue(b))),
        ]
        .prop_map(|kind| prost_types::Value { kind });
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::btree_map(".{0,4}", inner.clone(), 0..5).prop_map(|fields| {
                    prost_types::Value {
                        kind: Some(Kind::StructValue(prost_types::Struct { fields })),
                    }
                }),
                prop::collection::vec(inner, 0..5).prop_map(|values| prost_types::Value {
                    kind: Some(Kind::ListValue(prost_types::ListValue { values })),
                }),
            ]
        })
    }

    fn a_struct() -> impl Strategy<Value = prost_types::Struct> {
        prop::collection::btree_map(".{0,4}", kind(), 0..6)
            .prop_map(|fields| prost_types::Struct { fields })
    }

    proptest! {
        #[test]
        fn reads_what_prost_and_the_conversion_read(s in a_struct()) {
            let bytes = s.encode_to_vec();
            let ours = JsonStruct::decode(bytes.as_slice()).unwrap();
            prop_assert_eq!(ours.0, struct_to_json(s));
        }

        #[test]
        fn writes_what_the_conversion_and_prost_wrote(s in a_struct()) {
            let map = struct_to_json(s);
            let ours = JsonStruct(map.clone());
            let theirs = json_to_struct(&map).encode_to_vec();
            prop_assert_eq!(ours.encoded_len(), theirs.len());
            prop_assert_eq!(ours.encode_to_vec(), theirs);
        }

        #[test]
        fn reads_a_damaged_struct_as_prost_reads_it(
            s in a_struct(),
            cut in any::<prop::sample::Index>(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = s.encode_to_vec();
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
                bytes.truncate(cut.index(bytes.len() + 1).max(i));
            }
            let theirs = prost_types::Struct::decode(bytes.as_slice());
            let ours = JsonStruct::decode(bytes.as_slice());
            match theirs {
                Ok(s) => prop_assert_eq!(ours.unwrap().0, struct_to_json(s)),
                Err(_) => prop_assert!(ours.is_err()),
            }
        }

        #[test]
        fn reads_anything_prost_reads_alike(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let theirs = prost_types::Struct::decode(bytes.as_slice());
            let ours = JsonStruct::decode(bytes.as_slice());
            match theirs {
                Ok(s) => prop_assert_eq!(ours.unwrap().0, struct_to_json(s)),
                Err(_) => prop_assert!(ours.is_err()),
            }
        }
    }

    /// Fields repeated on the wire merge as protobuf merges them.
    #[test]
    fn repeated_fields_merge_as_prost_merges() {
        let value = |kind| prost_types::Value { kind: Some(kind) };
        let one = |k: &str, v| prost_types::Struct {
            fields: [(k.to_owned(), v)].into(),
        };
        let cases = [
            // The same key twice: the second wins.
            [
                one("a", value(Kind::BoolValue(true))),
                one("a", value(Kind::NumberValue(2.0))),
            ],
            // A Struct value twice under one key: the second replaces it
            // (map entries replace; Structs merge only inside one Value).
            [
                one(
                    "a",
                    value(Kind::StructValue(one("x", value(Kind::NullValue(0))))),
                ),
                one(
                    "a",
                    value(Kind::StructValue(one(
                        "y",
                        value(Kind::StringValue("s".into())),
                    ))),
                ),
            ],
        ];
        for [first, second] in cases {
            let mut bytes = first.encode_to_vec();
            bytes.extend(second.encode_to_vec());
            let theirs = prost_types::Struct::decode(bytes.as_slice()).unwrap();
            let ours = JsonStruct::decode(bytes.as_slice()).unwrap();
            assert_eq!(ours.0, struct_to_json(theirs));
        }
        // One Value whose kind is written twice: Structs merge, lists append.
        let twice = |a: prost_types::Value, b: prost_types::Value| {
            let mut inner = a.encode_to_vec();
            inner.extend(b.encode_to_vec());
            let mut entry = Vec::new();
            encoding::string::encode(ENTRY_KEY, &"k".to_owned(), &mut entry);
            encode_key(ENTRY_VALUE, WireType::LengthDelimited, &mut entry);
            encode_varint(inner.len() as u64, &mut entry);
            entry.extend(inner);
            let mut bytes = Vec::new();
            encode_key(STRUCT_FIELDS, WireType::LengthDelimited, &mut bytes);
            encode_varint(entry.len() as u64, &mut bytes);
            bytes.extend(entry);
            bytes
        };
        let list = |v: Vec<prost_types::Value>| {
            value(Kind::ListValue(prost_types::ListValue { values: v }))
        };
        for bytes in [
            twice(
                value(Kind::StructValue(one("x", value(Kind::BoolValue(true))))),
                value(Kind::StructValue(one("y", value(Kind::BoolValue(false))))),
            ),
            twice(
                list(vec![value(Kind::NumberValue(1.0))]),
                list(vec![value(Kind::NumberValue(2.5))]),
            ),
            twice(
                value(Kind::NumberValue(1.0)),
                value(Kind::StructValue(one("z", list(vec![])))),
            ),
            twice(list(vec![]), value(Kind::NullValue(3))),
        ] {
            let theirs = prost_types::Struct::decode(bytes.as_slice()).unwrap();
            let ours = JsonStruct::decode(bytes.as_slice()).unwrap();
            assert_eq!(ours.0, struct_to_json(theirs));
        }
    }

    #[test]
    fn nesting_past_prosts_limit_is_refused_alike() {
        let mut v = json!(1);
        for _ in 0..60 {
            v = json!({ "a": v });
        }
        let Value::Object(map) = v else {
            unreachable!()
        };
        let bytes = json_to_struct(&map).encode_to_vec();
        assert!(prost_types::Struct::decode(bytes.as_slice()).is_err());
        assert!(JsonStruct::decode(bytes.as_slice()).is_err());
        let mut v = json!(1);
        for _ in 0..30 {
            v = json!({ "a": v });
        }
        let Value::Object(map) = v else {
            unreachable!()
        };
        let bytes = json_to_struct(&map).encode_to_vec();
        let theirs = struct_to_json(prost_types::Struct::decode(bytes.as_slice()).unwrap());
        assert_eq!(JsonStruct::decode(bytes.as_slice()).unwrap().0, theirs);
    }
}
