//! The monitoring files in `edge-k8s/monitoring/` (Prometheus alert rules and the
//! Grafana dashboard) name only metrics that a real gateway and hub export.
//!
//! The alert file is read with a small parser of the rule-file subset it uses (the
//! workspace has no YAML crate on purpose); when `promtool` is on `PATH` it also has
//! to pass `promtool check rules`.
//!
//! prometheus-client prints a labelled family only once it has a label set, so the
//! test first drives traffic, one oversized MQTT payload and one malformed hub frame
//! to make every family appear in the live gateway and hub pages.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use voither_tests::procs::{http_get, output_within, wait_for, Lab};
use voither_tests::raw;
use voither_tests::sim::{self, SimConfig};

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("edge-k8s").join("monitoring")
}

// ---------------------------------------------------------------------------------
// alerts.yaml
// ---------------------------------------------------------------------------------

/// One alerting (or recording) rule as read from the rule file.
#[derive(Debug, Default)]
struct Rule {
    /// `alert:` (or `record:`) name.
    name: String,
    /// Line of the rule's `- ` item, for messages.
    line: usize,
    expr: Option<String>,
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// `key: value` → (`key`, `value`), only for a plain key followed by `:` and then a
/// space or the line's end.
fn split_key(s: &str) -> Option<(&str, &str)> {
    let (k, v) = s.split_once(':')?;
    let plain = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (plain && (v.is_empty() || v.starts_with(' '))).then(|| (k, v.trim()))
}

/// Removes the quotes of a quoted flow scalar.
fn unquote(v: &str) -> String {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        v[1..v.len() - 1].replace("\\\"", "\"").replace("\\\\", "\\")
    } else if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
        v[1..v.len() - 1].replace("''", "'")
    } else {
        v.to_string()
    }
}

/// Reads the value of the key on line `i` (`first` is what follows the colon): a flow
/// scalar, possibly continued on more-indented lines, or a `|` / `>` block scalar.
/// Returns the value and the index of the next unread line.
fn read_value(lines: &[&str], i: usize, key_indent: usize, first: &str) -> (String, usize) {
    let mut j = i + 1;
    let mut body = Vec::new();
    while j < lines.len() {
        let l = lines[j];
        if !l.trim().is_empty() && indent_of(l) <= key_indent {
            break;
        }
        body.push(l);
        j += 1;
    }
    while body.last().is_some_and(|l| l.trim().is_empty()) {
        body.pop();
        j -= 1;
    }
    if first.starts_with('|') || first.starts_with('>') {
        let strip = body.iter().filter(|l| !l.trim().is_empty()).map(|l| indent_of(l)).min().unwrap_or(0);
        let text: Vec<&str> = body.iter().map(|l| if l.len() >= strip { &l[strip..] } else { "" }).collect();
        let sep = if first.starts_with('|') { "\n" } else { " " };
        (text.join(sep), j)
    } else {
        let mut parts = vec![first.to_string()];
        parts.extend(body.iter().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()));
        (unquote(&parts.join(" ")), j)
    }
}

/// Parses the `groups: [ {name, rules: [...]} ]` rule-file layout, block style.
fn parse_rules(text: &str) -> Vec<Rule> {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end()).collect();
    let mut rules: Vec<Rule> = Vec::new();
    // Indentation of the current `rules:` key, of the current rule's keys, and the
    // mapping (`labels` / `annotations`) being read with the indentation of its keys.
    let mut rules_key: Option<usize> = None;
    let mut rule_keys: Option<usize> = None;
    let mut section: Option<(String, Option<usize>)> = None;
    let mut i = 0;
    while i < lines.len() {
        let raw = lines[i];
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            i += 1;
            continue;
        }
        let mut ind = indent_of(raw);
        let mut content = trimmed;
        if rules_key.is_some_and(|r| ind < r) || (rules_key == Some(ind) && !trimmed.starts_with("- ")) {
            rules_key = None;
            rule_keys = None;
            section = None;
        }
        if let Some(rest) = trimmed.strip_prefix("- ") {
            if rules_key.is_some_and(|r| ind >= r) && rule_keys.is_none_or(|k| ind < k) {
                // A new rule; its first key is on this line.
                rules.push(Rule { line: i + 1, ..Rule::default() });
                ind += 2;
                rule_keys = Some(ind);
                section = None;
                content = rest;
            }
        }
        let Some((key, first)) = split_key(content) else {
            i += 1;
            continue;
        };
        if key == "rules" {
            rules_key = Some(ind);
            rule_keys = None;
            section = None;
            i += 1;
            continue;
        }
        let (Some(rule), Some(k)) = (rules.last_mut(), rule_keys) else {
            i += 1;
            continue;
        };
        if ind == k {
            section = None;
            if key == "labels" || key == "annotations" {
                section = Some((key.to_string(), None));
                i += 1;
                continue;
            }
            let (value, next) = read_value(&lines, i, ind, first);
            match key {
                "alert" | "record" => rule.name = value,
                "expr" => rule.expr = Some(value),
                "for" => rule.for_ = Some(value),
                _ => {}
            }
            i = next;
        } else if let Some((name, sk)) = section.as_mut().filter(|(_, sk)| sk.is_none_or(|sk| sk == ind)) {
            // The mapping's keys sit at the indentation of its first key.
            *sk = Some(ind);
            let (value, next) = read_value(&lines, i, ind, first);
            let map = if name == "labels" { &mut rule.labels } else { &mut rule.annotations };
            map.insert(key.to_string(), value);
            i = next;
        } else {
            i += 1;
        }
    }
    rules
}

/// Every `expr:` key anywhere in the file, counted on the raw text (a cross-check of
/// the parser: no expression is missed).
fn count_expr_keys(text: &str) -> usize {
    text.lines()
        .map(|l| l.trim_start().trim_start_matches("- "))
        .filter(|l| split_key(l).is_some_and(|(k, _)| k == "expr"))
        .count()
}

// ---------------------------------------------------------------------------------
// dashboard.json
// ---------------------------------------------------------------------------------

/// (panel title, expr) of every target of every panel, rows' nested panels included.
fn dashboard_exprs(panels: &[serde_json::Value], out: &mut Vec<(String, String)>) {
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {t}"));
            out.push((title.clone(), expr.to_string()));
        }
        if let Some(inner) = p["panels"].as_array() {
            dashboard_exprs(inner, out);
        }
    }
}

/// Panels with targets must query through the `${datasource}` variable.
fn check_panel_datasources(panels: &[serde_json::Value]) {
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        if p["targets"].as_array().is_some_and(|t| !t.is_empty()) {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?} datasource");
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title:?} target datasource");
                assert!(t["refId"].is_string(), "panel {title:?}: target without refId");
            }
        }
        if let Some(inner) = p["panels"].as_array() {
            check_panel_datasources(inner);
        }
    }
}

// ---------------------------------------------------------------------------------
// PromQL and the exposition
// ---------------------------------------------------------------------------------

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Every `voither_(gateway|hub)_[a-z0-9_]+` token of `expr`, with the byte offset
/// just past it.
fn metric_tokens(expr: &str) -> Vec<(String, usize)> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let rest = &expr[i..];
        let boundary = i == 0 || !is_ident(b[i - 1]);
        let prefix = ["voither_gateway_", "voither_hub_"].into_iter().find(|p| rest.starts_with(p));
        if let (true, Some(p)) = (boundary, prefix) {
            let mut j = i + p.len();
            while j < b.len() && (b[j].is_ascii_lowercase() || b[j].is_ascii_digit() || b[j] == b'_') {
                j += 1;
            }
            if j > i + p.len() {
                out.push((expr[i..j].to_string(), j));
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Label names of the `{...}` selector right after a metric token (if any).
fn selector_labels(expr: &str, end: usize) -> Vec<String> {
    let rest = &expr[end..];
    let Some(inner) = rest.strip_prefix('{').and_then(|r| r.split_once('}')).map(|(s, _)| s) else {
        return Vec::new();
    };
    inner
        .split(',')
        .filter_map(|m| {
            let name: String = m.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// What a `/metrics` page offers to PromQL.
#[derive(Debug, Default)]
struct Exposition {
    /// Family name → type, from `# TYPE` lines.
    families: BTreeMap<String, String>,
    /// Sample name → label names seen on its samples.
    samples: BTreeMap<String, BTreeSet<String>>,
}

impl Exposition {
    fn parse(body: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    e.families.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = e.samples.entry(line[..end].to_string()).or_default();
            if let Some(set) = line[end..].strip_prefix('{').and_then(|r| r.split_once('}')).map(|(s, _)| s) {
                for pair in set.split(',').filter(|p| !p.is_empty()) {
                    if let Some((k, _)) = pair.split_once('=') {
                        labels.insert(k.trim().to_string());
                    }
                }
            }
        }
        e
    }

    /// The series names PromQL can select: every sample name, and the series each
    /// `# TYPE` family stands for (counters are selected as `<family>_total`,
    /// histograms as `_bucket`/`_sum`/`_count`; a bare counter or histogram family
    /// name selects nothing).
    fn queryable(&self) -> BTreeMap<String, String> {
        let mut q = BTreeMap::new();
        for (name, kind) in &self.families {
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                q.insert(format!("{name}{s}"), format!("{kind} family {name}"));
            }
        }
        for name in self.samples.keys() {
            q.entry(name.clone()).or_insert_with(|| "sample".to_string());
        }
        q
    }
}

/// Why `token` is not selectable in the exposition: a hint for the failure message.
fn hint(token: &str, e: &Exposition) -> String {
    if let Some(kind) = e.families.get(token) {
        return match kind.as_str() {
            "counter" => format!("it is a counter family: select {token}_total"),
            "histogram" => format!("it is a histogram family: select {token}_bucket / _sum / _count"),
            k => format!("family of type {k}"),
        };
    }
    for s in ["_total", "_bucket", "_sum", "_count"] {
        if let Some(base) = token.strip_suffix(s) {
            if let Some(kind) = e.families.get(base) {
                return format!("{base} exists but is a {kind}");
            }
        }
    }
    "no such family".to_string()
}

fn metrics_page(addr: std::net::SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics on {addr}: {body}");
    body
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|f| f.is_file()))
        .unwrap_or_default()
}

/// First number after `>` or `>=` following `token` in `expr`.
fn threshold_after(expr: &str, token: &str) -> Option<f64> {
    let at = expr.find(token)? + token.len();
    let rest = &expr[at..];
    let gt = rest.find('>')?;
    let num = rest[gt + 1..].trim_start_matches('=').trim_start();
    let n: String = num.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e').collect();
    n.parse().ok()
}

// ---------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------

#[test]
fn monitoring_rules_and_dashboard_use_only_real_metrics() {
    let dir = monitoring_dir();
    let alerts_path = dir.join("alerts.yaml");
    let alerts_text = std::fs::read_to_string(&alerts_path).expect("edge-k8s/monitoring/alerts.yaml");
    let dashboard_text =
        std::fs::read_to_string(dir.join("dashboard.json")).expect("edge-k8s/monitoring/dashboard.json");

    // --- alerts.yaml: structure ---
    assert!(alerts_text.lines().any(|l| l.trim_end() == "groups:"), "alerts.yaml is a plain rule file (`groups:`)");
    let rules = parse_rules(&alerts_text);
    assert!(!rules.is_empty(), "no rules parsed from alerts.yaml");
    assert_eq!(
        rules.iter().filter(|r| r.expr.is_some()).count(),
        count_expr_keys(&alerts_text),
        "every `expr:` in alerts.yaml belongs to a parsed rule: {rules:#?}"
    );
    let mut names = BTreeSet::new();
    for r in &rules {
        let at = format!("rule {:?} (alerts.yaml line {})", r.name, r.line);
        assert!(!r.name.is_empty(), "{at}: no `alert:` name");
        assert!(names.insert(r.name.clone()), "{at}: duplicate alert name");
        assert!(r.expr.as_deref().is_some_and(|e| !e.trim().is_empty()), "{at}: no expr");
        let for_ = r.for_.as_deref().unwrap_or_else(|| panic!("{at}: no `for`"));
        let duration_ok = !for_.is_empty()
            && for_.trim_end_matches(['s', 'm', 'h', 'd', 'w', 'y']).chars().all(|c| c.is_ascii_digit())
            && for_.ends_with(['s', 'm', 'h', 'd', 'w', 'y']);
        assert!(duration_ok, "{at}: `for: {for_}` is not a Prometheus duration");
        let sev = r.labels.get("severity").unwrap_or_else(|| panic!("{at}: no severity label"));
        assert!(["critical", "warning", "info"].contains(&sev.as_str()), "{at}: severity {sev:?}");
        for a in ["summary", "description"] {
            assert!(r.annotations.get(a).is_some_and(|s| !s.is_empty()), "{at}: no `{a}` annotation");
        }
        assert!(
            r.annotations.keys().any(|k| k.starts_with("runbook")),
            "{at}: no runbook annotation ({:?})",
            r.annotations.keys()
        );
    }

    // The RPO alerts fire before the platform's 15-minute recovery point objective.
    let rpo_metric = "voither_gateway_oldest_unsynced_age_seconds";
    let rpo: Vec<(&Rule, f64)> = rules
        .iter()
        .filter_map(|r| {
            let e = r.expr.as_deref()?;
            e.contains(rpo_metric)
                .then(|| (r, threshold_after(e, rpo_metric).unwrap_or_else(|| panic!("{}: no `>` threshold", r.name))))
        })
        .collect();
    assert!(!rpo.is_empty(), "no alert on {rpo_metric}");
    for (r, t) in &rpo {
        assert!(*t > 0.0 && *t < 900.0, "{}: threshold {t} s is not below the 900 s RPO", r.name);
    }
    assert!(rpo.iter().any(|(r, _)| r.labels["severity"] == "critical"), "a critical alert on {rpo_metric} exists");

    // --- dashboard.json ---
    let dash: serde_json::Value = serde_json::from_str(&dashboard_text).expect("dashboard.json is JSON");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {}", dash["schemaVersion"]);
    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "a `datasource` template variable of type prometheus"
    );
    let panels = dash["panels"].as_array().expect("panels");
    check_panel_datasources(panels);
    let mut dash_exprs = Vec::new();
    dashboard_exprs(panels, &mut dash_exprs);
    assert!(dash_exprs.len() >= 10, "dashboard has {} target expressions", dash_exprs.len());
    // Template variable queries name metrics too.
    for v in vars {
        let q = v["query"]["query"].as_str().or_else(|| v["query"].as_str()).unwrap_or_default();
        if q.contains("voither_") {
            dash_exprs.push((format!("${}", v["name"].as_str().unwrap_or("?")), q.to_string()));
        }
    }

    // --- promtool, when present ---
    match which("promtool") {
        Some(promtool) => {
            let out = output_within(
                Command::new(&promtool).arg("check").arg("rules").arg(&alerts_path),
                Duration::from_secs(60),
            );
            assert!(
                out.status.success(),
                "promtool check rules failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            println!("check: `{} check rules` passed, and the built-in rule parser", promtool.display());
        }
        None => println!("check: promtool not on PATH; alerts.yaml checked by the built-in rule parser only"),
    }

    // --- the real exposition ---
    // prometheus-client leaves a labelled family out of the page entirely (not even
    // its HELP and TYPE lines) until it has a label set, so first make the events
    // happen that create the label sets the alerts and panels select.
    let lab = Lab::start();
    let connected = wait_for(Duration::from_secs(60), || {
        lab.gateway.metric("voither_gateway_uplink_connected").filter(|v| *v == 1.0)
    });
    assert!(connected.is_some(), "gateway did not connect to the hub\n{}", lab.logs());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Ordinary traffic, synced through the hub (ingested/stored/synced, sink commits).
    let cfg = SimConfig { port: lab.mosquitto.port, devices: 2, messages: 20, alarm_every: 5, ..Default::default() };
    let report = rt.block_on(sim::run(cfg, Arc::default()));
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(60));
    assert!(rep.ok(), "{}\n{}", rep.summary(), lab.logs());
    // One payload over mqtt.max_payload_bytes: dropped_records{reason="oversize"}.
    rt.block_on(async {
        let mut opts = rumqttc::MqttOptions::new("monitoring-oversize", "127.0.0.1", lab.mosquitto.port);
        opts.set_max_packet_size(2 << 20, 2 << 20);
        let (c, mut ev) = rumqttc::AsyncClient::new(opts, 10);
        c.publish("devices/9/telemetry", rumqttc::QoS::AtLeastOnce, false, vec![7u8; 300 * 1024]).await.unwrap();
        let acked = tokio::time::timeout(Duration::from_secs(30), async {
            while !matches!(ev.poll().await.unwrap(), rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) {}
        })
        .await;
        assert!(acked.is_ok(), "the broker did not acknowledge the oversized publish");
    });
    let dropped = wait_for(Duration::from_secs(20), || {
        lab.gateway.metric("voither_gateway_dropped_records_total").filter(|n| *n >= 1.0)
    });
    assert!(dropped.is_some(), "the oversized payload was not counted as dropped\n{}", lab.logs());
    // A malformed frame on a hub session: session_errors{kind="frame"}.
    {
        let _guard = rt.enter();
        let pki = &lab.pki.dir;
        let ep = raw::endpoint(&pki.join("ca.pem"), Some((&pki.join("gw-1.pem"), &pki.join("gw-1.key"))));
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff, 0x13, 0x37, 0x00, 0x99]);
        rt.block_on(raw::exchange(&ep, lab.hub.addr, &garbage));
    }
    let errors =
        wait_for(Duration::from_secs(20), || lab.hub.metric("voither_hub_session_errors_total").filter(|n| *n >= 1.0));
    assert!(errors.is_some(), "the malformed frame was not counted as a session error\n{}", lab.hub.log_tail());

    let gw = Exposition::parse(&metrics_page(lab.gateway.admin));
    let hub = Exposition::parse(&metrics_page(lab.hub.admin));
    let (gw_q, hub_q) = (gw.queryable(), hub.queryable());
    // Labels Prometheus adds at scrape time, or that a histogram's buckets carry.
    let implicit = ["instance", "job", "le"];

    let mut sources: Vec<(String, String)> =
        rules.iter().map(|r| (format!("alert {}", r.name), r.expr.clone().unwrap_or_default())).collect();
    sources.extend(dash_exprs.into_iter().map(|(t, e)| {
        let what =
            if t.starts_with('$') { format!("dashboard variable {t}") } else { format!("dashboard panel {t:?}") };
        (what, e)
    }));
    let mut problems = Vec::new();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (source, expr) in &sources {
        let tokens = metric_tokens(expr);
        if tokens.is_empty() {
            problems.push(format!("{source}: no voither metric in {expr:?}"));
        }
        for (token, end) in tokens {
            let (expo, q, side) =
                if token.starts_with("voither_gateway_") { (&gw, &gw_q, "gateway") } else { (&hub, &hub_q, "hub") };
            used.entry(token.clone()).or_default().insert(source.clone());
            if !q.contains_key(&token) {
                problems.push(format!("{source}: {token} is not in the {side}'s /metrics ({})", hint(&token, expo)));
                continue;
            }
            if let Some(seen) = expo.samples.get(&token) {
                for l in selector_labels(expr, end) {
                    if !implicit.contains(&l.as_str()) && !seen.contains(&l) {
                        problems.push(format!("{source}: {token} has no label {l:?} (has {seen:?})"));
                    }
                }
            }
        }
        if expr.contains("histogram_quantile") && !expr.contains("_bucket") {
            problems.push(format!("{source}: histogram_quantile without a _bucket series"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\ngateway /metrics:\n{}\nhub /metrics:\n{}",
        problems.join("\n"),
        gw_q.keys().cloned().collect::<Vec<_>>().join("\n"),
        hub_q.keys().cloned().collect::<Vec<_>>().join("\n")
    );

    // The alerts cover what the README asks operators to watch.
    let alert_metrics: BTreeSet<String> =
        rules.iter().flat_map(|r| metric_tokens(r.expr.as_deref().unwrap_or_default())).map(|(t, _)| t).collect();
    for m in [
        "voither_gateway_oldest_unsynced_age_seconds",
        "voither_gateway_uplink_connected",
        "voither_gateway_store_used_bytes",
        "voither_gateway_store_budget_bytes",
        "voither_gateway_evicted_records_total",
        "voither_gateway_store_degraded",
        "voither_gateway_dropped_records_total",
        "voither_hub_gateways",
        "voither_hub_sink_commit_seconds_bucket",
        "voither_hub_session_errors_total",
    ] {
        assert!(alert_metrics.contains(m), "no alert uses {m}");
    }

    println!("checked {} expressions ({} alerts) against the live gateway and hub:", sources.len(), rules.len());
    for (m, srcs) in &used {
        println!("  {m}: {}", srcs.iter().cloned().collect::<Vec<_>>().join(", "));
    }
}

/// The hand parser reads the rule-file forms it may meet (flow, quoted, folded and
/// literal block scalars, compact lists), and the exposition check refuses a bare
/// counter or histogram family name, which selects nothing in PromQL.
#[test]
fn rule_parser_and_name_check_catch_what_they_should() {
    let text = r#"
groups:
- name: a
  rules:
  - alert: Flow
    expr: voither_gateway_uplink_connected == 0
    for: 2m
    labels: {}
  - alert: Literal
    # a comment inside the rule
    expr: |
      histogram_quantile(0.99,
        sum by (le) (rate(voither_hub_sink_commit_seconds_bucket[5m])))
        > 0.5
    for: 10m
    labels:
        severity: warning
    annotations:
      summary: "quoted: \"x\""
      description: >-
        folded
        text
- name: b
  rules:
    - expr: >
        sum(voither_gateway_ingested_records)
      alert: Folded
      for: 0m
"#;
    let rules = parse_rules(text);
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["Flow", "Literal", "Folded"], "{rules:#?}");
    assert_eq!(count_expr_keys(text), 3);
    assert_eq!(rules[0].expr.as_deref(), Some("voither_gateway_uplink_connected == 0"));
    assert!(rules[0].labels.is_empty());
    let literal = rules[1].expr.as_deref().unwrap();
    assert!(
        literal.starts_with("histogram_quantile(0.99,\n  sum by (le)") && literal.ends_with("> 0.5"),
        "{literal:?}"
    );
    assert_eq!(rules[1].for_.as_deref(), Some("10m"));
    assert_eq!(rules[1].labels["severity"], "warning");
    assert_eq!(rules[1].annotations["summary"], "quoted: \"x\"");
    assert_eq!(rules[1].annotations["description"], "folded text");
    assert_eq!(rules[2].expr.as_deref(), Some("sum(voither_gateway_ingested_records)"));
    assert_eq!(rules[2].for_.as_deref(), Some("0m"));

    let tokens: Vec<String> =
        rules.iter().flat_map(|r| metric_tokens(r.expr.as_deref().unwrap())).map(|t| t.0).collect();
    assert_eq!(
        tokens,
        [
            "voither_gateway_uplink_connected",
            "voither_hub_sink_commit_seconds_bucket",
            "voither_gateway_ingested_records"
        ]
    );
    assert_eq!(metric_tokens("x_voither_hub_gaps_total + voither_hub_gaps_total").len(), 1);
    assert_eq!(selector_labels(r#"m{state="a", lane=~"$x"}"#, 1), ["state", "lane"]);
    assert_eq!(
        threshold_after(
            "voither_gateway_oldest_unsynced_age_seconds >= 600",
            "voither_gateway_oldest_unsynced_age_seconds"
        ),
        Some(600.0)
    );

    let page = "# HELP c C.\n# TYPE c counter\nc_total{lane=\"a\"} 1\n# TYPE h histogram\nh_sum 0\nh_count 0\nh_bucket{le=\"+Inf\"} 0\n# TYPE g gauge\ng 1\n# EOF\n";
    let e = Exposition::parse(page);
    let q = e.queryable();
    for ok in ["c_total", "h_bucket", "h_sum", "h_count", "g"] {
        assert!(q.contains_key(ok), "{ok} selectable");
    }
    for bad in ["c", "h", "g_total"] {
        assert!(!q.contains_key(bad), "{bad} is not selectable");
    }
    assert!(hint("c", &e).contains("c_total"));
    assert!(e.samples["c_total"].contains("lane"));
}
