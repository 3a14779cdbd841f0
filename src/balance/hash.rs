//! A stable 64-bit hash for affinity keys and instance ids.
//!
//! Stable means the same on every host and every run: two sidecars that see
//! the same instances must send a key to the same instance, so neither
//! `std`'s randomly seeded hasher nor anything platform-dependent will do.
//! FNV-1a over the bytes, finished with murmur3's 64-bit mix so that keys
//! differing in one byte land far apart.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Hashes `bytes` with `seed` (different seeds give independent hashes).
#[inline]
pub fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET ^ seed.wrapping_mul(FNV_PRIME);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix(h)
}

/// murmur3's `fmix64`: a bijection that spreads every input bit.
#[inline]
pub fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The hash of an affinity key, as [`super::Context::key`] takes it.
pub fn key(bytes: &[u8]) -> u64 {
    hash(0, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_across_runs_and_hosts() {
        // Pinned: changing the function would move every sticky session.
        assert_eq!(
            key(b"room-42"),
            0x455a_25cc_2a01_68a9,
            "{:#x}",
            key(b"room-42")
        );
        assert_ne!(key(b"room-42"), key(b"room-43"));
        assert_ne!(hash(1, b"a"), hash(2, b"a"));
    }
}
