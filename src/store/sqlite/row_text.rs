//! Values as the tables hold them in text: a packet id hyphenated and in
//! lowercase, and a date-time as sqlx writes a `DateTime<Utc>` in SQLite
//! (`to_rfc3339_opts(SecondsFormat::AutoSi, false)`), so rows the fold
//! writes and rows sqlx wrote read back alike.
//!
//! Invariant: each returns exactly the text of the general formatter it
//! stands for (tests hold them alike). They are written straight because
//! the fold writes an id and three times a row: through `Display` an id
//! took ~700 instructions, and chrono's formatter ~745 a time, together
//! ~6 % of the fold thread's instructions (callgrind, twenty-first
//! session). Years outside 0-9999 and leap seconds go to chrono.
use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};

use crate::domain::PacketId;

pub fn id_text(id: PacketId) -> String {
    let mut buffer = uuid::Uuid::encode_buffer();
    id.as_uuid()
        .hyphenated()
        .encode_lower(&mut buffer)
        .to_owned()
}

pub fn text_time(at: DateTime<Utc>) -> String {
    let year = at.year();
    let nanos = at.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return at.to_rfc3339_opts(SecondsFormat::AutoSi, false);
    }
    let mut text = *b"0000-00-00T00:00:00.000000000+00:00";
    put_digits(&mut text[0..4], year as u32);
    put_digits(&mut text[5..7], at.month());
    put_digits(&mut text[8..10], at.day());
    put_digits(&mut text[11..13], at.hour());
    put_digits(&mut text[14..16], at.minute());
    put_digits(&mut text[17..19], at.second());
    // AutoSi: as few of 0, 3, 6 or 9 digits as say the fraction exactly.
    let fraction = if nanos == 0 {
        0
    } else if nanos.is_multiple_of(1_000_000) {
        put_digits(&mut text[20..23], nanos / 1_000_000);
        4
    } else if nanos.is_multiple_of(1_000) {
        put_digits(&mut text[20..26], nanos / 1_000);
        7
    } else {
        put_digits(&mut text[20..29], nanos);
        10
    };
    let mut out = String::with_capacity(25 + fraction);
    out.push_str(std::str::from_utf8(&text[..19 + fraction]).expect("ASCII"));
    out.push_str("+00:00");
    out
}

/// `value` in the slot's decimal digits, zero-padded (it fits).
fn put_digits(slot: &mut [u8], mut value: u32) {
    for digit in slot.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    fn chrono_s(at: DateTime<Utc>) -> String {
        at.to_rfc3339_opts(SecondsFormat::AutoSi, false)
    }

    #[test]
    fn each_width_of_fraction_and_the_edges() {
        for (secs, nanos) in [
            (0, 0),
            (1_700_000_000, 0),
            (1_700_000_000, 120_000_000),
            (1_700_000_000, 123_456_000),
            (1_700_000_000, 123_456_789),
            (1_700_000_000, 1),
            (253_402_300_799, 999_999_999), // 9999-12-31T23:59:59.999999999
            (-62_167_219_200, 0),           // 0000-01-01
            (-62_167_219_201, 5_000_000),   // year -1: chrono's
            (253_402_300_800, 0),           // year 10000: chrono's
        ] {
            let at = Utc.timestamp_opt(secs, nanos).unwrap();
            assert_eq!(text_time(at), chrono_s(at), "{secs}.{nanos:09}");
        }
    }

    #[test]
    fn a_leap_second_is_chrono_s() {
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        assert_eq!(text_time(leap), chrono_s(leap));
    }

    proptest! {
        #[test]
        fn an_id_is_written_as_display_writes_it(id in any::<u128>()) {
            let id = PacketId::from(uuid::Uuid::from_u128(id));
            prop_assert_eq!(id_text(id), id.as_uuid().hyphenated().to_string());
        }

        #[test]
        fn any_time_is_written_as_chrono_writes_it(
            secs in prop_oneof![
                -62_167_219_200i64..253_402_300_800,
                -100_000_000_000i64..400_000_000_000,
            ],
            nanos in prop_oneof![
                Just(0u32),
                (0u32..1_000).prop_map(|ms| ms * 1_000_000),
                (0u32..1_000_000).prop_map(|us| us * 1_000),
                0u32..1_000_000_000,
            ],
        ) {
            let at = Utc.timestamp_opt(secs, nanos).unwrap();
            prop_assert_eq!(text_time(at), chrono_s(at));
        }
    }
}
