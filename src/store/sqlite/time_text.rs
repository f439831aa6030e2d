//! A date-time as the SQLite tables hold it: the text sqlx writes
//! (`to_rfc3339_opts(SecondsFormat::AutoSi, false)`), e.g.
//! `2026-12-04T22:10:35.123456+00:00`.
//!
//! Invariant: [`text_time`] returns exactly chrono's text for every
//! date-time (a property test holds it to that); rows written here and by
//! sqlx compare and sort alike. It is written by hand for the fold, which
//! formats two or three per packet: through chrono's formatting machinery
//! that was ~0.3 µs each.
use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};

pub fn text_time(at: DateTime<Utc>) -> String {
    let year = at.year();
    let nanos = at.nanosecond();
    // Years chrono writes with a sign, and leap seconds: chrono's own.
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return at.to_rfc3339_opts(SecondsFormat::AutoSi, false);
    }
    let mut out = String::with_capacity(35);
    push_digits(&mut out, year as u32, 4);
    for (sep, n) in [
        ('-', at.month()),
        ('-', at.day()),
        ('T', at.hour()),
        (':', at.minute()),
        (':', at.second()),
    ] {
        out.push(sep);
        push_digits(&mut out, n, 2);
    }
    // AutoSi: as few of 3, 6 or 9 digits as hold the fraction exactly.
    let (value, width) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    if width > 0 {
        out.push('.');
        push_digits(&mut out, value, width);
    }
    out.push_str("+00:00");
    out
}

/// `n`'s last `width` (at most 9) decimal digits, zero-padded.
fn push_digits(out: &mut String, mut n: u32, width: usize) {
    let mut buf = [b'0'; 9];
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend(buf[..width].iter().map(|&b| b as char));
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    fn chrono_text(at: DateTime<Utc>) -> String {
        at.to_rfc3339_opts(SecondsFormat::AutoSi, false)
    }

    #[test]
    fn the_fractions_chrono_shortens_are_shortened_alike() {
        let second = Utc.timestamp_opt(1_764_886_235, 0).unwrap();
        for nanos in [
            0,
            1,
            999,
            1_000,
            120_000,
            123_456_000,
            5_000_000,
            999_999_999,
        ] {
            let at = second + chrono::Duration::nanoseconds(nanos);
            assert_eq!(text_time(at), chrono_text(at), "{nanos} ns");
        }
    }

    #[test]
    fn the_ends_of_the_four_digit_years_and_beyond() {
        for (secs, nanos) in [
            (-62_167_219_200, 0),       // 0000-01-01
            (-62_167_219_201, 5),       // -0001-12-31, chrono's
            (253_402_300_799, 999_000), // 9999-12-31T23:59:59
            (253_402_300_800, 0),       // +10000, chrono's
            (0, 0),
        ] {
            let at = Utc.timestamp_opt(secs, nanos).unwrap();
            assert_eq!(text_time(at), chrono_text(at));
        }
        // A leap second (chrono keeps it as nanoseconds past 1e9).
        let leap = Utc
            .with_ymd_and_hms(2016, 12, 31, 23, 59, 59)
            .unwrap()
            .with_nanosecond(1_500_000_000)
            .unwrap();
        assert_eq!(text_time(leap), chrono_text(leap));
    }

    proptest! {
        #[test]
        fn every_time_reads_as_chronos(
            secs in -70_000_000_000i64..260_000_000_000,
            nanos in prop_oneof![
                Just(0u32),
                (0u32..1_000).prop_map(|ms| ms * 1_000_000),
                (0u32..1_000_000).prop_map(|us| us * 1_000),
                0u32..1_000_000_000,
            ],
        ) {
            let at = Utc.timestamp_opt(secs, nanos).unwrap();
            prop_assert_eq!(text_time(at), chrono_text(at));
        }
    }
}
