//! Checks what reached the hub against what the devices were acknowledged for.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;

/// One line of `voither-hub export`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExportRow {
    /// A stored record.
    Record {
        /// Gateway id.
        gateway: String,
        /// Lane.
        lane: String,
        /// Per-lane seq.
        seq: u64,
        /// Ingest time.
        ingest_ts_ms: u64,
        /// Topic.
        source: String,
        /// Payload, base64.
        payload: String,
        /// The payload decoded as a device frame, when it is one (`voither-hub export`
        /// adds it: `device_id`, `counter`, `timestamp_ms`, `readings`).
        #[serde(default)]
        decoded: Option<serde_json::Value>,
    },
    /// Evicted range.
    Gap {
        /// Gateway id.
        gateway: String,
        /// Lane.
        lane: String,
        /// First seq.
        from_seq: u64,
        /// Last seq.
        through_seq: u64,
        /// Reason.
        reason: String,
    },
}

/// Parses export output.
pub fn parse_export(text: &str) -> Result<Vec<ExportRow>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("bad export line {l:?}: {e}")))
        .collect()
}

/// Outcome of a check.
#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    /// Messages the devices were acked for.
    pub expected: u64,
    /// Distinct simulator messages found at the hub.
    pub found: u64,
    /// Acked messages not at the hub.
    pub missing: Vec<(u32, u64)>,
    /// Messages at the hub more than once (device, counter, times).
    pub duplicates: Vec<(u32, u64, u32)>,
    /// Records whose payload failed the integrity check.
    pub corrupt: u64,
    /// Lanes whose seqs were not strictly increasing from their first.
    pub out_of_order_lanes: Vec<String>,
    /// Records at the hub that no device was acked for (a device crashed before the
    /// PUBACK reached it): allowed, reported.
    pub unexpected: u64,
    /// Records per lane.
    pub per_lane: BTreeMap<String, u64>,
}

impl CheckReport {
    /// True when nothing is missing, doubled, corrupt or out of order.
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.duplicates.is_empty() && self.corrupt == 0 && self.out_of_order_lanes.is_empty()
    }

    /// One-paragraph summary.
    pub fn summary(&self) -> String {
        format!(
            "expected {} acked messages; found {} distinct; missing {}; duplicates {}; corrupt {}; lanes out of order {:?}; not acked to a device but stored {}; per lane {:?}",
            self.expected,
            self.found,
            self.missing.len(),
            self.duplicates.len(),
            self.corrupt,
            self.out_of_order_lanes,
            self.unexpected,
            self.per_lane
        )
    }
}

/// Compares export rows with the per-device acked counters.
pub fn check(rows: &[ExportRow], acked: &[Vec<u64>]) -> CheckReport {
    let mut rep = CheckReport { expected: acked.iter().map(|v| v.len() as u64).sum(), ..Default::default() };
    let mut seen: HashMap<(u32, u64), u32> = HashMap::new();
    let mut last_seq: HashMap<(String, String), u64> = HashMap::new();
    for row in rows {
        let ExportRow::Record { gateway, lane, seq, payload, .. } = row else { continue };
        *rep.per_lane.entry(lane.clone()).or_default() += 1;
        let key = (gateway.clone(), lane.clone());
        if let Some(prev) = last_seq.get(&key) {
            if *seq <= *prev && !rep.out_of_order_lanes.contains(lane) {
                rep.out_of_order_lanes.push(lane.clone());
            }
        }
        last_seq.insert(key, *seq);
        let bytes = match base64::engine::general_purpose::STANDARD.decode(payload) {
            Ok(b) => b,
            Err(_) => {
                rep.corrupt += 1;
                continue;
            }
        };
        match crate::sim::parse(&bytes) {
            Some(id) => *seen.entry(id).or_default() += 1,
            None => rep.corrupt += 1,
        }
    }
    rep.found = seen.len() as u64;
    for (d, counters) in acked.iter().enumerate() {
        for c in counters {
            if !seen.contains_key(&(d as u32, *c)) {
                rep.missing.push((d as u32, *c));
            }
        }
    }
    let acked_set: std::collections::HashSet<(u32, u64)> =
        acked.iter().enumerate().flat_map(|(d, v)| v.iter().map(move |c| (d as u32, *c))).collect();
    for (id, n) in &seen {
        if *n > 1 {
            rep.duplicates.push((id.0, id.1, *n));
        }
        if !acked_set.contains(id) {
            rep.unexpected += 1;
        }
    }
    rep.missing.sort_unstable();
    rep.duplicates.sort_unstable();
    rep
}
