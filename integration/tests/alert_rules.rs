//! The shipped Prometheus alert rules (`deploy/prometheus/sds-agent-alerts.yaml`) hold up
//! against a real agent: every expression parses as PromQL, every metric it selects is one the
//! agent exports, every label it matches, groups by or prints in an annotation is a label those
//! series carry, and every value it matches on (`result="failure"`, `retryable="false"`) is
//! one the agent really emits. An alert that names a metric or a label value that never
//! exists would parse, load and never fire; this is what the test rules out.
//!
//! The agent is driven into every state the rules look at: issued (on the istiod-style test
//! CA, with `--ca istiod,embedded` so the failover's series exist), renewed on `POST /rotate`,
//! then refused by the CA (its token revoked), which counts a failed renewal and a
//! non-retryable CA error (and does not fail over).
//!
//! The table of alerts in `docs/operations.md` must also say what the file says.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use promql_parser::label::MatchOp;
use promql_parser::parser::{Expr, LabelModifier};
use promql_parser::util::{ExprVisitor, walk_expr};
use sds_integration::agent::{Agent, AgentConfig};
use sds_integration::istio_ca::{CLUSTER_ID, IstioTestCa, args_for, token_for};
use sds_integration::process::agent_bin;
use sds_integration::{http, test_dir, wait_until};
use serde::Deserialize;

/// Labels the scrape adds to every series (the scrape config in docs/operations.md, and
/// prometheus-operator's PodMonitor, set them).
const TARGET_LABELS: [&str; 2] = ["namespace", "pod"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn rules() -> Vec<Rule> {
    let path = repo_file("deploy/prometheus/sds-agent-alerts.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let file: RuleFile = serde_norway::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a Prometheus rules file: {e}", path.display()));
    assert_eq!(file.groups.len(), 1);
    assert_eq!(file.groups[0].name, "sds-agent");
    file.groups.into_iter().flat_map(|g| g.rules).collect()
}

/// A label matcher: name, operator, value.
type Matcher = (String, MatchOp, String);

/// What an expression selects.
#[derive(Debug, Default)]
struct Selected {
    /// Each metric selector: the series name and its label matchers.
    selectors: Vec<(String, Vec<Matcher>)>,
    /// The labels of every `by (...)` aggregation, outermost first.
    grouped_by: Vec<Vec<String>>,
}

impl ExprVisitor for Selected {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let vs = match expr {
            Expr::VectorSelector(vs) => vs,
            Expr::MatrixSelector(ms) => &ms.vs,
            Expr::Aggregate(agg) => {
                match &agg.modifier {
                    Some(LabelModifier::Include(labels)) => {
                        self.grouped_by.push(labels.labels.clone());
                    }
                    Some(LabelModifier::Exclude(_)) => {
                        return Err("`without` hides which labels remain; use `by`".into());
                    }
                    None => self.grouped_by.push(Vec::new()),
                }
                return Ok(true);
            }
            _ => return Ok(true),
        };
        let name = vs.name.clone().ok_or("a selector without a metric name")?;
        if !vs.matchers.or_matchers.is_empty() {
            return Err("`or` matchers are not used by these rules".into());
        }
        let matchers = vs
            .matchers
            .matchers
            .iter()
            .filter(|m| m.name != "__name__")
            .map(|m| (m.name.clone(), m.op.clone(), m.value.clone()))
            .collect();
        self.selectors.push((name, matchers));
        Ok(true)
    }
}

fn selected(expr: &str) -> Result<Selected, String> {
    let ast = promql_parser::parser::parse(expr)?;
    let mut s = Selected::default();
    walk_expr(&mut s, &ast)?;
    Ok(s)
}

/// What one `/metrics` scrape says: each family's type, and each sample's name and labels.
#[derive(Debug, Default)]
struct Exposition {
    /// Family name (as in `# TYPE`) to its type.
    families: BTreeMap<String, String>,
    /// Sample name (`..._total`, `..._bucket`) to the label sets it was seen with.
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut e = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                e.families.insert(name.into(), kind.into());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let series = match line.rfind('}') {
                Some(close) => &line[..=close],
                None => line.split(' ').next().unwrap(),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap())),
                None => (series, BTreeMap::new()),
            };
            e.samples.entry(name.into()).or_default().push(labels);
        }
        e
    }

    /// The family a sample name belongs to, by the OpenMetrics suffix rules of its type.
    fn family_of(&self, sample: &str) -> Option<(&str, &str)> {
        let suffixes: &[(&str, &[&str])] = &[
            ("counter", &["_total", "_created"]),
            ("histogram", &["_bucket", "_sum", "_count", "_created"]),
            ("gauge", &[""]),
            ("info", &["_info"]),
        ];
        for (kind, ends) in suffixes {
            for end in *ends {
                if let Some(base) = sample.strip_suffix(end)
                    && let Some((name, k)) = self.families.get_key_value(base)
                    && k == kind
                {
                    return Some((name, k));
                }
            }
        }
        None
    }

    fn label_sets(&self, sample: &str) -> &[BTreeMap<String, String>] {
        self.samples.get(sample).map_or(&[], Vec::as_slice)
    }
}

/// `a="x",b="y, z"`: label pairs, with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").unwrap();
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().unwrap() {
                (_, '\\') => match chars.next().unwrap().1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

/// `{{ $labels.name }}` references in an annotation.
fn template_labels(text: &str) -> Vec<String> {
    text.match_indices("$labels.")
        .map(|(i, m)| {
            text[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

async fn scrape(agent: &Agent) -> Exposition {
    Exposition::parse(&http::get(agent.admin(), "/metrics").await.unwrap().body)
}

async fn counter(agent: &Agent, series: &str) -> f64 {
    let body = http::get(agent.admin(), "/metrics").await.unwrap().body;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// An agent on the istiod-style test CA that has issued, renewed, and then been refused.
async fn agent_in_every_state(dir: &std::path::Path) -> (IstioTestCa, Agent) {
    let ca = IstioTestCa::start(dir).await.unwrap();
    let token = token_for(&ca, dir, "alerts").await.unwrap();
    let config = AgentConfig {
        trust_domain: sds_integration::mesh::TRUST_DOMAIN,
        namespace: sds_integration::mesh::NAMESPACE,
        service_account: "alerts",
        cert_ttl: "1h",
    };
    let mut args = args_for(ca.addr(), ca.tls_root(), &token, Some(CLUSTER_ID));
    // istiod with the embedded CA as fallback, so the failover's series are exported too;
    // the revoked token below is a denial, which does not fail over.
    let ca_flag = args.iter().position(|a| a == "--ca").unwrap();
    args[ca_flag + 1] = "istiod,embedded".into();
    // A federated trust domain, so its series (primed at zero) are exported too.
    let partner = dir.join("partner");
    std::fs::create_dir_all(&partner).unwrap();
    let partner = sds_integration::pki::SharedCa::write(&partner).unwrap();
    args.extend([
        "--federate-with".into(),
        format!("partner.example={}", partner.cert.display()).into(),
    ]);
    let agent = Agent::start_with(&agent_bin().unwrap(), dir, &config, &args)
        .await
        .unwrap();
    let limit = Duration::from_secs(20);
    let rotate = async |agent: &Agent| {
        let r = http::request(agent.admin(), "POST", "/rotate")
            .await
            .unwrap();
        assert_eq!(r.status, 202);
    };
    rotate(&agent).await;
    wait_until("a renewal on POST /rotate", limit, || async {
        counter(&agent, r#"sds_agent_renewals_total{result="success"}"#).await >= 2.0
    })
    .await
    .unwrap();
    ca.revoke(&std::fs::read_to_string(&token).unwrap()).await;
    rotate(&agent).await;
    wait_until("a renewal refused by the CA", limit, || async {
        counter(&agent, r#"sds_agent_renewals_total{result="failure"}"#).await >= 1.0
    })
    .await
    .unwrap();
    (ca, agent)
}

#[tokio::test]
async fn every_alert_selects_series_the_agent_exports() {
    let dir = test_dir().unwrap();
    let (_ca, agent) = agent_in_every_state(dir.path()).await;
    let exposed = scrape(&agent).await;
    let rules = rules();
    assert!(!rules.is_empty());

    let mut problems = Vec::new();
    for rule in &rules {
        let name = &rule.alert;
        let sel = match selected(&rule.expr) {
            Ok(sel) => sel,
            Err(e) => {
                problems.push(format!("{name}: expr does not parse: {e}"));
                continue;
            }
        };
        assert!(!sel.selectors.is_empty(), "{name} selects nothing");
        let mut carried: BTreeSet<String> = TARGET_LABELS.iter().map(|l| (*l).into()).collect();
        for (metric, matchers) in &sel.selectors {
            if exposed.family_of(metric).is_none() {
                problems.push(format!("{name}: the agent exports no metric {metric}"));
                continue;
            }
            let sets = exposed.label_sets(metric);
            carried.extend(sets.iter().flat_map(|s| s.keys().cloned()));
            for (label, op, value) in matchers {
                // An equality matcher must match a series the agent really emits.
                let seen = sets.iter().any(|s| s.contains_key(label));
                if !seen {
                    problems.push(format!("{name}: {metric} has no label {label}"));
                } else if *op == MatchOp::Equal && !sets.iter().any(|s| s.get(label) == Some(value))
                {
                    let values: BTreeSet<_> = sets.iter().filter_map(|s| s.get(label)).collect();
                    problems.push(format!(
                        "{name}: {metric}{{{label}=\"{value}\"}} never emitted; seen {values:?}"
                    ));
                }
            }
        }
        for by in &sel.grouped_by {
            for label in by {
                if !carried.contains(label) {
                    problems.push(format!("{name}: groups by {label}, which no series has"));
                }
            }
        }
        // What an annotation prints must survive the outermost aggregation.
        let kept: BTreeSet<String> = match sel.grouped_by.first() {
            Some(by) => by.iter().cloned().collect(),
            None => carried.clone(),
        };
        for (key, text) in &rule.annotations {
            for label in template_labels(text) {
                if !kept.contains(&label) {
                    problems.push(format!(
                        "{name}: annotation {key} prints $labels.{label}, which the result lacks"
                    ));
                }
            }
        }
        match rule.labels.get("severity").map(String::as_str) {
            Some("critical" | "warning") => {}
            other => problems.push(format!("{name}: severity {other:?}")),
        }
        for key in ["summary", "description"] {
            if !rule.annotations.contains_key(key) {
                problems.push(format!("{name}: no {key} annotation"));
            }
        }
        if let Some(d) = &rule.for_ {
            prometheus_duration(d).unwrap_or_else(|e| problems.push(format!("{name}: for: {e}")));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The rules cover what the issue asks an operator to be told about.
#[test]
fn the_rules_cover_expiry_failures_nacks_and_latency() {
    let rules = rules();
    let mut names: Vec<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    names.sort_unstable();
    let mut dedup = names.clone();
    dedup.dedup();
    assert_eq!(names, dedup, "alert names repeat");
    for (needle, what) in [
        (
            "sds_agent_certificate_lifetime_seconds",
            "expiry within 25 % of lifetime",
        ),
        (
            r#"sds_agent_renewals_total{result="failure"}"#,
            "renewals failing",
        ),
        ("sds_agent_sds_nacks_total", "NACKs"),
        ("sds_agent_ca_request_duration_seconds_bucket", "CA latency"),
        (
            "sds_agent_ca_fallback_seconds",
            "a fallback CA for too long",
        ),
    ] {
        assert!(
            rules.iter().any(|r| r.expr.contains(needle)),
            "no rule for {what} ({needle})"
        );
    }
    let expiring = rules
        .iter()
        .find(|r| r.expr.contains("sds_agent_certificate_lifetime_seconds"))
        .unwrap();
    assert!(
        expiring.expr.contains("0.25 *"),
        "not 25 % of the lifetime: {}",
        expiring.expr
    );
}

/// `5m`, `1h30m`: Prometheus durations as a rule's `for`.
fn prometheus_duration(text: &str) -> Result<(), String> {
    let mut digits = false;
    for c in text.chars() {
        match c {
            '0'..='9' => digits = true,
            's' | 'm' | 'h' | 'd' | 'w' | 'y' if digits => digits = false,
            _ => return Err(format!("{text:?} is not a Prometheus duration")),
        }
    }
    if text.is_empty() || digits {
        return Err(format!("{text:?} is not a Prometheus duration"));
    }
    Ok(())
}

/// PromQL with its spacing made canonical, so the docs may lay it out on one line.
fn canonical(expr: &str) -> String {
    let spaced = expr.split_whitespace().collect::<Vec<_>>().join(" ");
    spaced.replace("( ", "(").replace(" )", ")")
}

#[test]
fn the_operations_page_lists_the_same_rules() {
    let doc = std::fs::read_to_string(repo_file("docs/operations.md")).unwrap();
    let rows: BTreeMap<String, Vec<String>> = doc
        .lines()
        .filter(|l| l.starts_with("| `SdsAgent"))
        .map(|l| {
            let cells: Vec<String> = l
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect();
            (cells[0].clone(), cells)
        })
        .collect();
    let rules = rules();
    let names: BTreeSet<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    let documented: BTreeSet<&str> = rows.keys().map(String::as_str).collect();
    assert_eq!(
        names, documented,
        "docs/operations.md and the rules file list different alerts"
    );
    for rule in &rules {
        let row = &rows[&rule.alert];
        assert_eq!(
            canonical(&row[1]),
            canonical(&rule.expr),
            "{}: the docs show another expression",
            rule.alert
        );
        assert_eq!(
            row[2],
            rule.for_.as_deref().unwrap_or("0m"),
            "{}: for",
            rule.alert
        );
        assert_eq!(
            Some(&row[3]),
            rule.labels.get("severity"),
            "{}: severity",
            rule.alert
        );
    }
}

/// The checks above can fail: a misspelt metric, a label value never emitted, and an
/// annotation printing a label lost to aggregation are all caught.
#[test]
fn the_checks_catch_broken_rules() {
    let exposed = Exposition::parse(
        "# TYPE sds_agent_renewals counter\n\
         sds_agent_renewals_total{result=\"success\"} 2\n\
         sds_agent_renewals_total{result=\"failure\"} 1\n\
         # TYPE sds_agent_ca_request_duration_seconds histogram\n\
         sds_agent_ca_request_duration_seconds_bucket{backend=\"istiod\",le=\"0.1\"} 1\n\
         # EOF\n",
    );
    assert_eq!(
        exposed.family_of("sds_agent_renewals_total"),
        Some(("sds_agent_renewals", "counter"))
    );
    assert_eq!(exposed.family_of("sds_agent_renewal_total"), None);
    assert_eq!(
        exposed.family_of("sds_agent_renewals"),
        None,
        "a counter sample needs _total"
    );
    assert_eq!(
        exposed.family_of("sds_agent_ca_request_duration_seconds_bucket"),
        Some(("sds_agent_ca_request_duration_seconds", "histogram"))
    );
    let sel = selected(r#"increase(sds_agent_renewals_total{result="failed"}[5m]) > 0"#).unwrap();
    let (metric, matchers) = &sel.selectors[0];
    assert_eq!(metric, "sds_agent_renewals_total");
    assert_eq!(matchers[0].0, "result");
    assert!(
        !exposed
            .label_sets(metric)
            .iter()
            .any(|s| s.get("result").map(String::as_str) == Some("failed"))
    );
    let sel =
        selected("sum by (le) (rate(sds_agent_ca_request_duration_seconds_bucket[5m]))").unwrap();
    assert_eq!(sel.grouped_by, [vec!["le".to_owned()]]);
    assert!(selected("rate(sds_agent_renewals_total[5m]").is_err());
    assert!(selected("sum without (le) (sds_agent_renewals_total)").is_err());
    assert_eq!(
        template_labels("{{ $labels.backend }} and {{$labels.kind}}"),
        ["backend", "kind"]
    );
    assert_eq!(
        parse_labels(r#"backends="embedded,vault",v="a\"b""#),
        BTreeMap::from([
            ("backends".to_owned(), "embedded,vault".to_owned()),
            ("v".to_owned(), "a\"b".to_owned())
        ])
    );
    assert!(prometheus_duration("5m").is_ok());
    assert!(prometheus_duration("5 minutes").is_err());
    assert!(prometheus_duration("5").is_err());
}
