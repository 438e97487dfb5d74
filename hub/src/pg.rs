//! The PostgreSQL sink: what gateways sent, in a shared database, so that any hub
//! replica can serve any gateway.
//!
//! # Schema (migration 1; `voither-hub migrate` or every start applies it)
//!
//! | table | key | columns |
//! |---|---|---|
//! | `voither_records` | `(gateway, lane, seq, ingest_time)` | `source`, `content_type`, `payload` (bytea), `stored_at` |
//! | `voither_gaps` | `(gateway, lane, from_seq)` | `through_seq`, `reason`, `recorded_at` |
//! | `voither_marks` | `(gateway, lane)` | `mark` (high-water mark), `updated_at` |
//! | `voither_schema_migrations` | `version` | `description`, `applied_at` |
//!
//! `voither_records` is partitioned by range of `ingest_time` (the gateway's ingest
//! clock), one partition per UTC day (`voither_records_YYYYMMDD`), created by the hub
//! for today and the next [`DAYS_AHEAD`] days at start and every hour; rows outside
//! every day partition (a backlog older than the hub's first start, a gateway clock far
//! off) land in `voither_records_default`. Old days are dropped with
//! `DROP TABLE voither_records_YYYYMMDD` (retention is the operator's). The key includes
//! `ingest_time` because PostgreSQL (like TimescaleDB hypertables) requires the
//! partition column in a unique key; a resent record carries the ingest time it was
//! stored with on the gateway, so a duplicate always meets its original in the same
//! partition.
//!
//! # Invariants (the same as the embedded sink's)
//!
//! 1. A commit writes records, gaps and the new marks of one or more lanes in one
//!    transaction, committed (with the server's `synchronous_commit`) before
//!    [`PgSink::commit`] returns; the hub acks only after that.
//! 2. Nothing at or below a lane's mark is written again: the transaction locks the
//!    lane's mark row (`SELECT … FOR UPDATE`) and filters by it, so two replicas serving
//!    one gateway at once (a failover racing an old connection) serialise on that row
//!    and cannot store a record twice; the primary key is a second guard
//!    (`ON CONFLICT DO NOTHING`).
//! 3. Marks only grow (`GREATEST`).

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_postgres::{Client, NoTls};
use voither_proto::{GapReason, StoreRequest};

use crate::sink::{error_line, ndjson_line, CommitStats, DecodedFrame, ExportRow, SinkError, EXPORT_CHUNK};

/// Day partitions created ahead of today.
pub const DAYS_AHEAD: i64 = 3;

/// Serialises schema changes between replicas starting at once.
const MIGRATION_LOCK: i64 = 0x766f_6974_6865_7201;

/// The schema versions, in order. Never edit an applied one: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "records, gaps and marks keyed by (gateway, lane, seq); records partitioned by day of ingest_time",
    "CREATE TABLE voither_records (
        gateway      text        NOT NULL,
        lane         text        NOT NULL,
        seq          bigint      NOT NULL,
        ingest_time  timestamptz NOT NULL,
        source       text        NOT NULL,
        content_type text,
        payload      bytea       NOT NULL,
        stored_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (gateway, lane, seq, ingest_time)
    ) PARTITION BY RANGE (ingest_time);
    CREATE TABLE voither_records_default PARTITION OF voither_records DEFAULT;
    CREATE TABLE voither_gaps (
        gateway     text        NOT NULL,
        lane        text        NOT NULL,
        from_seq    bigint      NOT NULL,
        through_seq bigint      NOT NULL,
        reason      text        NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (gateway, lane, from_seq)
    );
    CREATE TABLE voither_marks (
        gateway    text        NOT NULL,
        lane       text        NOT NULL,
        mark       bigint      NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (gateway, lane)
    );",
)];

/// Connection settings of the PostgreSQL sink.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// libpq-style connection string or URL.
    pub url: String,
    /// Password, when not in the URL (from `sink.password_file`).
    pub password: Option<String>,
    /// Most connections this replica opens.
    pub pool_size: usize,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
}

/// Parses a connection string; the error never repeats the string (it may hold a
/// password).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    tokio_postgres::Config::from_str(url).map_err(|e| e.to_string())
}

fn db_err(e: tokio_postgres::Error) -> SinkError {
    // Connection-level failures and a server that is going away or starting up are
    // worth a retry; anything else (a constraint, a type, permissions) is not.
    let transient = e.is_closed()
        || e.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") || c == "40001" || c == "40P01"
        })
        || (e.code().is_none() && std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()));
    let message = match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => {
            let mut m = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            m
        }
    };
    if transient {
        SinkError::Unavailable(format!("postgresql: {message}"))
    } else {
        SinkError::Io(format!("postgresql: {message}"))
    }
}

/// Appends `row` to `chunk` and sends the chunk once it is full; false when the
/// receiver is gone.
async fn push_row(chunk: &mut Vec<u8>, row: &ExportRow, tx: &tokio::sync::mpsc::Sender<Vec<u8>>) -> bool {
    ndjson_line(chunk, row);
    if chunk.len() < EXPORT_CHUNK {
        return true;
    }
    let full = std::mem::replace(chunk, Vec::with_capacity(EXPORT_CHUNK + 4096));
    tx.send(full).await.is_ok()
}

/// The PostgreSQL sink, with its own small pool of connections.
#[derive(Debug)]
pub struct PgSink {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
    describe: String,
}

type CommitReply = (Vec<StoreRequest>, Result<CommitStats, SinkError>);

#[derive(Debug)]
struct CommitJob {
    gateway: String,
    reqs: Vec<StoreRequest>,
    reply: tokio::sync::oneshot::Sender<CommitReply>,
}

/// Group commit for the PostgreSQL sink: `pool_size` workers, each taking every
/// session's pending batches that are waiting into one transaction (one WAL flush for
/// all of them). Without it, each session's batch was a transaction of its own, and at
/// a few thousand gateways they queued for the pool's connections.
#[derive(Debug, Clone)]
pub struct PgCommitter {
    tx: tokio::sync::mpsc::UnboundedSender<CommitJob>,
}

impl PgCommitter {
    /// Starts `workers` commit tasks on the current runtime; they end when the last
    /// clone is dropped.
    pub fn start(sink: std::sync::Arc<PgSink>, workers: usize) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<CommitJob>();
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..workers.max(1) {
            let (sink, rx) = (sink.clone(), rx.clone());
            tokio::spawn(async move {
                loop {
                    let jobs = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        let mut jobs = vec![first];
                        while jobs.len() < crate::sink::MAX_GROUP {
                            match rx.try_recv() {
                                Ok(j) => jobs.push(j),
                                Err(_) => break,
                            }
                        }
                        jobs
                    };
                    let items: Vec<(&str, &[StoreRequest])> =
                        jobs.iter().map(|j| (j.gateway.as_str(), j.reqs.as_slice())).collect();
                    let res = sink.commit_group(&items).await;
                    drop(items);
                    match res {
                        Ok(stats) => {
                            for (j, st) in jobs.into_iter().zip(stats) {
                                let _ = j.reply.send((j.reqs, Ok(st)));
                            }
                        }
                        Err(e) if e.is_transient() || jobs.len() == 1 => {
                            for j in jobs {
                                let err = match &e {
                                    SinkError::Unavailable(m) => SinkError::Unavailable(m.clone()),
                                    other => SinkError::Io(other.to_string()),
                                };
                                let _ = j.reply.send((j.reqs, Err(err)));
                            }
                        }
                        Err(_) => {
                            // One session's batch the database refuses must not fail the
                            // others of its group: commit each on its own.
                            for j in jobs {
                                let r = sink.commit(&j.gateway, &j.reqs).await;
                                let _ = j.reply.send((j.reqs, r));
                            }
                        }
                    }
                }
            });
        }
        PgCommitter { tx }
    }

    /// Commits `reqs` of `gateway` in the next group; hands the requests back.
    pub async fn commit(&self, gateway: &str, reqs: Vec<StoreRequest>) -> CommitReply {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if let Err(tokio::sync::mpsc::error::SendError(job)) =
            self.tx.send(CommitJob { gateway: gateway.to_owned(), reqs, reply })
        {
            return (job.reqs, Err(SinkError::Io("the sink commit tasks have stopped".into())));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => (Vec::new(), Err(SinkError::Io("the sink commit tasks have stopped".into()))),
        }
    }
}

/// A pooled connection; back to the pool on drop unless it broke.
#[derive(Debug)]
struct Pooled<'a> {
    client: Option<Client>,
    pool: &'a PgSink,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("client until drop")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("client until drop")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                self.pool.idle.lock().expect("pool lock").push(c);
            }
        }
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64, SinkError> {
    i64::try_from(v).map_err(|_| SinkError::Io(format!("{what} {v} does not fit PostgreSQL's bigint")))
}

fn reason_name(r: GapReason) -> &'static str {
    match r {
        GapReason::Capacity => "capacity",
        GapReason::Ttl => "ttl",
    }
}

impl PgSink {
    /// Connects once (to report a bad address or password at start), applies the
    /// migrations and creates the day partitions.
    pub async fn open(opts: &PgOptions) -> Result<Self, SinkError> {
        let mut config = parse_url(&opts.url).map_err(|e| SinkError::Io(format!("sink.url: {e}")))?;
        if let Some(p) = &opts.password {
            config.password(p);
        }
        config.connect_timeout(opts.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("voither-hub");
        }
        let describe = format!(
            "{}:{}/{}",
            config.get_hosts().first().map_or("?".into(), |h| match h {
                tokio_postgres::config::Host::Tcp(s) => s.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            }),
            config.get_ports().first().copied().unwrap_or(5432),
            config.get_dbname().unwrap_or("")
        );
        let sink =
            PgSink { config, idle: Mutex::new(Vec::new()), permits: Semaphore::new(opts.pool_size.max(1)), describe };
        let at = |e: SinkError| match e {
            SinkError::Unavailable(m) => SinkError::Unavailable(format!("{}: {m}", sink.describe)),
            SinkError::Io(m) => SinkError::Io(format!("{}: {m}", sink.describe)),
            other => other,
        };
        sink.migrate().await.map_err(at)?;
        sink.ensure_partitions().await.map_err(at)?;
        Ok(sink)
    }

    /// `host:port/db` of the database, for logs (never the password).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    async fn conn(&self) -> Result<Pooled<'_>, SinkError> {
        let permit = self.permits.acquire().await.expect("pool semaphore is never closed");
        let reuse = {
            let mut idle = self.idle.lock().expect("pool lock");
            let mut found = None;
            while let Some(c) = idle.pop() {
                if !c.is_closed() {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let client = match reuse {
            Some(c) => c,
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(db_err)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "PostgreSQL connection ended.");
                    }
                });
                client
            }
        };
        Ok(Pooled { client: Some(client), pool: self, _permit: permit })
    }

    /// Applies the migrations this database lacks; returns the schema version.
    pub async fn migrate(&self) -> Result<i32, SinkError> {
        let mut c = self.conn().await?;
        let txn = c.transaction().await.map_err(db_err)?;
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db_err)?;
        txn.batch_execute(
            "CREATE TABLE IF NOT EXISTS voither_schema_migrations (
                version     integer     PRIMARY KEY,
                description text        NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(db_err)?;
        let have: i32 = txn
            .query_one("SELECT coalesce(max(version), 0) FROM voither_schema_migrations", &[])
            .await
            .map_err(db_err)?
            .get(0);
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if have > newest {
            return Err(SinkError::Io(format!(
                "postgresql: the database has schema version {have}, newer than this hub knows ({newest}); upgrade the hub"
            )));
        }
        for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
            txn.batch_execute(sql).await.map_err(db_err)?;
            txn.execute(
                "INSERT INTO voither_schema_migrations (version, description) VALUES ($1, $2)",
                &[version, description],
            )
            .await
            .map_err(db_err)?;
            tracing::info!(version, description, "Applied a sink schema migration.");
        }
        txn.commit().await.map_err(db_err)?;
        Ok(newest)
    }

    /// Creates the day partitions of today and the next [`DAYS_AHEAD`] days (UTC) that
    /// are missing. A day whose rows already sit in the default partition cannot get
    /// its own; that is logged and left so.
    pub async fn ensure_partitions(&self) -> Result<(), SinkError> {
        let c = self.conn().await?;
        let days = c
            .query(
                "SELECT to_char(d, 'YYYYMMDD'), to_char(d, 'YYYY-MM-DD'), to_char(d + 1, 'YYYY-MM-DD')
                 FROM generate_series(0, $1::int) AS i,
                      LATERAL (SELECT (now() AT TIME ZONE 'UTC')::date + i AS d) AS x",
                &[&(DAYS_AHEAD as i32)],
            )
            .await
            .map_err(db_err)?;
        for row in days {
            let (name, from, to): (String, String, String) = (row.get(0), row.get(1), row.get(2));
            // Names and bounds are digits and dashes made above, not input.
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS voither_records_{name} PARTITION OF voither_records \
                 FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')"
            );
            match c.batch_execute(&sql).await {
                Ok(()) => tracing::debug!(partition = %format!("voither_records_{name}"), "Day partition in place."),
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) => {
                    tracing::warn!(day = %from, "Rows of this day are in voither_records_default already; the day keeps them there.");
                }
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_TABLE) => {}
                Err(e) => return Err(db_err(e)),
            }
        }
        Ok(())
    }

    /// The marks of `lanes` of `gateway` (0 for lanes never seen).
    pub async fn marks(&self, gateway: &str, lanes: &[String]) -> Result<Vec<(String, u64)>, SinkError> {
        let c = self.conn().await?;
        let rows = c
            .query("SELECT lane, mark FROM voither_marks WHERE gateway = $1 AND lane = ANY($2)", &[&gateway, &lanes])
            .await
            .map_err(db_err)?;
        Ok(lanes
            .iter()
            .map(|l| {
                let m = rows.iter().find(|r| r.get::<_, &str>(0) == l).map_or(0, |r| r.get::<_, i64>(1));
                (l.clone(), m.max(0) as u64)
            })
            .collect())
    }

    /// Answers a trivial query: the database is reachable.
    pub async fn ping(&self) -> Result<(), SinkError> {
        self.conn().await?.simple_query("SELECT 1").await.map_err(db_err)?;
        Ok(())
    }

    /// Commits the requests of `gateway` in one transaction.
    pub async fn commit(&self, gateway: &str, reqs: &[StoreRequest]) -> Result<CommitStats, SinkError> {
        Ok(self.commit_group(&[(gateway, reqs)]).await?.pop().expect("one stats per item"))
    }

    /// Commits the requests of several gateways (or sessions) in one transaction.
    /// Items are applied in order, each against the marks the items before it left;
    /// returns one [`CommitStats`] per item.
    pub async fn commit_group(&self, items: &[(&str, &[StoreRequest])]) -> Result<Vec<CommitStats>, SinkError> {
        use std::collections::HashMap;
        let mut pairs: Vec<(&str, &str)> =
            items.iter().flat_map(|(g, reqs)| reqs.iter().map(move |r| (*g, r.lane.as_str()))).collect();
        pairs.sort_unstable();
        pairs.dedup();
        let (p_gw, p_lane): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
        let mut c = self.conn().await?;
        let txn = c.transaction().await.map_err(db_err)?;
        txn.execute(
            "INSERT INTO voither_marks (gateway, lane, mark)
             SELECT g, l, 0 FROM unnest($1::text[], $2::text[]) AS t(g, l) ON CONFLICT DO NOTHING",
            &[&p_gw, &p_lane],
        )
        .await
        .map_err(db_err)?;
        // Lock the marks in (gateway, lane) order: concurrent groups never deadlock.
        let rows = txn
            .query(
                "SELECT m.gateway, m.lane, m.mark FROM voither_marks AS m
                 JOIN unnest($1::text[], $2::text[]) AS t(g, l) ON m.gateway = t.g AND m.lane = t.l
                 ORDER BY m.gateway, m.lane FOR UPDATE OF m",
                &[&p_gw, &p_lane],
            )
            .await
            .map_err(db_err)?;
        let mut marks: HashMap<(String, String), u64> = rows
            .iter()
            .map(|r| ((r.get::<_, String>(0), r.get::<_, String>(1)), r.get::<_, i64>(2).max(0) as u64))
            .collect();

        let mut stats = vec![CommitStats::default(); items.len()];
        let mut owner: HashMap<(&str, &str, u64), usize> = HashMap::new();
        let (mut r_gw, mut r_lane, mut r_seq, mut r_ms, mut r_src, mut r_ct, mut r_pay) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut g_gw, mut g_lane, mut g_from, mut g_through, mut g_reason) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut m_gw, mut m_lane, mut m_mark) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (gateway, reqs)) in items.iter().enumerate() {
            let gateway = *gateway;
            for req in *reqs {
                let lane = req.lane.as_str();
                let key = (gateway.to_owned(), lane.to_owned());
                let mark = marks.get(&key).copied().unwrap_or(0);
                for r in req.records.iter() {
                    if r.seq <= mark {
                        stats[i].duplicates += 1;
                        continue;
                    }
                    owner.insert((gateway, lane, r.seq), i);
                    r_gw.push(gateway);
                    r_lane.push(lane);
                    r_seq.push(to_i64(r.seq, "seq")?);
                    r_ms.push(to_i64(r.ingest_ts_ms, "ingest time")?);
                    r_src.push(r.source);
                    r_ct.push(r.content_type);
                    r_pay.push(r.payload);
                }
                for g in &req.gaps {
                    if g.through_seq <= mark {
                        continue;
                    }
                    let from = g.from_seq.max(mark + 1);
                    g_gw.push(gateway);
                    g_lane.push(lane);
                    g_from.push(to_i64(from, "gap seq")?);
                    g_through.push(to_i64(g.through_seq, "gap seq")?);
                    g_reason.push(reason_name(g.reason));
                    stats[i].gaps += 1;
                    stats[i].gap_records += g.through_seq - from + 1;
                }
                if req.through_seq > mark {
                    marks.insert(key, req.through_seq);
                    m_gw.push(gateway);
                    m_lane.push(lane);
                    m_mark.push(to_i64(req.through_seq, "mark")?);
                }
            }
        }
        if !r_seq.is_empty() {
            // RETURNING tells which rows the primary key let in: a row it refused
            // (stored by another replica already) is a duplicate, not a write.
            let rows = txn
                .query(
                    "INSERT INTO voither_records (gateway, lane, seq, ingest_time, source, content_type, payload)
                     SELECT t.gateway, t.lane, t.seq, timestamptz 'epoch' + t.ms * interval '1 millisecond', t.source,
                            t.content_type, t.payload
                     FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::bytea[])
                          AS t(gateway, lane, seq, ms, source, content_type, payload)
                     ON CONFLICT DO NOTHING
                     RETURNING gateway, lane, seq, octet_length(payload)::int8",
                    &[&r_gw, &r_lane, &r_seq, &r_ms, &r_src, &r_ct, &r_pay],
                )
                .await
                .map_err(db_err)?;
            let mut inserted = vec![0u64; items.len()];
            for row in &rows {
                let (g, l, seq): (&str, &str, i64) = (row.get(0), row.get(1), row.get(2));
                if let Some(&i) = owner.get(&(g, l, seq as u64)) {
                    inserted[i] += 1;
                    stats[i].records += 1;
                    stats[i].bytes += row.get::<_, i64>(3) as u64;
                }
            }
            let mut sent = vec![0u64; items.len()];
            for i in owner.values() {
                sent[*i] += 1;
            }
            for i in 0..items.len() {
                stats[i].duplicates += sent[i] - inserted[i];
            }
        }
        if !g_from.is_empty() {
            txn.execute(
                "INSERT INTO voither_gaps (gateway, lane, from_seq, through_seq, reason)
                 SELECT t.gateway, t.lane, t.from_seq, t.through_seq, t.reason
                 FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[])
                      AS t(gateway, lane, from_seq, through_seq, reason)
                 ON CONFLICT DO NOTHING",
                &[&g_gw, &g_lane, &g_from, &g_through, &g_reason],
            )
            .await
            .map_err(db_err)?;
        }
        if !m_lane.is_empty() {
            txn.execute(
                "UPDATE voither_marks AS m SET mark = GREATEST(m.mark, v.mark), updated_at = now()
                 FROM (SELECT gateway, lane, max(mark) AS mark
                       FROM unnest($1::text[], $2::text[], $3::int8[]) AS t(gateway, lane, mark)
                       GROUP BY gateway, lane) AS v
                 WHERE m.gateway = v.gateway AND m.lane = v.lane",
                &[&m_gw, &m_lane, &m_mark],
            )
            .await
            .map_err(db_err)?;
        }
        txn.commit().await.map_err(db_err)?;
        Ok(stats)
    }

    /// Streams every stored record (ordered by gateway, lane and seq), then every
    /// recorded gap, as NDJSON chunks into `tx`; stops early when `tx` is closed. An
    /// error ends the stream with a `{"kind":"error"}` line.
    pub async fn export_ndjson(
        &self,
        gateway: Option<&str>,
        lane: Option<&str>,
        tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) {
        let mut chunk = Vec::with_capacity(EXPORT_CHUNK + 4096);
        match self.export_rows(gateway, lane, &mut chunk, &tx).await {
            Ok(()) => {}
            Err(e) => error_line(&mut chunk, &e),
        }
        let _ = tx.send(chunk).await;
    }

    async fn export_rows(
        &self,
        gateway: Option<&str>,
        lane: Option<&str>,
        chunk: &mut Vec<u8>,
        tx: &tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<(), SinkError> {
        use futures_util::{pin_mut, TryStreamExt};
        use tokio_postgres::types::ToSql;
        let c = self.conn().await?;
        let params: [&(dyn ToSql + Sync); 2] = [&gateway, &lane];
        let rows = c
            .query_raw(
                "SELECT gateway, lane, seq, (extract(epoch FROM ingest_time) * 1000)::int8, source, content_type, payload
                 FROM voither_records
                 WHERE ($1::text IS NULL OR gateway = $1) AND ($2::text IS NULL OR lane = $2)
                 ORDER BY gateway, lane, seq",
                params,
            )
            .await
            .map_err(db_err)?;
        pin_mut!(rows);
        while let Some(row) = rows.try_next().await.map_err(db_err)? {
            let payload: &[u8] = row.get(6);
            let out = ExportRow::Record {
                gateway: row.get(0),
                lane: row.get(1),
                seq: row.get::<_, i64>(2) as u64,
                ingest_ts_ms: row.get::<_, i64>(3) as u64,
                source: row.get(4),
                content_type: row.get(5),
                payload: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, payload),
                decoded: DecodedFrame::from_payload(payload),
            };
            if !push_row(chunk, &out, tx).await {
                return Ok(());
            }
        }
        let gaps = c
            .query_raw(
                "SELECT gateway, lane, from_seq, through_seq, reason FROM voither_gaps
                 WHERE ($1::text IS NULL OR gateway = $1) AND ($2::text IS NULL OR lane = $2)
                 ORDER BY gateway, lane, from_seq",
                params,
            )
            .await
            .map_err(db_err)?;
        pin_mut!(gaps);
        while let Some(row) = gaps.try_next().await.map_err(db_err)? {
            let out = ExportRow::Gap {
                gateway: row.get(0),
                lane: row.get(1),
                from_seq: row.get::<_, i64>(2) as u64,
                through_seq: row.get::<_, i64>(3) as u64,
                reason: row.get(4),
            };
            if !push_row(chunk, &out, tx).await {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Number of stored records.
    pub async fn count(&self) -> Result<u64, SinkError> {
        let c = self.conn().await?;
        let n: i64 = c.query_one("SELECT count(*) FROM voither_records", &[]).await.map_err(db_err)?.get(0);
        Ok(n as u64)
    }
}
