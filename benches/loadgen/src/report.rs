//! The results file as Markdown: medians over the repetitions, their spread,
//! and ratios to direct and to nginx.
//!
//! The file has one line per measurement, tab-separated:
//! `kind  target  rep  key=value key=value ...`, where kind is `meta`
//! (target is the key, the rest the value), `calib`, `idle`, `memory` or a workload
//! (`tcp-1`, `tcp-50`, `tcp-churn`, `tcp-bulk`, `http-1`, `http-50`,
//! `http-churn`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

const WORKLOADS: &[(&str, &str)] = &[
    ("tcp-1", "TCP req/resp, 1 conn"),
    ("tcp-50", "TCP req/resp, 50 conns"),
    ("tcp-churn", "TCP churn, 50 concurrent"),
    ("tcp-bulk", "TCP bulk, 1 stream"),
    ("http-1", "HTTP/1.1 keep-alive, 1 conn"),
    ("http-50", "HTTP/1.1 keep-alive, 50 conns"),
    ("http-churn", "HTTP/1.1 churn, 50 concurrent"),
];
const TARGETS: &[&str] = &["direct", "haproxy", "nginx", "squire"];
const PROXIES: &[&str] = &["haproxy", "nginx", "squire"];

type Fields = BTreeMap<String, f64>;

pub fn render(text: &str) -> Result<String, String> {
    let mut meta: Vec<(String, String)> = Vec::new();
    let mut runs: BTreeMap<(String, String), Vec<Fields>> = BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.splitn(4, '\t').collect();
        let [kind, target, rep, rest] = cols[..] else {
            return Err(format!("line {}: expected 4 tab-separated columns", i + 1));
        };
        if kind == "meta" {
            meta.push((target.to_owned(), rest.to_owned()));
            continue;
        }
        let mut fields: Fields = rest
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse::<f64>().ok()?)))
            .collect();
        if let Ok(rep) = rep.parse() {
            fields.insert("rep".to_owned(), rep);
        }
        runs.entry((kind.to_owned(), target.to_owned()))
            .or_default()
            .push(fields);
    }

    let mut out = String::new();
    let mut spreads = Vec::new();
    for (key, value) in &meta {
        let _ = writeln!(out, "- {key}: {value}");
    }
    let calib: Vec<f64> = values(&runs, "calib", "-", "ms");
    if !calib.is_empty() {
        let _ = writeln!(
            out,
            "- noise: a fixed CPU loop on core 0 took {:.0} ms median, spread {} over {} runs \
             (before and after the benchmark)",
            median(&calib),
            pct(spread(&calib)),
            calib.len()
        );
    }

    let idle: Vec<String> = PROXIES
        .iter()
        .filter_map(|proxy| {
            let v = values(&runs, "idle", proxy, "cpu_share");
            (!v.is_empty()).then(|| format!("{proxy} {:.0}%", median(&v) * 100.0))
        })
        .collect();
    if !idle.is_empty() {
        let _ = writeln!(
            out,
            "- CPU with no traffic (share of one core, over 3 s): {}",
            idle.join(", ")
        );
    }
    let mut table = String::from(
        "| Workload | Target | Throughput | spread | ÷ direct | ÷ nginx | p50 µs | p99 µs \
         | proxy CPU per op | spread | CPU ÷ nginx | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (workload, title) in WORKLOADS {
        let bulk = *workload == "tcp-bulk";
        // Throughput and CPU per op of every run, by target.
        let rate = |target: &str| -> Vec<f64> {
            let runs = runs.get(&(workload.to_string(), target.to_string()));
            runs.into_iter()
                .flatten()
                .map(|f| {
                    if bulk {
                        get(f, "bytes") * 8.0 / get(f, "secs") / 1e9
                    } else {
                        get(f, "rate")
                    }
                })
                .collect()
        };
        let cpu = |target: &str| -> Vec<f64> {
            let runs = runs.get(&(workload.to_string(), target.to_string()));
            runs.into_iter()
                .flatten()
                .filter(|f| f.contains_key("cpu_s"))
                .map(|f| {
                    if bulk {
                        get(f, "cpu_s") / (get(f, "bytes") / 1e9)
                    } else {
                        get(f, "cpu_s") * 1e6 / get(f, "ops")
                    }
                })
                .collect()
        };
        let direct = median(&rate("direct"));
        let nginx = median(&rate("nginx"));
        let nginx_cpu = median(&cpu("nginx"));
        for target in TARGETS {
            let rates = rate(target);
            if rates.is_empty() {
                continue;
            }
            spreads.push(spread(&rates));
            let cpus = cpu(target);
            let m = median(&rates);
            let p50 = median(&values(&runs, workload, target, "p50_us"));
            let p99 = median(&values(&runs, workload, target, "p99_us"));
            let errors: f64 = values(&runs, workload, target, "errors").iter().sum();
            let (throughput, cpu_cell) = if bulk {
                (
                    format!("{m:.2} Gbit/s"),
                    cell(&cpus, |c| format!("{c:.3} s/GB")),
                )
            } else {
                (
                    format!("{} /s", thousands(m)),
                    cell(&cpus, |c| format!("{c:.1} µs")),
                )
            };
            let bold = if *target == "squire" { "**" } else { "" };
            let _ = writeln!(
                table,
                "| {title} | {bold}{target}{bold} | {throughput} | {} | {} | {} | {} | {} | {cpu_cell} | {} | {} | {errors:.0} |",
                pct(spread(&rates)),
                ratio(m, direct),
                ratio(m, nginx),
                if bulk { "-".into() } else { format!("{p50:.0}") },
                if bulk { "-".into() } else { format!("{p99:.0}") },
                if cpus.is_empty() { "-".into() } else { pct(spread(&cpus)) },
                if cpus.is_empty() { "-".into() } else { ratio(median(&cpus), nginx_cpu) },
            );
        }
    }
    if !spreads.is_empty() {
        let _ = writeln!(
            out,
            "- run-to-run spread of throughput ((max - min) / median over the repetitions): \
             median {}, worst {}",
            pct(median(&spreads)),
            pct(spreads.iter().cloned().fold(0.0, f64::max)),
        );
    }
    out.push('\n');
    out.push_str(&table);

    let mut memory = String::new();
    for proxy in PROXIES {
        let v = |key: &str| median(&values(&runs, "memory", proxy, key));
        // The proxies run for the whole benchmark and keep what they
        // allocated, so only the first repetition starts from a true idle RSS.
        let first = |key: &str| {
            runs.get(&("memory".to_owned(), proxy.to_string()))
                .into_iter()
                .flatten()
                .find(|f| f.get("rep") == Some(&1.0))
                .map_or(f64::NAN, |f| get(f, key))
        };
        if values(&runs, "memory", proxy, "conns").is_empty() {
            continue;
        }
        let _ = writeln!(
            memory,
            "| {proxy} | {:.1} MiB | {:.1} MiB | {:.0} | {:.2} KiB | {:.1} MiB | {:.1} MiB | {:.1} s | {:.0} / {:.0} / {:.0} ms | {:.0} | {:.0} |",
            first("rss_idle_kib") / 1024.0,
            first("rss_held_kib") / 1024.0,
            first("conns"),
            first("kib_per_conn"),
            first("rss_after_kib") / 1024.0,
            first("rss_settled_kib") / 1024.0,
            v("open_secs"),
            v("burst_p50_ms"),
            v("burst_p99_ms"),
            v("burst_max_ms"),
            v("burst_delayed"),
            values(&runs, "memory", proxy, "errors").iter().sum::<f64>(),
        );
    }
    if !memory.is_empty() {
        out.push_str(
            "\nMemory: the RSS columns are the first repetition's (the proxies run for the whole \
             benchmark and keep what they allocated); the rest are medians over the repetitions.\n\
             \n| Proxy | RSS idle | RSS holding | idle proxied conns | per conn | RSS 2 s after close \
             | 10 s after | time to open them | burst of 1,000 connects p50 / p99 / max | of them ≥ 0.9 s | errors |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        out.push_str(&memory);
    }
    Ok(out)
}

fn values(
    runs: &BTreeMap<(String, String), Vec<Fields>>,
    kind: &str,
    target: &str,
    key: &str,
) -> Vec<f64> {
    runs.get(&(kind.to_owned(), target.to_owned()))
        .into_iter()
        .flatten()
        .filter_map(|f| f.get(key).copied())
        .collect()
}

fn get(fields: &Fields, key: &str) -> f64 {
    fields.get(key).copied().unwrap_or(f64::NAN)
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// (max - min) / median.
fn spread(v: &[f64]) -> f64 {
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    let min = v.iter().cloned().fold(f64::MAX, f64::min);
    (max - min) / median(v)
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.0}%", x * 100.0)
    } else {
        "-".into()
    }
}

fn ratio(x: f64, of: f64) -> String {
    if x.is_finite() && of.is_finite() && of > 0.0 {
        format!("{:.2}", x / of)
    } else {
        "-".into()
    }
}

fn cell(v: &[f64], show: impl Fn(f64) -> String) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        show(median(v))
    }
}

fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
