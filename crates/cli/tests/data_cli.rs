//! `reel data synth` and `reel data validate` end to end.

use std::path::Path;
use std::process::{Command, Output};

fn reel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reel"))
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn synth(out: &Path) -> Output {
    reel(&[
        "data",
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--videos",
        "4",
        "--frames",
        "10",
        "--size",
        "48x40",
        "--seed",
        "5",
        "--held-out",
        "0",
    ])
}

#[test]
fn synth_is_reproducible_and_validates() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [a.path(), b.path()] {
        let out = synth(d);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("4 train + 0 held-out"),
            "{}",
            text(&out.stdout)
        );
    }
    let train = a.path().join("train.jsonl");
    assert_eq!(
        std::fs::read(&train).unwrap(),
        std::fs::read(b.path().join("train.jsonl")).unwrap()
    );
    let out = reel(&["data", "validate", "--full", train.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("all 4 records are good"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn validate_reports_every_bad_record_and_fails() {
    let d = tempfile::tempdir().unwrap();
    let out = synth(d.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let train = std::fs::read_to_string(d.path().join("train.jsonl")).unwrap();
    let good: serde_json::Value = serde_json::from_str(train.lines().next().unwrap()).unwrap();
    let video = good["videos"][0].as_str().unwrap().to_string();
    // A damaged copy of the video: header intact, frames cut off.
    let bytes = std::fs::read(d.path().join(&video)).unwrap();
    std::fs::write(d.path().join("cut.avi"), &bytes[..bytes.len() * 2 / 3]).unwrap();

    let with = |k: &str, v: serde_json::Value, id: &str| {
        let mut r = good.clone();
        r[k] = v;
        r["problem_id"] = id.into();
        r.to_string()
    };
    let lines = [
        good.to_string(),
        with("answer", "B".into(), "bad-answer"),
        with(
            "videos",
            serde_json::json!(["videos/missing.avi"]),
            "no-video",
        ),
        with("videos", serde_json::json!("cut.avi"), "cut-video"),
        "{\"problem_id\": 3".to_string(),
    ];
    let file = d.path().join("mixed.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = reel(&["data", "validate", file.to_str().unwrap()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "a bad file must fail: {stdout}");
    let f = file.display().to_string();
    assert!(
        stdout.contains(&format!("{f}:2: `answer` must be `<answer>X</answer>`")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{f}:3: video ")) && stdout.contains("missing.avi: not found"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{f}:4: video ")) && stdout.contains("cut.avi"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{f}:5: not valid JSON")),
        "{stdout}"
    );
    assert!(!stdout.contains(&format!("{f}:1:")), "{stdout}");
    assert!(stderr.contains("4 bad record(s), 1 good"), "{stderr}");

    // Without decoding, the cut video passes (it exists) and the rest is still reported.
    let out = reel(&["data", "validate", "--no-decode", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("3 bad record(s), 2 good"),
        "{}",
        text(&out.stderr)
    );

    // A missing file is an error naming it.
    let out = reel(&["data", "validate", "/nonexistent/x.jsonl"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent/x.jsonl"));
}
