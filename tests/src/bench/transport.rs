//! The transport limit: a bare quinn connection (lab PKI, quinn's default transport
//! settings) moving bytes on one bidirectional stream, client and server in this
//! process, or the server in a second process (`voither-bench --quinn-server`) as
//! gateway and hub are. The server counts what it read and answers with the count once
//! the client finishes the stream, so the time covers delivery, not just the client's
//! writes. With the server in a second process, each side's CPU time is measured too:
//! what the transport alone costs per record, beside what gateway and hub spend.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Write size of the client.
const CHUNK: usize = 64 * 1024;

/// A bare QUIC server from the lab PKI; returns its endpoint (bound on loopback).
pub fn server(pki: &Path) -> quinn::Endpoint {
    voither_tests::raw::server(pki)
}

/// Serves one bulk transfer on `ep`: reads one stream to its end, answers with the
/// number of bytes read.
pub async fn serve_one(ep: quinn::Endpoint) {
    let Some(incoming) = ep.accept().await else { return };
    let Ok(conn) = incoming.await else { return };
    let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    while let Ok(Some(k)) = recv.read(&mut buf).await {
        n += k as u64;
    }
    let _ = send.write_all(&n.to_be_bytes()).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
}

/// Sends `total` bytes (or until `limit` passes) to the server at `addr` on one stream.
/// Returns the bytes the server read, and the time from opening the stream to the
/// server's answer.
pub async fn bulk(pki: &Path, addr: SocketAddr, total: u64, limit: Duration) -> (u64, Duration) {
    let ep = voither_tests::raw::endpoint(&pki.join("ca.pem"), None);
    let conn = ep.connect(addr, "voither-hub").expect("connect").await.expect("QUIC handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let buf = vec![0xa5u8; CHUNK];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < total && t0.elapsed() < limit {
        let k = (total - sent).min(CHUNK as u64) as usize;
        send.write_all(&buf[..k]).await.expect("write");
        sent += k as u64;
    }
    send.finish().expect("finish");
    let mut ans = [0u8; 8];
    recv.read_exact(&mut ans).await.expect("the server's count");
    let elapsed = t0.elapsed();
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    (u64::from_be_bytes(ans), elapsed)
}

/// Serves one transfer as `voither-bench --quinn-server`: prints the address, serves,
/// then prints `cpu <seconds>`, the CPU time this process used.
pub async fn serve_child(pki: &Path) {
    let server = server(pki);
    println!("{}", server.local_addr().expect("addr"));
    serve_one(server).await;
    println!("cpu {}", super::sample(std::process::id()).unwrap_or_default().cpu_s);
}

/// What [`bulk_to_child`] measured.
#[derive(Debug, Clone, Copy)]
pub struct ChildBulk {
    /// Bytes the server read.
    pub bytes: u64,
    /// From opening the stream to the server's answer.
    pub elapsed: Duration,
    /// CPU time of this process (the client) during the transfer, seconds.
    pub client_cpu_s: f64,
    /// CPU time of the server process over its whole life, seconds.
    pub server_cpu_s: f64,
}

/// [`bulk`] to a server in a child process (this executable with `--quinn-server`),
/// which serves the one transfer and exits.
pub async fn bulk_to_child(pki: &Path, total: u64) -> ChildBulk {
    let exe = std::env::current_exe().expect("the bench's own path");
    let mut child = Command::new(exe)
        .arg("--quinn-server")
        .arg(pki)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the quinn server process starts");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the quinn server prints its address");
    let addr: SocketAddr = line.trim().parse().unwrap_or_else(|_| panic!("the quinn server printed {line:?}"));
    let cpu0 = super::sample(std::process::id()).unwrap_or_default().cpu_s;
    let (bytes, elapsed) = bulk(pki, addr, total, Duration::from_secs(600)).await;
    let client_cpu_s = super::sample(std::process::id()).unwrap_or_default().cpu_s - cpu0;
    line.clear();
    out.read_line(&mut line).expect("the quinn server prints its CPU time");
    let server_cpu_s = line
        .strip_prefix("cpu ")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("the quinn server printed {line:?}, not its CPU time"));
    let status = child.wait().expect("the quinn server process ends");
    assert!(status.success(), "the quinn server process failed: {status}");
    ChildBulk { bytes, elapsed, client_cpu_s, server_cpu_s }
}
