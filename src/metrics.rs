//! The metric registry and its Prometheus text rendering. Pure data: the metrics actor owns
//! the one instance; everything else sends it typed events.
//!
//! Every family of contract §6 is described up front, so `/metrics` lists it (with its
//! `# HELP` and `# TYPE`) before the first sample. Labels are of low cardinality: tenant,
//! provider, mailbox, class, queue, actor — never raw error text.

use std::collections::BTreeMap;
use std::fmt::Write;

pub type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Histogram,
    Gauge,
}

#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug, Clone)]
struct Family {
    help: &'static str,
    kind: Kind,
    buckets: &'static [f64],
    counters: BTreeMap<Labels, u64>,
    histograms: BTreeMap<Labels, Histogram>,
    gauges: BTreeMap<Labels, f64>,
}

/// Seconds: from a fast local relay (ms) to a slow remote server.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The families the service exposes, with their help text.
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        "mailbridge_emails_sent_total",
        Kind::Counter,
        "Emails accepted by their provider.",
    ),
    (
        "mailbridge_emails_failed_total",
        Kind::Counter,
        "Send attempts that failed, by failure class.",
    ),
    (
        "mailbridge_retries_total",
        Kind::Counter,
        "Retries scheduled.",
    ),
    (
        "mailbridge_sends_deferred_total",
        Kind::Counter,
        "Sends parked by their provider's rate limit (not retries: nothing failed).",
    ),
    (
        "mailbridge_dead_letters_total",
        Kind::Counter,
        "Messages dead-lettered, by DLQ.",
    ),
    (
        "mailbridge_inbound_published_total",
        Kind::Counter,
        "Inbound emails published to the inbound queue.",
    ),
    (
        "mailbridge_inbound_fetched_total",
        Kind::Counter,
        "Inbound emails fetched from mailboxes (before deduplication).",
    ),
    (
        "mailbridge_inbound_errors_total",
        Kind::Counter,
        "Mailbox sync failures (connection, login, protocol, storage).",
    ),
    (
        "mailbridge_sync_requests_total",
        Kind::Counter,
        "email.sync.user requests, by outcome (triggered, unmatched, invalid).",
    ),
    (
        "mailbridge_instance_info",
        Kind::Gauge,
        "1, labelled with this instance's [cluster] instance_id.",
    ),
    (
        "mailbridge_mailboxes_owned",
        Kind::Gauge,
        "Mailboxes whose lease this instance holds (it fetches them).",
    ),
    (
        "mailbridge_live_instances",
        Kind::Gauge,
        "Instances with a recent heartbeat in the database, this one included.",
    ),
    (
        "mailbridge_sends_in_flight",
        Kind::Gauge,
        "Sends begun and not yet answered (waiting for their rate included), by tenant and provider.",
    ),
    (
        "mailbridge_send_duration_seconds",
        Kind::Histogram,
        "Time from taking a request to the provider's answer.",
    ),
    (
        "mailbridge_actor_restarts_total",
        Kind::Counter,
        "Supervised actors restarted after they stopped or panicked.",
    ),
    (
        "mailbridge_amqp_connections_total",
        Kind::Counter,
        "AMQP connections established (the first and every reconnect).",
    ),
    (
        "mailbridge_amqp_connection_losses_total",
        Kind::Counter,
        "AMQP connections lost.",
    ),
];

#[derive(Debug, Clone)]
pub struct Registry {
    families: BTreeMap<&'static str, Family>,
}

impl Default for Registry {
    fn default() -> Self {
        let mut r = Registry {
            families: BTreeMap::new(),
        };
        for (name, kind, help) in FAMILIES {
            r.families.insert(
                name,
                Family {
                    help,
                    kind: *kind,
                    buckets: DURATION_BUCKETS,
                    counters: BTreeMap::new(),
                    histograms: BTreeMap::new(),
                    gauges: BTreeMap::new(),
                },
            );
        }
        r
    }
}

impl Registry {
    /// The family `name` when it is of `kind`. An unknown name (a programming error, which
    /// the `tidy` test below catches) is logged and ignored: the metrics actor has no way to
    /// panic.
    fn family(&mut self, name: &str, kind: Kind) -> Option<&mut Family> {
        let f = self.families.get_mut(name).filter(|f| f.kind == kind);
        if f.is_none() {
            tracing::warn!(
                metric = name,
                ?kind,
                "not a known metric of this kind; ignored"
            );
        }
        f
    }

    /// Adds `by` to a counter.
    pub fn inc(&mut self, name: &str, mut labels: Labels, by: u64) {
        let Some(f) = self.family(name, Kind::Counter) else {
            return;
        };
        labels.sort();
        *f.counters.entry(labels).or_default() += by;
    }

    pub fn observe(&mut self, name: &str, mut labels: Labels, value: f64) {
        let Some(f) = self.family(name, Kind::Histogram) else {
            return;
        };
        labels.sort();
        let buckets = f.buckets;
        let h = f.histograms.entry(labels).or_insert_with(|| Histogram {
            counts: vec![0; buckets.len()],
            sum: 0.0,
            count: 0,
        });
        for (i, le) in buckets.iter().enumerate() {
            if value <= *le {
                h.counts[i] += 1;
            }
        }
        h.sum += value;
        h.count += 1;
    }

    /// Sets a gauge (replacing every other sample of its family: these gauges have one).
    pub fn set(&mut self, name: &str, mut labels: Labels, value: f64) {
        let Some(f) = self.family(name, Kind::Gauge) else {
            return;
        };
        labels.sort();
        f.gauges.clear();
        f.gauges.insert(labels, value);
    }

    /// Sets one sample of a gauge with a sample per label set (`mailbridge_sends_in_flight`).
    pub fn set_sample(&mut self, name: &str, mut labels: Labels, value: f64) {
        let Some(f) = self.family(name, Kind::Gauge) else {
            return;
        };
        labels.sort();
        f.gauges.insert(labels, value);
    }

    /// A counter's value, for tests and `/health` details.
    pub fn counter(&self, name: &str, labels: &[(&'static str, &str)]) -> u64 {
        let mut key: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        key.sort();
        self.families
            .get(name)
            .and_then(|f| f.counters.get(&key))
            .copied()
            .unwrap_or(0)
    }

    /// A counter family summed by the value of one label (the dashboard's per-provider
    /// counts); samples without that label are left out. With `label` empty, the family's
    /// total, under the key `""`.
    pub fn counter_sums_by(&self, name: &str, label: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (labels, n) in self
            .families
            .get(name)
            .into_iter()
            .flat_map(|f| &f.counters)
        {
            if label.is_empty() {
                *out.entry(String::new()).or_default() += n;
            } else if let Some((_, v)) = labels.iter().find(|(k, _)| *k == label) {
                *out.entry(v.clone()).or_default() += n;
            }
        }
        out
    }

    /// A histogram family's sum and count by the value of one label.
    pub fn histogram_sums_by(&self, name: &str, label: &str) -> BTreeMap<String, (f64, u64)> {
        let mut out: BTreeMap<String, (f64, u64)> = BTreeMap::new();
        for (labels, h) in self
            .families
            .get(name)
            .into_iter()
            .flat_map(|f| &f.histograms)
        {
            if let Some((_, v)) = labels.iter().find(|(k, _)| *k == label) {
                let e = out.entry(v.clone()).or_default();
                e.0 += h.sum;
                e.1 += h.count;
            }
        }
        out
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.families {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            match f.kind {
                Kind::Counter => {
                    let _ = writeln!(out, "# TYPE {name} counter");
                    for (labels, v) in &f.counters {
                        let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels, None));
                    }
                }
                Kind::Gauge => {
                    let _ = writeln!(out, "# TYPE {name} gauge");
                    for (labels, v) in &f.gauges {
                        let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels, None));
                    }
                }
                Kind::Histogram => {
                    let _ = writeln!(out, "# TYPE {name} histogram");
                    for (labels, h) in &f.histograms {
                        for (i, le) in f.buckets.iter().enumerate() {
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {}",
                                fmt_labels(labels, Some(&le.to_string())),
                                h.counts[i]
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {}",
                            fmt_labels(labels, Some("+Inf")),
                            h.count
                        );
                        let _ = writeln!(out, "{name}_sum{} {}", fmt_labels(labels, None), h.sum);
                        let _ =
                            writeln!(out, "{name}_count{} {}", fmt_labels(labels, None), h.count);
                    }
                }
            }
        }
        out
    }
}

fn fmt_labels(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_listed_before_any_sample() {
        let text = Registry::default().render();
        for (name, _, _) in FAMILIES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
    }

    /// Tidy: every metric name the code uses is a described family.
    #[test]
    fn every_metric_used_in_the_code_is_described() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut used = std::collections::BTreeSet::new();
        for dir in ["src", "actors"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("metrics.rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for part in text.split("\"mailbridge_").skip(1) {
                        let name: String = part
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        if part[name.len()..].starts_with('"') {
                            used.insert(format!("mailbridge_{name}"));
                        }
                    }
                }
            }
        }
        assert!(used.len() > 5, "{used:?}");
        for name in used {
            assert!(
                FAMILIES.iter().any(|(f, _, _)| *f == name),
                "{name} is not in FAMILIES"
            );
        }
    }

    #[test]
    fn counters_and_histograms_render() {
        let mut r = Registry::default();
        r.inc(
            "mailbridge_emails_failed_total",
            vec![("class", "transient".into()), ("tenant", "t\"1".into())],
            2,
        );
        r.observe(
            "mailbridge_send_duration_seconds",
            vec![("provider", "p".into())],
            0.003,
        );
        let text = r.render();
        assert!(text
            .contains("mailbridge_emails_failed_total{class=\"transient\",tenant=\"t\\\"1\"} 2"));
        assert!(text
            .contains("mailbridge_send_duration_seconds_bucket{provider=\"p\",le=\"0.0025\"} 0"));
        assert!(
            text.contains("mailbridge_send_duration_seconds_bucket{provider=\"p\",le=\"0.005\"} 1")
        );
        assert!(text.contains("mailbridge_send_duration_seconds_count{provider=\"p\"} 1"));
        assert_eq!(
            r.counter(
                "mailbridge_emails_failed_total",
                &[("tenant", "t\"1"), ("class", "transient")]
            ),
            2
        );
    }
}
