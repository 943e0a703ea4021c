//! Puts the git revision into `rollcall --version` (and `rollcall_build_info`): ROLLCALL_VERSION
//! = "0.1.0 (abc1234)", or "0.1.0" outside a git checkout. ROLLCALL_GIT_REV in the build's
//! environment overrides what git says (for builds from a source tarball).

use std::process::Command;

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    let rev = std::env::var("ROLLCALL_GIT_REV").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=7", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .filter(|r| !r.is_empty())
    });
    let full = match &rev {
        Some(r) => format!("{version} ({r})"),
        None => version.to_string(),
    };
    println!("cargo:rustc-env=ROLLCALL_VERSION={full}");
    println!(
        "cargo:rustc-env=ROLLCALL_GIT_REV={}",
        rev.unwrap_or_default()
    );
    println!("cargo:rerun-if-env-changed=ROLLCALL_GIT_REV");
    // A new commit moves HEAD or the branch it points to.
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed=.git/{r}");
        }
    }
}
