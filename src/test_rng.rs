//! A seeded pseudo-random sequence for unit tests that apply random operations and compare the
//! result with a simple model (the same seed gives the same run, so a failure can be replayed).

/// Returns `rand(n)`: the next number in `0..n` of the sequence started by `seed` (a 64-bit
/// LCG; its high bits are used).
pub fn lcg(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    }
}
