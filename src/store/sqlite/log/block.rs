//! One block of the record log: what one commit group writes, in one write.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "PRLB"
//!      4     8  lsn: where the block starts in the log (little-endian)
//!     12     4  len: payload bytes
//!     16     4  crc: CRC-32 of bytes 4..16 and of the payload
//!     20   len  payload
//!          pad  zeros up to a multiple of SECTOR
//! ```
//!
//! A block is valid only at the position its `lsn` names and only with its
//! checksum right, so a torn write (a crash in the middle of one), zeros, and
//! whatever an earlier use of a recycled segment file left behind all read
//! as the end of the log. Blocks start on sector boundaries and are padded
//! to one, so a block once acknowledged is never written again: the next
//! one starts on the next sector.
use std::fmt;

/// The unit of direct I/O on the disks this runs on (their logical block
/// size); every block starts and ends on one.
pub const SECTOR: usize = 512;

/// Bytes before the payload.
pub const HEADER: usize = 20;

const MAGIC: [u8; 4] = *b"PRLB";

/// The largest payload a block may carry: a commit group is at most
/// `BUCKET_MAX_COMMIT` writes of at most ~70 KiB each (a packet's strings
/// and raw_signals, or a mark's karma actions and error), far below this.
pub const MAX_PAYLOAD: usize = 256 << 20;

/// The whole block, header and padding, for a payload of `len` bytes.
pub fn size(len: usize) -> usize {
    (HEADER + len).div_ceil(SECTOR) * SECTOR
}

/// Writes the block for `payload` at `lsn` into `out`, which must hold
/// [`size`]`(payload.len())` bytes; the padding is zeroed.
pub fn encode(lsn: u64, payload: &[u8], out: &mut [u8]) {
    let total = size(payload.len());
    assert!(out.len() >= total, "block buffer too small");
    assert!(payload.len() <= MAX_PAYLOAD, "block payload too large");
    out[0..4].copy_from_slice(&MAGIC);
    out[4..12].copy_from_slice(&lsn.to_le_bytes());
    out[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = checksum(&out[4..16], payload);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out[HEADER..HEADER + payload.len()].copy_from_slice(payload);
    out[HEADER + payload.len()..total].fill(0);
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(header);
    crc.update(payload);
    crc.finalize()
}

/// Why bytes at a position are not a block (the log ends there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotABlock {
    /// Fewer bytes than a header, or than the payload it announces.
    Short,
    /// No magic: never written, zeros, or the middle of something else.
    NoMagic,
    /// A block of another position (an earlier use of a recycled file).
    Elsewhere { lsn: u64 },
    /// A length no block has.
    BadLength,
    /// The checksum does not match: a torn write.
    Torn,
}

impl fmt::Display for NotABlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short => f.write_str("short"),
            Self::NoMagic => f.write_str("no block header"),
            Self::Elsewhere { lsn } => write!(f, "a block of position {lsn}"),
            Self::BadLength => f.write_str("impossible length"),
            Self::Torn => f.write_str("checksum mismatch"),
        }
    }
}

/// The block at the start of `bytes`, if one is there for position `lsn`:
/// its payload, and the block's whole size.
pub fn decode(bytes: &[u8], lsn: u64) -> Result<(&[u8], usize), NotABlock> {
    if bytes.len() < HEADER {
        return Err(NotABlock::Short);
    }
    if bytes[0..4] != MAGIC {
        return Err(NotABlock::NoMagic);
    }
    let at = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    if at != lsn {
        return Err(NotABlock::Elsewhere { lsn: at });
    }
    let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(NotABlock::BadLength);
    }
    let total = size(len);
    if bytes.len() < HEADER + len {
        return Err(NotABlock::Short);
    }
    let payload = &bytes[HEADER..HEADER + len];
    let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    if checksum(&bytes[4..16], payload) != crc {
        return Err(NotABlock::Torn);
    }
    Ok((payload, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(lsn: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0xAA; size(payload.len())];
        encode(lsn, payload, &mut out);
        out
    }

    #[test]
    fn round_trips_at_its_own_position_only() {
        for len in [0, 1, 491, 492, 493, 5000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let bytes = block(4096, &payload);
            assert_eq!(bytes.len() % SECTOR, 0);
            assert!(bytes.len() >= HEADER + len);
            let (read, total) = decode(&bytes, 4096).unwrap();
            assert_eq!((read, total), (&payload[..], bytes.len()));
            assert_eq!(
                decode(&bytes, 4608),
                Err(NotABlock::Elsewhere { lsn: 4096 })
            );
            assert!(
                bytes[HEADER + len..].iter().all(|b| *b == 0),
                "padding zeroed"
            );
        }
    }

    #[test]
    fn a_torn_block_is_not_a_block() {
        let payload = vec![7u8; 2000];
        let whole = block(0, &payload);
        // Only the first sectors reached the disk; the rest is zeros.
        let mut torn = whole.clone();
        torn[SECTOR * 2..].fill(0);
        assert_eq!(decode(&torn, 0), Err(NotABlock::Torn));
        // Cut short: the payload the header announces is not there.
        assert_eq!(decode(&whole[..SECTOR], 0), Err(NotABlock::Short));
        // Any flipped bit.
        for at in [4, 12, 16, HEADER, HEADER + 1999] {
            let mut bad = whole.clone();
            bad[at] ^= 1;
            assert!(decode(&bad, 0).is_err(), "flip at {at}");
        }
        assert_eq!(decode(&[0u8; SECTOR], 0), Err(NotABlock::NoMagic));
    }
}
