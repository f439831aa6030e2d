//! A date-time as the tables hold it in text, as sqlx writes a
//! `DateTime<Utc>` in SQLite (`to_rfc3339_opts(SecondsFormat::AutoSi,
//! false)`), so rows the fold writes and rows sqlx wrote read back alike.
//! (A packet id's text is `PacketId::text`.)
//!
//! Invariant: returns exactly chrono's text (tests hold them alike). It is
//! written straight because the fold writes three times a row: chrono's
//! formatter took ~745 instructions a time, 4.5 % of the fold thread's
//! instructions (callgrind, twenty-first session). Years outside 0-9999
//! and leap seconds go to chrono.
use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};

/// A time's text, held where it was made: the fold binds three a row, and
/// SQLite copies what it is given, so a `String` each was an allocation
/// and a free for nothing.
pub enum TimeText {
    /// The text's bytes, the first `len` of them.
    Short([u8; 35], u8),
    /// chrono's, for the times it alone writes.
    Long(String),
}

impl TimeText {
    pub fn as_str(&self) -> &str {
        match self {
            TimeText::Short(text, len) => {
                std::str::from_utf8(&text[..usize::from(*len)]).expect("ASCII")
            }
            TimeText::Long(text) => text,
        }
    }
}

impl rusqlite::ToSql for TimeText {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::from(self.as_str()))
    }
}

pub fn text_time(at: DateTime<Utc>) -> TimeText {
    let year = at.year();
    let nanos = at.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return TimeText::Long(at.to_rfc3339_opts(SecondsFormat::AutoSi, false));
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
    text.copy_within(29..35, 19 + fraction);
    TimeText::Short(text, (25 + fraction) as u8)
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
            assert_eq!(text_time(at).as_str(), chrono_s(at), "{secs}.{nanos:09}");
        }
    }

    #[test]
    fn a_leap_second_is_chrono_s() {
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        assert_eq!(text_time(leap).as_str(), chrono_s(leap));
    }

    proptest! {
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
            let text = text_time(at);
            prop_assert_eq!(text.as_str(), chrono_s(at));
        }
    }
}
