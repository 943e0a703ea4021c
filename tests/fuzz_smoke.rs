//! The fuzz targets' short run for CI: the committed seeds plus a few hundred thousand
//! mutations of them, through the same entry points as `fuzz/` (`rollcall::fuzz`). The long
//! runs use cargo-fuzz (see fuzz/README.md).

use std::path::Path;

fn seeds(dir: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(dir);
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v.sort();
    v
}

/// Deterministic mutations: bit flips, byte sets, truncations, splices, insertions.
fn mutate(seed: &[u8], rng: &mut u64, pool: &[Vec<u8>]) -> Vec<u8> {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let mut v = seed.to_vec();
    for _ in 0..1 + next() % 4 {
        let r = next();
        match r % 6 {
            0 if !v.is_empty() => {
                let i = (next() as usize) % v.len();
                v[i] ^= 1 << ((r >> 8) % 8);
            }
            1 if !v.is_empty() => {
                let i = (next() as usize) % v.len();
                v[i] = [0, 0xff, 0xc0, 0x3f, 0x29, 1][(r >> 8) as usize % 6];
            }
            2 if !v.is_empty() => v.truncate((next() as usize) % v.len()),
            3 => {
                let other = &pool[(next() as usize) % pool.len()];
                let at = if v.is_empty() {
                    0
                } else {
                    (next() as usize) % v.len()
                };
                let from = if other.is_empty() {
                    0
                } else {
                    (next() as usize) % other.len()
                };
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            4 => {
                let at = if v.is_empty() {
                    0
                } else {
                    (next() as usize) % v.len()
                };
                v.insert(at, (r >> 16) as u8);
            }
            _ => v.extend_from_slice(&(r as u32).to_le_bytes()),
        }
    }
    v
}

fn run(dir: &str, iterations: usize, target: fn(&[u8])) -> usize {
    let pool = seeds(dir);
    let mut rng = 0x9E3779B97F4A7C15u64;
    for s in &pool {
        target(s);
    }
    for i in 0..iterations {
        let input = mutate(&pool[i % pool.len()], &mut rng, &pool);
        target(&input);
    }
    pool.len() + iterations
}

#[test]
fn dns_query_path_survives_mutated_queries() {
    use std::sync::atomic::Ordering;
    let before = rollcall::fuzz::DNS_ANSWERS_WITH_RECORDS.load(Ordering::Relaxed);
    let n = run("dns_query", 200_000, rollcall::fuzz::dns_query);
    let answered = rollcall::fuzz::DNS_ANSWERS_WITH_RECORDS.load(Ordering::Relaxed) - before;
    eprintln!("dns_query: {n} inputs, {answered} answers with records");
    // The mutations must reach past the header checks into real lookups: at least 1 % of the
    // inputs get records back (NOERROR with answers), checked against hickory's decoder.
    assert!(
        answered as usize >= n / 100,
        "only {answered} of {n} mutated queries were answered with records"
    );
}

#[test]
fn register_body_parser_survives_mutated_bodies() {
    let n = run("register_body", 100_000, rollcall::fuzz::register_body);
    eprintln!("register_body: {n} inputs");
}

#[test]
fn journal_replay_survives_mutated_logs() {
    let n = run("journal_replay", 50_000, rollcall::fuzz::journal_replay);
    eprintln!("journal_replay: {n} inputs");
}
