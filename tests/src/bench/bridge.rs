//! The Mosquitto bridge baseline of scenario `sync`: the usual way to move MQTT data
//! from an edge to a centre, moving the same backlog.
//!
//! An edge Mosquitto (persistence on) has a bridge `topic devices/# out 1` with
//! `cleansession false` to a central Mosquitto. The central broker first gets a
//! persistent QoS 1 subscriber session (`devices/#`) and is stopped (it saves the
//! session). N records are published to the edge while the centre is down, so they
//! queue in the bridge's session. Then the centre starts again, the counting subscriber
//! reconnects, the bridge reconnects and drains. Timed from the first record the central
//! subscriber receives to the last, like the gateway's drain (first record in the hub's
//! sink to the last).
//!
//! Note what the bridge does not do: Mosquitto's persistence writes its database at
//! `autosave_interval` and shutdown, not per message, so neither broker fsyncs a record
//! before acknowledging it. The gateway and the hub both do.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use voither_tests::procs::{free_tcp_port, wait_for};
use voither_tests::sim::{self, SimProgress};

use super::pipeline::{sim_config, subscriber, SubCount};
use super::{mosquitto_exe, poll_until, Opts};

/// A Mosquitto process killed when dropped.
#[derive(Debug)]
struct Broker {
    child: Child,
}

impl Broker {
    fn start(dir: &Path, port: u16, extra: &str) -> Broker {
        std::fs::create_dir_all(dir).expect("broker dir");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 max_inflight_messages 1000\nmax_queued_messages 0\nmax_queued_bytes 0\n\
                 message_size_limit 1048576\nlog_dest stdout\nlog_type error\nlog_type warning\n{extra}",
                dir.display()
            ),
        )
        .expect("mosquitto.conf");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("mosquitto.log")).expect("log");
        let child = Command::new(mosquitto_exe())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("mosquitto starts");
        let up = wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        assert!(up.is_some(), "mosquitto did not listen on {port}");
        Broker { child }
    }

    /// SIGTERM (Mosquitto saves its persistence file) and wait.
    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the bridge run measured.
#[derive(Debug, Clone, Copy)]
pub struct BridgeResult {
    /// Records that reached the central subscriber.
    pub records: u64,
    /// First → last record at the central subscriber, seconds.
    pub first_last_secs: f64,
    /// Central broker started → last record, seconds (includes the bridge's reconnect).
    pub from_start_secs: f64,
}

/// Moves `records` through the bridge; `None` if they did not all arrive in time.
pub fn run(o: &Opts, rt: &tokio::runtime::Runtime, records: u64) -> Option<BridgeResult> {
    let _ = o;
    let dir = super::tempdir("voither-bench-bridge-");
    let (central_dir, edge_dir): (PathBuf, PathBuf) = (dir.path().join("central"), dir.path().join("edge"));
    let (cport, eport) = (free_tcp_port(), free_tcp_port());
    let sub_id = "bench-central-subscriber";

    // A persistent subscriber session on the central broker, saved when it stops.
    let central = Broker::start(&central_dir, cport, "");
    let counts = Arc::new(SubCount::default());
    let (client, task) = rt.block_on(subscriber(cport, sub_id, false, counts.clone()));
    rt.block_on(async {
        let _ = client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    task.abort();
    central.stop();

    let bridge = format!(
        "\nconnection central\naddress 127.0.0.1:{cport}\ntopic devices/# out 1\ncleansession false\n\
         clientid bench-bridge\nrestart_timeout 1\nnotifications false\n"
    );
    let edge = Broker::start(&edge_dir, eport, &bridge);
    eprintln!("[sync] bridge: publishing {records} records to the edge Mosquitto (centre down) …");
    let rep = rt.block_on(sim::run(sim_config(eport, records, "bench-bridge-pub"), Arc::new(SimProgress::default())));
    let n = rep.total_acked();

    eprintln!("[sync] bridge: centre up, draining …");
    let started = Instant::now();
    let central = Broker::start(&central_dir, cport, "");
    let counts = Arc::new(SubCount::default());
    let (client, task) = rt.block_on(subscriber(cport, sub_id, false, counts.clone()));
    let done = poll_until(Duration::from_secs(900), Duration::from_millis(5), || counts.n.load(Ordering::Relaxed) >= n);
    let got = counts.n.load(Ordering::Relaxed);
    rt.block_on(async {
        let _ = client.disconnect().await;
    });
    task.abort();
    drop(edge);
    drop(central);
    let done = done.or_else(|| {
        eprintln!("[sync] bridge: only {got} of {n} records arrived");
        None
    })?;
    let first = counts.first.lock().expect("first").unwrap_or(started);
    let last = counts.last.lock().expect("last").unwrap_or(done);
    Some(BridgeResult {
        records: n,
        first_last_secs: (last - first).as_secs_f64(),
        from_start_secs: (last - started).as_secs_f64(),
    })
}
