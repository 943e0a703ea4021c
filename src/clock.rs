//! Wall-clock helpers. Leases of a running server use the monotonic clock (tokio's `Instant`);
//! the wall clock is only used where a value must outlive the process (the journal, the index
//! start, the SOA serial).

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}
