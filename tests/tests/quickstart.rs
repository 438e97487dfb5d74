//! The README's first command: `voither-demo` runs the whole pipeline (PKI, hub,
//! gateway with embedded broker, simulated devices) and ends with a passing
//! exactly-once check.

use std::process::Command;

#[test]
fn demo_runs_the_whole_pipeline_and_checks_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(voither_tests::procs::bin("voither-demo"))
        .arg("--dir")
        .arg(dir.path().join("run"))
        .args(["--devices", "4", "--messages", "500"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("synced"), "live progress is printed:\n{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or("")
            .starts_with("OK: all 2000 messages from 4 devices reached the hub exactly once"),
        "{stdout}"
    );
}
