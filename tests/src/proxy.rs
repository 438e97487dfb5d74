//! A userspace UDP fault proxy: put it between a QUIC client (gateway) and a QUIC
//! server (hub) on loopback to inject link faults — loss, delay, jitter (reordering),
//! duplication and partitions — that can be changed while traffic flows.
//!
//! ```text
//! client ──▶ proxy.addr() ──[up faults]──▶ per-client socket ──▶ upstream
//! client ◀── proxy.addr() ◀──[down faults]── per-client socket ◀── upstream
//! ```
//!
//! Each distinct client address gets its own upstream socket, so the server sees one
//! peer per client. Faults are set per direction ([`Direction::Up`] is client to
//! upstream, [`Direction::Down`] the way back) and drawn independently for every
//! datagram. Datagrams wait in a per-direction schedule ordered by due time, so a
//! delayed datagram never holds up others; jitter therefore reorders.
//!
//! Everything is bounded: at most [`MAX_CLIENTS`] client mappings and
//! [`MAX_QUEUED`] datagrams waiting per direction; anything beyond is dropped and
//! counted in [`DirectionStats::dropped`].

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

/// Most client mappings (distinct client addresses) held at once. Datagrams from a
/// further client are dropped unless a mapping idle for [`CLIENT_IDLE`] can be reused.
pub const MAX_CLIENTS: usize = 64;

/// Most datagrams waiting for delivery per direction; further ones are dropped.
pub const MAX_QUEUED: usize = 4096;

/// A client mapping without client traffic for this long is reused when the table is full.
pub const CLIENT_IDLE: Duration = Duration::from_secs(30);

/// Receive buffer size: larger than any UDP payload.
const MAX_DATAGRAM: usize = 65_536;

/// Shortest flap phase, so that zero durations cannot spin.
const MIN_PHASE: Duration = Duration::from_millis(1);

/// Which way a datagram travels through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a client to the upstream server.
    Up,
    /// From the upstream server back to a client.
    Down,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// Link faults for one direction. `Faults::default()` is a clean link.
///
/// Probabilities outside `0..=1` are clamped; NaN counts as 0.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    /// Probability of dropping a datagram.
    pub loss: f64,
    /// Fixed one-way delay added to every datagram.
    pub delay: Duration,
    /// Random extra one-way delay, uniform in `0..jitter`; reorders datagrams.
    pub jitter: Duration,
    /// Probability of delivering a datagram twice (each copy gets its own jitter).
    pub duplicate: f64,
    /// Drop everything, including datagrams already waiting for delivery: a partition.
    pub blackhole: bool,
}

/// Counters for one direction.
///
/// Once nothing is queued, `received + duplicated == forwarded + dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirectionStats {
    /// Datagrams that entered the proxy in this direction.
    pub received: u64,
    /// Datagrams (copies included) handed to the outgoing socket.
    pub forwarded: u64,
    /// Datagrams dropped: loss, blackhole, full queue or client table, send error.
    pub dropped: u64,
    /// Datagrams chosen to be sent twice.
    pub duplicated: u64,
    /// Datagrams waiting for their due time now.
    pub queued: u64,
}

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Client to upstream.
    pub up: DirectionStats,
    /// Upstream to client.
    pub down: DirectionStats,
    /// Client mappings held now.
    pub clients: u64,
    /// Datagrams dropped because the client table was full (also in `up.dropped`).
    pub rejected: u64,
}

impl Stats {
    /// The counters of one direction.
    pub fn direction(&self, dir: Direction) -> DirectionStats {
        match dir {
            Direction::Up => self.up,
            Direction::Down => self.down,
        }
    }
}

/// A datagram waiting for its due time.
struct Packet {
    due: Instant,
    seq: u64,
    data: Box<[u8]>,
    sock: Arc<UdpSocket>,
    dest: SocketAddr,
}

// Ordered so that `BinaryHeap` (a max-heap) pops the earliest due, then the first sent.
impl Ord for Packet {
    fn cmp(&self, other: &Self) -> Ordering {
        other.due.cmp(&self.due).then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Packet {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Packet {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Packet {}

/// State of one direction.
#[derive(Debug, Default)]
struct Lane {
    faults: Mutex<Faults>,
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    queued: AtomicUsize,
    seq: AtomicU64,
}

fn prob(p: f64) -> f64 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 1.0)
    }
}

fn jitter(rng: &mut impl Rng, max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(rng.random_range(0..nanos))
    }
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn faults(&self) -> Faults {
        *self.lock()
    }

    fn drop_one(&self) {
        self.dropped.fetch_add(1, Relaxed);
    }

    /// Applies this direction's faults to a datagram that just arrived and queues the
    /// copies that survive.
    fn admit(&self, data: &[u8], sock: &Arc<UdpSocket>, dest: SocketAddr, tx: &mpsc::UnboundedSender<Packet>) {
        self.received.fetch_add(1, Relaxed);
        let f = self.faults();
        let now = Instant::now();
        let mut dues = [None, None];
        {
            // `ThreadRng` is not `Send`: keep it in this block, away from any await.
            let mut rng = rand::rng();
            if f.blackhole || rng.random_bool(prob(f.loss)) {
                self.drop_one();
                return;
            }
            dues[0] = Some(now + f.delay + jitter(&mut rng, f.jitter));
            if rng.random_bool(prob(f.duplicate)) {
                self.duplicated.fetch_add(1, Relaxed);
                dues[1] = Some(now + f.delay + jitter(&mut rng, f.jitter));
            }
        }
        for due in dues.into_iter().flatten() {
            if self.queued.fetch_add(1, Relaxed) >= MAX_QUEUED {
                self.queued.fetch_sub(1, Relaxed);
                self.drop_one();
                continue;
            }
            let seq = self.seq.fetch_add(1, Relaxed);
            let packet = Packet { due, seq, data: data.into(), sock: Arc::clone(sock), dest };
            if tx.send(packet).is_err() {
                self.queued.fetch_sub(1, Relaxed);
                self.drop_one();
            }
        }
    }

    /// Sends a datagram whose time has come, unless the link is cut now.
    async fn depart(&self, p: Packet) {
        self.queued.fetch_sub(1, Relaxed);
        if self.faults().blackhole {
            self.drop_one();
            return;
        }
        match p.sock.send_to(&p.data, p.dest).await {
            Ok(_) => self.forwarded.fetch_add(1, Relaxed),
            Err(_) => self.dropped.fetch_add(1, Relaxed),
        };
    }

    fn stats(&self) -> DirectionStats {
        DirectionStats {
            received: self.received.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            duplicated: self.duplicated.load(Relaxed),
            queued: self.queued.load(Relaxed) as u64,
        }
    }
}

/// State shared by the proxy's tasks and every [`FaultControl`].
#[derive(Debug, Default)]
struct Shared {
    lanes: [Lane; 2],
    clients: AtomicUsize,
    rejected: AtomicU64,
}

impl Shared {
    fn lane(&self, dir: Direction) -> &Lane {
        &self.lanes[dir.index()]
    }
}

/// Delivers one direction's datagrams in order of due time.
async fn schedule(shared: Arc<Shared>, dir: Direction, mut rx: mpsc::UnboundedReceiver<Packet>) {
    let lane = shared.lane(dir);
    let mut heap = BinaryHeap::new();
    let mut open = true;
    loop {
        while heap.peek().is_some_and(|p: &Packet| p.due <= Instant::now()) {
            if let Some(p) = heap.pop() {
                lane.depart(p).await;
            }
        }
        let next = heap.peek().map(|p| p.due);
        if next.is_none() && !open {
            return;
        }
        tokio::select! {
            m = rx.recv(), if open => match m {
                Some(p) => {
                    heap.push(p);
                    while let Ok(p) = rx.try_recv() {
                        heap.push(p);
                    }
                }
                None => open = false,
            },
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
        }
    }
}

/// Carries upstream's replies for one client into the down direction.
async fn read_upstream(
    shared: Arc<Shared>,
    sock: Arc<UdpSocket>,
    upstream: SocketAddr,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    tx: mpsc::UnboundedSender<Packet>,
) {
    let lane = shared.lane(Direction::Down);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // Errors (e.g. an ICMP error reported on some platforms) are not fatal for UDP.
        if let Ok((n, from)) = sock.recv_from(&mut buf).await {
            // Only the upstream server may talk to a client through its mapping.
            if from == upstream {
                lane.admit(&buf[..n], &front, client, &tx);
            }
        }
    }
}

/// The local address for sockets that talk to `upstream`.
fn local_for(upstream: SocketAddr) -> SocketAddr {
    let ip: IpAddr = match upstream.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(ip) if ip.is_loopback() => Ipv6Addr::LOCALHOST.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, 0)
}

/// One client's mapping.
struct Client {
    sock: Arc<UdpSocket>,
    reader: AbortHandle,
    last: Instant,
}

/// Reads clients' datagrams, keeps the client table, feeds the up direction.
struct Front {
    shared: Arc<Shared>,
    sock: Arc<UdpSocket>,
    upstream: SocketAddr,
    up: mpsc::UnboundedSender<Packet>,
    down: mpsc::UnboundedSender<Packet>,
    clients: HashMap<SocketAddr, Client>,
    // Dropping the set (when this task ends or is aborted) aborts every reader.
    readers: JoinSet<()>,
}

impl Front {
    async fn run(mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let Ok((n, from)) = self.sock.recv_from(&mut buf).await else {
                continue;
            };
            while self.readers.try_join_next().is_some() {}
            let now = Instant::now();
            let sock = match self.clients.get_mut(&from) {
                Some(c) => {
                    c.last = now;
                    Arc::clone(&c.sock)
                }
                None => match self.open(from, now).await {
                    Some(sock) => sock,
                    None => {
                        let lane = self.shared.lane(Direction::Up);
                        lane.received.fetch_add(1, Relaxed);
                        lane.drop_one();
                        continue;
                    }
                },
            };
            self.shared.lane(Direction::Up).admit(&buf[..n], &sock, self.upstream, &self.up);
        }
    }

    /// Makes a mapping for a new client, or `None` if the table is full or no socket.
    async fn open(&mut self, client: SocketAddr, now: Instant) -> Option<Arc<UdpSocket>> {
        if self.clients.len() >= MAX_CLIENTS {
            let idlest = self.clients.iter().min_by_key(|(_, c)| c.last).map(|(a, c)| (*a, c.last));
            match idlest {
                Some((addr, last)) if now.duration_since(last) >= CLIENT_IDLE => {
                    if let Some(c) = self.clients.remove(&addr) {
                        c.reader.abort();
                    }
                }
                _ => {
                    self.shared.rejected.fetch_add(1, Relaxed);
                    return None;
                }
            }
        }
        let sock = Arc::new(UdpSocket::bind(local_for(self.upstream)).await.ok()?);
        let reader = self.readers.spawn(read_upstream(
            Arc::clone(&self.shared),
            Arc::clone(&sock),
            self.upstream,
            Arc::clone(&self.sock),
            client,
            self.down.clone(),
        ));
        self.clients.insert(client, Client { sock: Arc::clone(&sock), reader, last: now });
        self.shared.clients.store(self.clients.len(), Relaxed);
        Some(sock)
    }
}

/// A running fault proxy. Dropping it stops it (see [`FaultProxy::stop`]).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    control: FaultControl,
    tasks: Vec<JoinHandle<()>>,
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and starts forwarding to `upstream` over a clean link.
    /// Must be called inside a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let sock = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let addr = sock.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (up, up_rx) = mpsc::unbounded_channel();
        let (down, down_rx) = mpsc::unbounded_channel();
        let front = Front {
            shared: Arc::clone(&shared),
            sock,
            upstream,
            up,
            down,
            clients: HashMap::new(),
            readers: JoinSet::new(),
        };
        let tasks = vec![
            tokio::spawn(front.run()),
            tokio::spawn(schedule(Arc::clone(&shared), Direction::Up, up_rx)),
            tokio::spawn(schedule(Arc::clone(&shared), Direction::Down, down_rx)),
        ];
        Ok(FaultProxy { addr, upstream, control: FaultControl { shared }, tasks })
    }

    /// The address clients send to (instead of the upstream address).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream address datagrams are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// A handle to change faults and read counters; it stays usable after the proxy stops.
    pub fn control(&self) -> FaultControl {
        self.control.clone()
    }

    /// Aborts the proxy's tasks without waiting: they end (and close their sockets) at
    /// their next scheduling point; queued datagrams are discarded.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Stops the proxy and waits until its tasks have ended: once this returns the
    /// client-facing socket is closed and nothing more is forwarded either way.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A cloneable handle to a proxy's faults and counters.
///
/// Fault changes take effect for the next datagram; [`Faults::blackhole`] also drops
/// datagrams that are already waiting for their delay.
#[derive(Debug, Clone)]
pub struct FaultControl {
    shared: Arc<Shared>,
}

impl FaultControl {
    /// Sets the same faults for both directions (each datagram still draws its own luck).
    pub fn set(&self, faults: Faults) {
        self.set_direction(Direction::Up, faults);
        self.set_direction(Direction::Down, faults);
    }

    /// Sets the faults of one direction.
    pub fn set_direction(&self, dir: Direction, faults: Faults) {
        *self.shared.lane(dir).lock() = faults;
    }

    /// Makes both directions a clean link.
    pub fn clear(&self) {
        self.set(Faults::default());
    }

    /// The current faults of one direction.
    pub fn faults(&self, dir: Direction) -> Faults {
        self.shared.lane(dir).faults()
    }

    /// Cuts (`true`) or restores (`false`) both directions, keeping the other faults.
    pub fn set_blackhole(&self, on: bool) {
        for lane in &self.shared.lanes {
            lane.lock().blackhole = on;
        }
    }

    /// True if either direction is cut.
    pub fn is_blackholed(&self) -> bool {
        self.shared.lanes.iter().any(|l| l.lock().blackhole)
    }

    /// Cuts both directions now and spawns a task that restores them after `d`.
    /// Overlapping partitions are not stacked: the first to end restores the link.
    /// Must be called inside a tokio runtime.
    pub fn partition_for(&self, d: Duration) -> JoinHandle<()> {
        self.set_blackhole(true);
        let ctl = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            ctl.set_blackhole(false);
        })
    }

    /// Flaps the link for `total`: up (blackhole off, from now) for `up`, then down
    /// (blackhole on) for `down`, and so on; the link is left up at the end. The
    /// returned task ends then; aborting it leaves the link as it is at that moment.
    /// Phases shorter than 1 ms are lengthened to 1 ms. Must be called inside a tokio
    /// runtime.
    pub fn flap(&self, up: Duration, down: Duration, total: Duration) -> JoinHandle<()> {
        let start = Instant::now();
        let end = start + total;
        let (up, down) = (up.max(MIN_PHASE), down.max(MIN_PHASE));
        self.set_blackhole(false);
        let ctl = self.clone();
        tokio::spawn(async move {
            let mut cut = false;
            let mut phase_start = start;
            loop {
                let phase_end = (phase_start + if cut { down } else { up }).min(end);
                tokio::time::sleep_until(phase_end).await;
                if phase_end >= end {
                    break;
                }
                cut = !cut;
                ctl.set_blackhole(cut);
                phase_start = phase_end;
            }
            ctl.set_blackhole(false);
        })
    }

    /// Polls the counters every 5 ms until `pred` holds or `timeout` passes; returns
    /// whether it held. For tests that must wait for the proxy to see traffic.
    pub async fn wait_for(&self, timeout: Duration, mut pred: impl FnMut(&Stats) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if pred(&self.stats()) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        Stats {
            up: self.shared.lane(Direction::Up).stats(),
            down: self.shared.lane(Direction::Down).stats(),
            clients: self.shared.clients.load(Relaxed) as u64,
            rejected: self.shared.rejected.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use tokio::time::timeout;

    /// A UDP echo server that remembers its peers and counts datagrams.
    struct Echo {
        addr: SocketAddr,
        peers: Arc<Mutex<HashSet<SocketAddr>>>,
        received: Arc<AtomicU64>,
        task: JoinHandle<()>,
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn echo() -> Echo {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = sock.local_addr().expect("echo addr");
        let peers = Arc::new(Mutex::new(HashSet::new()));
        let received = Arc::new(AtomicU64::new(0));
        let (p, r) = (Arc::clone(&peers), Arc::clone(&received));
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                r.fetch_add(1, Relaxed);
                p.lock().expect("peers").insert(from);
                let _ = sock.send_to(&buf[..n], from).await;
            }
        });
        Echo { addr, peers, received, task }
    }

    async fn client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.expect("bind client")
    }

    /// The next datagram from `from` within `wait`, if any.
    async fn recv_from(sock: &UdpSocket, from: SocketAddr, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        timeout(wait, async {
            loop {
                if let Ok((n, src)) = sock.recv_from(&mut buf).await {
                    if src == from {
                        return buf[..n].to_vec();
                    }
                }
            }
        })
        .await
        .ok()
    }

    /// Datagrams from `from` until `max` arrived or none came for `quiet`.
    async fn collect(sock: &UdpSocket, from: SocketAddr, max: usize, quiet: Duration) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < max {
            match recv_from(sock, from, quiet).await {
                Some(d) => got.push(d),
                None => break,
            }
        }
        got
    }

    /// Round trip of one datagram through the proxy, or `None` if no reply in `wait`.
    async fn ping(sock: &UdpSocket, proxy: SocketAddr, payload: &[u8], wait: Duration) -> Option<Duration> {
        let t = Instant::now();
        sock.send_to(payload, proxy).await.expect("send");
        let reply = recv_from(sock, proxy, wait).await?;
        assert_eq!(reply, payload, "echo must return the payload");
        Some(t.elapsed())
    }

    const LONG: Duration = Duration::from_secs(5);
    const QUIET: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn clean_forwarding_both_ways() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        assert_eq!(proxy.upstream(), server.addr);
        let (a, b) = (client().await, client().await);
        for i in 0..20u32 {
            a.send_to(&[b"a".as_slice(), &i.to_be_bytes()].concat(), proxy.addr()).await.expect("send");
            b.send_to(&[b"b".as_slice(), &i.to_be_bytes()].concat(), proxy.addr()).await.expect("send");
        }
        for (sock, tag) in [(&a, b"a"), (&b, b"b")] {
            let got = collect(sock, proxy.addr(), 20, LONG).await;
            let want: Vec<Vec<u8>> = (0..20u32).map(|i| [tag.as_slice(), &i.to_be_bytes()].concat()).collect();
            assert_eq!(got, want, "each client gets its own replies, in order");
        }
        let peers = server.peers.lock().expect("peers").clone();
        assert_eq!(peers.len(), 2, "the server sees one peer per client: {peers:?}");
        for c in [&a, &b] {
            assert!(!peers.contains(&c.local_addr().expect("addr")), "the server must not see clients directly");
        }
        let s = proxy.control().stats();
        let clean = DirectionStats { received: 40, forwarded: 40, ..DirectionStats::default() };
        assert_eq!((s.up, s.down, s.clients, s.rejected), (clean, clean, 2, 0));
    }

    #[tokio::test]
    async fn full_loss_drops_everything_in_each_direction() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        let c = client().await;

        ctl.set_direction(Direction::Up, Faults { loss: 1.0, ..Faults::default() });
        for _ in 0..50 {
            c.send_to(b"x", proxy.addr()).await.expect("send");
        }
        assert!(ctl.wait_for(LONG, |s| s.up.received == 50).await, "the proxy did not read them all");
        assert_eq!(recv_from(&c, proxy.addr(), QUIET).await, None);
        assert_eq!(server.received.load(Relaxed), 0);
        assert_eq!((ctl.stats().up.received, ctl.stats().up.dropped), (50, 50));

        ctl.set_direction(Direction::Up, Faults::default());
        ctl.set_direction(Direction::Down, Faults { loss: 1.0, ..Faults::default() });
        for _ in 0..50 {
            c.send_to(b"y", proxy.addr()).await.expect("send");
        }
        assert!(ctl.wait_for(LONG, |s| s.down.received == 50).await, "the replies did not come back");
        assert_eq!(recv_from(&c, proxy.addr(), QUIET).await, None);
        assert_eq!(server.received.load(Relaxed), 50, "the up direction is clean again");
        let down = ctl.stats().down;
        assert_eq!((down.received, down.dropped, down.forwarded), (50, 50, 0));
    }

    #[tokio::test]
    async fn partial_loss_drops_about_that_share() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        ctl.set_direction(Direction::Up, Faults { loss: 0.3, ..Faults::default() });
        let c = client().await;
        const N: u32 = 2000;
        let send = async {
            for i in 0..N {
                c.send_to(&i.to_be_bytes(), proxy.addr()).await.expect("send");
                // Pace the sender so that no socket buffer overflows: only the proxy may drop.
                if i % 20 == 19 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        // Read replies while sending, or they would overflow the client's socket buffer.
        let ((), got) = tokio::join!(send, collect(&c, proxy.addr(), N as usize, Duration::from_millis(500)));
        let lost = f64::from(N - got.len() as u32) / f64::from(N);
        assert!((0.2..=0.4).contains(&lost), "lost {lost:.3} of {N}, want about 0.3");
        let unique: HashSet<&Vec<u8>> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "no datagram arrives twice");
        let s = ctl.stats();
        assert_eq!(s.up.received, u64::from(N));
        assert_eq!(s.up.forwarded + s.up.dropped, u64::from(N));
        assert_eq!(s.up.forwarded, got.len() as u64, "every forwarded datagram came back");
        assert_eq!((s.down.dropped, s.down.forwarded), (0, got.len() as u64));
    }

    #[tokio::test]
    async fn duplicate_doubles_each_direction() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        let c = client().await;

        ctl.set_direction(Direction::Up, Faults { duplicate: 1.0, ..Faults::default() });
        for i in 0..10u8 {
            c.send_to(&[i], proxy.addr()).await.expect("send");
        }
        let mut got = collect(&c, proxy.addr(), 100, QUIET).await;
        got.sort();
        let want: Vec<Vec<u8>> = (0..10u8).flat_map(|i| [vec![i], vec![i]]).collect();
        assert_eq!(got, want, "each datagram arrives twice");
        let s = ctl.stats();
        assert_eq!((s.up.received, s.up.duplicated, s.up.forwarded), (10, 10, 20));

        ctl.set(Faults { duplicate: 1.0, ..Faults::default() });
        for i in 0..10u8 {
            c.send_to(&[i], proxy.addr()).await.expect("send");
        }
        let got = collect(&c, proxy.addr(), 100, QUIET).await;
        assert_eq!(got.len(), 40, "doubled up and doubled down");
        let s = ctl.stats();
        assert_eq!((s.down.duplicated, s.down.forwarded), (20, 20 + 40));
    }

    #[tokio::test]
    async fn delay_is_added_one_way() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        let c = client().await;
        let delay = Duration::from_millis(50);

        ctl.set(Faults { delay, ..Faults::default() });
        for i in 0..3u8 {
            let rtt = ping(&c, proxy.addr(), &[i], LONG).await.expect("reply");
            assert!(rtt >= 2 * delay, "round trip {rtt:?} with {delay:?} each way");
        }
        ctl.set_direction(Direction::Down, Faults::default());
        let rtt = ping(&c, proxy.addr(), b"up only", LONG).await.expect("reply");
        assert!(rtt >= delay, "round trip {rtt:?} with {delay:?} one way");
    }

    #[tokio::test]
    async fn delayed_datagrams_do_not_block_others() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        let (slow, fast) = (client().await, client().await);
        ctl.set_direction(Direction::Up, Faults { delay: Duration::from_secs(2), ..Faults::default() });
        slow.send_to(b"slow", proxy.addr()).await.expect("send");
        // The slow datagram must be in the schedule before the link is made fast.
        assert!(ctl.wait_for(LONG, |s| s.up.queued == 1).await, "the proxy did not queue the datagram");
        ctl.set_direction(Direction::Up, Faults::default());
        let rtt = ping(&fast, proxy.addr(), b"fast", LONG).await.expect("fast reply");
        assert!(rtt < Duration::from_secs(2), "the fast datagram waited for the slow one: {rtt:?}");
        assert_eq!(recv_from(&slow, proxy.addr(), LONG).await.as_deref(), Some(b"slow".as_slice()));
    }

    #[tokio::test]
    async fn blackhole_then_clear_restores_traffic() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        let c = client().await;
        assert!(ping(&c, proxy.addr(), b"before", LONG).await.is_some());

        ctl.set(Faults { blackhole: true, ..Faults::default() });
        assert!(ctl.is_blackholed());
        assert_eq!(ping(&c, proxy.addr(), b"during", QUIET).await, None);
        assert_eq!(server.received.load(Relaxed), 1, "nothing reached the server");

        ctl.clear();
        assert!(ping(&c, proxy.addr(), b"after", LONG).await.is_some());
        let s = ctl.stats();
        assert_eq!((s.up.received, s.up.dropped, s.up.forwarded), (3, 1, 2));
    }

    #[tokio::test]
    async fn blackhole_drops_datagrams_in_flight() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        let c = client().await;
        ctl.set_direction(Direction::Up, Faults { delay: Duration::from_millis(300), ..Faults::default() });
        c.send_to(b"in flight", proxy.addr()).await.expect("send");
        assert!(ctl.wait_for(LONG, |s| s.up.queued == 1).await, "the proxy did not queue the datagram");
        ctl.set_blackhole(true);
        assert_eq!(ctl.faults(Direction::Up).delay, Duration::from_millis(300), "other faults are kept");
        assert_eq!(recv_from(&c, proxy.addr(), Duration::from_millis(500)).await, None);
        let up = ctl.stats().up;
        assert_eq!((up.queued, up.dropped, up.forwarded), (0, 1, 0));
        assert_eq!(server.received.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn partition_for_heals_itself() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        let c = client().await;
        let heal = ctl.partition_for(Duration::from_secs(1));
        assert!(ctl.is_blackholed());
        assert_eq!(ping(&c, proxy.addr(), b"cut", QUIET).await, None);
        heal.await.expect("partition task");
        assert!(!ctl.is_blackholed());
        assert!(ping(&c, proxy.addr(), b"healed", LONG).await.is_some());
    }

    #[tokio::test]
    async fn flap_alternates_and_ends_up() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        ctl.set(Faults { blackhole: true, ..Faults::default() });
        let c = client().await;
        let step = Duration::from_millis(100);
        let flap = ctl.flap(step, step, 6 * step);
        assert!(!ctl.is_blackholed(), "a flap starts with the link up");
        // Probe every 10 ms; with 100 ms phases some probes must pass and some be cut.
        let (mut passed, mut cut) = (0, 0);
        while !flap.is_finished() {
            match ping(&c, proxy.addr(), b"probe", Duration::from_millis(10)).await {
                Some(_) => passed += 1,
                None => cut += 1,
            }
        }
        flap.await.expect("flap task");
        assert!(passed > 0 && cut > 0, "passed {passed}, cut {cut}");
        assert!(!ctl.is_blackholed(), "a flap leaves the link up");
        // Late replies to cut-off probes may still arrive; drain them, then the link works.
        let _ = collect(&c, proxy.addr(), usize::MAX, QUIET).await;
        assert!(ping(&c, proxy.addr(), b"after", LONG).await.is_some());
    }

    #[tokio::test]
    async fn jitter_reorders() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        ctl.set_direction(Direction::Up, Faults { jitter: Duration::from_millis(40), ..Faults::default() });
        let c = client().await;
        const N: u32 = 200;
        let send = async {
            for i in 0..N {
                c.send_to(&i.to_be_bytes(), proxy.addr()).await.expect("send");
                // Let the proxy read (no time passes): the burst must not overflow its socket buffer.
                if i % 50 == 49 {
                    tokio::task::yield_now().await;
                }
            }
        };
        let ((), got) = tokio::join!(send, collect(&c, proxy.addr(), N as usize, Duration::from_secs(1)));
        let got: Vec<u32> = got.into_iter().map(|d| u32::from_be_bytes(d.try_into().expect("4 bytes"))).collect();
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..N).collect::<Vec<_>>(), "every datagram arrives once");
        let inversions = got.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(inversions > 0, "jitter must reorder some of {N} datagrams");
    }

    #[tokio::test]
    async fn client_table_is_bounded() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        let mut clients = Vec::new();
        for i in 0..MAX_CLIENTS {
            let c = client().await;
            assert!(ping(&c, proxy.addr(), &i.to_be_bytes(), LONG).await.is_some(), "client {i}");
            clients.push(c);
        }
        let extra = client().await;
        assert_eq!(ping(&extra, proxy.addr(), b"one too many", QUIET).await, None);
        let s = ctl.stats();
        assert_eq!((s.clients, s.rejected, s.up.dropped), (MAX_CLIENTS as u64, 1, 1));
        assert_eq!(server.peers.lock().expect("peers").len(), MAX_CLIENTS);
        assert!(ping(&clients[0], proxy.addr(), b"known", LONG).await.is_some(), "known clients still pass");
    }

    #[tokio::test]
    async fn odd_probabilities_are_clamped() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let ctl = proxy.control();
        let c = client().await;
        ctl.set(Faults { loss: -1.0, duplicate: f64::NAN, ..Faults::default() });
        assert!(ping(&c, proxy.addr(), b"clean", LONG).await.is_some());
        assert_eq!(recv_from(&c, proxy.addr(), QUIET).await, None, "no duplicate");
        ctl.set(Faults { loss: 7.0, ..Faults::default() });
        assert_eq!(ping(&c, proxy.addr(), b"lost", QUIET).await, None);
    }

    #[tokio::test]
    async fn shutdown_stops_forwarding() {
        let server = echo().await;
        let proxy = FaultProxy::start(server.addr).await.expect("proxy");
        let (addr, ctl) = (proxy.addr(), proxy.control());
        let c = client().await;
        assert!(ping(&c, addr, b"up", LONG).await.is_some());
        proxy.shutdown().await;
        assert_eq!(ping(&c, addr, b"down", QUIET).await, None);
        assert_eq!(server.received.load(Relaxed), 1);
        assert_eq!(ctl.stats().up.received, 1, "the handle outlives the proxy");
    }
}
