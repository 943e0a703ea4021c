//! The status page at `/`, rendered by a real headless Chromium (Debian's `chromium`): the DOM
//! after its scripts ran lists the roles and nodes, and a screenshot shows them.

#[path = "util/mod.rs"]
mod util;

use std::process::Command;

use util::*;

fn chromium(profile: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(require("chromium"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("running chromium")
}

#[test]
fn status_page_shows_roles_nodes_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), dir.path(), &[]);
    for (node, addr) in [("app1", "10.0.0.7"), ("app2", "10.0.0.8")] {
        let r = http()
            .put(format!("{}/v1/roles/appserver/nodes/{node}", server.api()))
            .body(format!(r#"{{"addr":"{addr}","port":8080,"ttl":300}}"#))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let url = format!("{}/", server.api());

    let out = chromium(
        &dir.path().join("profile1"),
        &["--timeout=5000", "--dump-dom", &url],
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "appserver (2)",
        "app1",
        "app2",
        "10.0.0.7",
        "8080",
        "renewals (ttl 300s)",
        // Pluralised: one role, not "1 roles".
        ">2 nodes in 1 role<",
        ">live<",
    ] {
        assert!(
            dom.contains(needle),
            "the rendered page lacks {needle:?}:\n{dom}"
        );
    }

    let shot = dir.path().join("page.png");
    let out = chromium(
        &dir.path().join("profile2"),
        &[
            "--timeout=5000",
            "--window-size=900,500",
            &format!("--screenshot={}", shot.display()),
            &url,
        ],
    );
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::fs::File::open(&shot).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (900, 500));
    // Text and table rules make a good share of the pixels non-white; a blank or error page
    // would not.
    let px = info.line_size / info.width as usize;
    let dark = buf[..info.buffer_size()]
        .chunks(px)
        .filter(|p| p[..3].iter().map(|&c| u32::from(c)).sum::<u32>() < 600)
        .count();
    let share = dark as f64 / (info.width * info.height) as f64;
    assert!(
        share > 0.005,
        "the screenshot is (nearly) blank: {share:.4} of pixels not white"
    );
}
