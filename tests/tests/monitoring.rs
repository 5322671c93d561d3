//! The Grafana dashboard (`deploy/grafana/moatmq.json`) and the Prometheus alert rules
//! (`deploy/prometheus/moatmq-rules.yaml`) against what a real broker's `/metrics`
//! serves: every metric name their PromQL uses must be exported (read from the
//! `# TYPE` lines, so families without samples yet count), and every label they match
//! or group on must be one the broker puts on a sample, or a target label Prometheus
//! adds (`job`, `instance`). `up` is Prometheus' own. The Helm chart's PrometheusRule
//! carries the same file. (.ci/run adds `promtool check rules` and `promtool test rules`.)

use moatmq_testkit::v4;
use rumqttc::QoS;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo() -> PathBuf {
    moatmq_e2e::repo_root().to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Names Prometheus makes itself rather than scraping them.
const PROMETHEUS_METRICS: &[&str] = &["up"];
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// PromQL words that are not metric names when they stand alone.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "inf",
    "nan",
];

/// What one PromQL expression refers to.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

/// The metric and label names in a PromQL expression: identifiers outside strings,
/// selectors' braces and range brackets, not called as functions and not keywords;
/// label names from `{label op "value"}` matchers and `by`/`without`/`on`/`ignoring`/
/// `group_left`/`group_right` lists. Grafana's `$variables` sit in strings and brackets.
fn promql_refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut refs = Refs::default();
    let mut i = 0;
    // Labels inside the next parenthesised list (after `by`, `on`, ...).
    let mut label_list = false;
    let mut in_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
        } else if c == '{' {
            // Matchers: label names stand before an operator; values are strings.
            i += 1;
            while i < chars.len() && chars[i] != '}' {
                if chars[i] == '"' || chars[i] == '\'' {
                    let q = chars[i];
                    i += 1;
                    while i < chars.len() && chars[i] != q {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                    i += 1;
                } else if ident_start(chars[i]) {
                    let start = i;
                    while i < chars.len() && ident_char(chars[i]) {
                        i += 1;
                    }
                    refs.labels.insert(chars[start..i].iter().collect());
                } else {
                    i += 1;
                }
            }
        } else if c == '(' && label_list {
            in_list = true;
            label_list = false;
            i += 1;
        } else if c == ')' && in_list {
            in_list = false;
            i += 1;
        } else if ident_start(c) || (c.is_ascii_digit() && !in_list) {
            let start = i;
            while i < chars.len() && (ident_char(chars[i]) || chars[i] == '.') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if in_list {
                refs.labels.insert(word);
            } else if c.is_ascii_digit() || c == '$' {
                // A number or a duration.
            } else if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word.as_str())
            {
                label_list = next == Some(&'(');
            } else if next != Some(&'(') && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                refs.metrics.insert(word);
            }
        } else {
            i += 1;
        }
    }
    refs
}

#[test]
fn promql_refs_finds_metrics_and_labels() {
    let r = promql_refs(
        "sum by (instance, listener) (rate(moatmq_connections_total{instance=~\"$instance\"}\
         [$__rate_interval])) / on (instance) group_left process_resident_memory_bytes \
         > 0.5 * max(up offset 10m) and time() - x_seconds{a!=\"}\"} > 131072",
    );
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        r.metrics,
        set(&[
            "moatmq_connections_total",
            "process_resident_memory_bytes",
            "up",
            "x_seconds"
        ])
    );
    assert_eq!(r.labels, set(&["a", "instance", "listener"]));
}

/// Metric names from `# TYPE` lines (counters as `<name>_total`, as PromQL sees them),
/// and the label names each metric's samples carry.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_string()],
            };
            for n in names {
                out.entry(n).or_default();
            }
        } else if !line.starts_with('#') {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = out.entry(line[..name_end].to_string()).or_default();
            if let Some(inner) = line[name_end..]
                .strip_prefix('{')
                .and_then(|l| l.split_once('}'))
            {
                for pair in inner.0.split(',').filter(|p| !p.is_empty()) {
                    labels.insert(pair.split('=').next().unwrap().to_string());
                }
            }
        }
    }
    out
}

/// `GET /metrics` from the broker (the body, headers cut off), after traffic that gives
/// every labelled family a sample: a connection left open (`listener`), a subscription
/// the ACL denies (`action`) and a retained message over the `max_messages` quota
/// (`reason`).
async fn scrape() -> String {
    let broker = moatmq_testkit::TestBroker::builder()
        .anonymous()
        .acl("topic readwrite ok/#\n")
        .retained_store()
        .set("retained", "max_messages", 1)
        .metrics()
        .start()
        .await;
    let c = v4::connected(broker.first_addr(), "monitoring").await;
    c.client
        .subscribe("secret/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    for topic in ["ok/1", "ok/2"] {
        c.client
            .publish(topic, QoS::AtMostOnce, true, "x")
            .await
            .unwrap();
    }
    let body = |text: String| text.split_once("\r\n\r\n").unwrap().1.to_string();
    let addr: SocketAddr = broker.metrics_addr();
    // The publishes are in flight: wait until both families have their sample.
    for _ in 0..50 {
        let text = body(http_get(addr).await);
        if text.contains("moatmq_acl_denials_total{")
            && text.contains("moatmq_retained_refused_total{")
        {
            return text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "no ACL denial or retained refusal counted:\n{}",
        body(http_get(addr).await)
    );
}

async fn http_get(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// Every (where, expression) of the dashboard's panels, rows included.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/moatmq.json")).expect("dashboard JSON");
    let mut out = Vec::new();
    let mut ids = BTreeSet::new();
    fn walk(
        panels: &[serde_json::Value],
        out: &mut Vec<(String, String)>,
        ids: &mut BTreeSet<i64>,
    ) {
        for p in panels {
            let id = p["id"].as_i64().expect("panel id");
            assert!(ids.insert(id), "panel id {id} twice");
            let title = &p["title"];
            if p["type"] != "row" {
                // Queries go to the data source picked at import (the `datasource`
                // variable), never to a uid of the machine the dashboard was made on.
                assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
                assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
                assert!(p["gridPos"]["w"].as_i64().is_some(), "{title}: gridPos");
                let targets = p["targets"].as_array().map_or(0, Vec::len);
                assert!(targets > 0, "{title}: no targets");
            }
            let mut ref_ids = BTreeSet::new();
            for t in p["targets"].as_array().into_iter().flatten() {
                let ref_id = t["refId"].as_str().expect("target refId");
                assert!(ref_ids.insert(ref_id), "{title}: refId {ref_id} twice");
                let expr = t["expr"].as_str().expect("target expr");
                out.push((format!("panel {:?}", p["title"]), expr.to_string()));
            }
            walk(
                p["panels"].as_array().map_or(&[], |v| v.as_slice()),
                out,
                ids,
            );
        }
    }
    walk(
        dash["panels"].as_array().expect("panels"),
        &mut out,
        &mut ids,
    );
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            // label_values(metric, label)
            let args = q
                .strip_prefix("label_values(")
                .and_then(|a| a.strip_suffix(')'))
                .expect("label_values query");
            let (metric, label) = args.split_once(',').unwrap();
            out.push((
                format!("variable {}", v["name"]),
                format!("group by ({}) ({})", label.trim(), metric.trim()),
            ));
        }
    }
    out
}

/// Every (alert, expression) of the rules file.
fn rule_exprs(rel: &str) -> Vec<(String, String)> {
    let docs = yaml_rust2::YamlLoader::load_from_str(&read(rel)).expect("rules YAML");
    let mut out = Vec::new();
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("alert or record");
            assert!(
                rule["alert"].is_badvalue()
                    || ["critical", "warning", "info"]
                        .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{name}: severity"
            );
            out.push((name.to_string(), rule["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let metrics = exported(&scrape().await);
    assert!(metrics.contains_key("process_resident_memory_bytes"));
    let labels: BTreeSet<String> = metrics
        .values()
        .flatten()
        .cloned()
        .chain(TARGET_LABELS.iter().map(|l| l.to_string()))
        .collect();
    let mut exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "the dashboard has its panels");
    let rules = rule_exprs("deploy/prometheus/moatmq-rules.yaml");
    assert!(rules.len() >= 10, "the alert rules");
    exprs.extend(rules);
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for (place, expr) in &exprs {
        let refs = promql_refs(expr);
        assert!(!refs.metrics.is_empty(), "{place}: no metric in {expr}");
        for m in &refs.metrics {
            used.insert(m.clone());
            if !metrics.contains_key(m) && !PROMETHEUS_METRICS.contains(&m.as_str()) {
                problems.push(format!("{place}: {m} is not exported"));
            }
        }
        for l in &refs.labels {
            if !labels.contains(l) {
                problems.push(format!("{place}: label {l} is on no sample"));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}\nexported: {metrics:#?}");
    // The figures the issue asks operators to see are all on the dashboard or in alerts.
    for m in [
        "moatmq_connections_current",
        "process_resident_memory_bytes",
        "moatmq_messages_received_total",
        "moatmq_auth_failures_total",
        "moatmq_rate_limited_total",
        "moatmq_router_up",
        "moatmq_retained_messages",
        "moatmq_retained_store_bytes",
        "moatmq_retained_refused_total",
        "moatmq_login_throttled_addresses",
        "moatmq_max_connections",
        "moatmq_retained_bytes",
        "moatmq_retained_max_messages",
        "moatmq_retained_max_bytes",
        "moatmq_sessions_stored",
        "moatmq_sessions_offline",
        "moatmq_session_messages_held",
        "moatmq_session_messages_dropped_total",
    ] {
        assert!(used.contains(m), "{m} is not shown");
    }
}

/// The chart's PrometheusRule carries the same rules: one file, in the chart (a chart
/// cannot read outside its folder) and linked from deploy/prometheus/, placed under
/// `spec:` as it is.
#[test]
fn helm_prometheus_rule_carries_the_rules_file() {
    let link = repo().join("deploy/prometheus/moatmq-rules.yaml");
    assert_eq!(
        std::fs::read_link(&link).expect("deploy/prometheus/moatmq-rules.yaml is a link"),
        Path::new("../helm/moatmq/files/moatmq-rules.yaml")
    );
    let rules = read("deploy/helm/moatmq/files/moatmq-rules.yaml");
    assert_eq!(read("deploy/prometheus/moatmq-rules.yaml"), rules);
    let template = read("deploy/helm/moatmq/templates/prometheusrule.yaml");
    assert!(template.contains("kind: PrometheusRule"));
    assert!(template.contains("{{- .Files.Get \"files/moatmq-rules.yaml\" | nindent 2 }}"));
    assert!(template.starts_with("{{- if .Values.metrics.prometheusRule.enabled }}"));
    // What `spec:` followed by the indented file renders to.
    let indented: String = rules.lines().map(|l| format!("\n  {l}")).collect();
    let rendered = format!("kind: PrometheusRule\nspec:{indented}\n");
    let doc = &yaml_rust2::YamlLoader::load_from_str(&rendered).unwrap()[0];
    let groups = doc["spec"]["groups"].as_vec().expect("spec.groups");
    assert!(!groups[0]["rules"].as_vec().unwrap().is_empty());

    let values =
        &yaml_rust2::YamlLoader::load_from_str(&read("deploy/helm/moatmq/values.yaml")).unwrap()[0];
    for object in ["serviceMonitor", "prometheusRule"] {
        assert_eq!(
            values["metrics"][object]["enabled"].as_bool(),
            Some(false),
            "{object}: off unless asked for (needs the Prometheus Operator's CRDs)"
        );
    }
    let sm = read("deploy/helm/moatmq/templates/servicemonitor.yaml");
    assert!(sm.starts_with("{{- if .Values.metrics.serviceMonitor.enabled }}"));
    for needle in [
        "kind: ServiceMonitor",
        "- port: metrics",
        "replacement: moatmq",
    ] {
        assert!(sm.contains(needle), "servicemonitor: {needle}");
    }
    // Each pod is scraped once: the headless Service is left out.
    assert!(sm.contains("key: moatmq.io/headless\n        operator: DoesNotExist"));
    assert!(
        read("deploy/helm/moatmq/templates/service.yaml").contains("moatmq.io/headless: \"true\"")
    );
}
