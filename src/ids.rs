//! Random identifiers and seeds (job, key and request ids, API key tokens, the seed of a
//! request without one): the one source of randomness outside the models, whose every draw
//! comes from a job's own seed. OS randomness through `getrandom`.
use std::hash::{BuildHasher, Hasher};

/// `n` random bytes from the OS.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, getrandom::Error> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf)?;
    Ok(buf)
}

/// `n` random bytes as `2n` lowercase hex digits.
pub fn random_hex(n: usize) -> Result<String, getrandom::Error> {
    Ok(hex(&random_bytes(n)?))
}

/// A random u64 from the OS; should the OS source fail, a SipHash of a counter and the clock
/// under std's per-process random keys (good enough for a request id or a default seed, which
/// need to differ, not to be secret).
pub fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.finish()
    })
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_of_the_asked_length_and_differ() {
        let (a, b) = (random_hex(12).unwrap(), random_hex(12).unwrap());
        assert_eq!(a.len(), 24);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        assert_ne!(random_u64(), random_u64());
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
