//! Under systemd with `WatchdogSec=`, the hub sends `READY=1` and then `WATCHDOG=1` at
//! half the interval while its accept loop, admin server and sink are alive (the
//! "not alive, no ping" side is the unit test in `hub/src/watchdog.rs`).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use voither_tests::procs::{next_notify, wait_for, Hub, Pki};

#[test]
fn hub_pings_the_systemd_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let mut hub = Hub::start(&dir.path().join("hub"), &pki, "hub-wd");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    hub.stop();
    hub.env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        // WatchdogSec=0.5: a ping every 250 ms.
        ("WATCHDOG_USEC".into(), "500000".into()),
    ];
    hub.restart();
    let ready =
        wait_for(Duration::from_secs(10), || next_notify(&sock, Duration::from_secs(1)).filter(|m| m == "READY=1"));
    assert!(ready.is_some(), "READY=1 once the sink is open and the sockets bound\n{}", hub.log_tail());
    for i in 0..6 {
        let m = next_notify(&sock, Duration::from_secs(2));
        assert_eq!(m.as_deref(), Some("WATCHDOG=1"), "ping {i}\n{}", hub.log_tail());
    }

    // A WATCHDOG_PID of another process means the variables are not meant for the hub.
    hub.stop();
    while next_notify(&sock, Duration::from_millis(100)).is_some() {}
    hub.env.push(("WATCHDOG_PID".into(), "1".into()));
    hub.restart();
    let ready =
        wait_for(Duration::from_secs(10), || next_notify(&sock, Duration::from_secs(1)).filter(|m| m == "READY=1"));
    assert!(ready.is_some(), "READY=1\n{}", hub.log_tail());
    assert_eq!(next_notify(&sock, Duration::from_secs(1)), None, "no pings for another process's watchdog");
}
