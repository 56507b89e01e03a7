//! What the kernel of the run's network namespace counted: read from
//! `/proc/thread-self/net/{netstat,snmp}` on the thread that entered the
//! namespace (`/proc/self/net` would show the process's first thread's).

use std::{collections::BTreeMap, fs};

/// The counters the report shows, as `<table>:<name>`.
pub const COUNTERS: [(&str, &str); 6] = [
    ("TcpExt", "ListenOverflows"),
    ("TcpExt", "ListenDrops"),
    ("TcpExt", "TCPMigrateReqSuccess"),
    ("TcpExt", "TCPMigrateReqFailure"),
    ("TcpExt", "TCPSynRetrans"),
    ("Tcp", "OutRsts"),
];

/// Every `<Table>: name name ...` / `<Table>: value value ...` pair of a
/// /proc/net file, by `Table:name`.
fn parse(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((table, names)), Some((_, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse::<i64>() {
                out.insert(format!("{table}:{n}"), v.max(0) as u64);
            }
        }
    }
    out
}

/// The namespace's counters now.
pub fn snapshot() -> BTreeMap<String, u64> {
    let mut all = BTreeMap::new();
    for file in ["netstat", "snmp"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/thread-self/net/{file}")) {
            all.extend(parse(&text));
        }
    }
    COUNTERS
        .iter()
        .map(|(t, n)| {
            let key = format!("{t}:{n}");
            (n.to_string(), all.get(&key).copied().unwrap_or(0))
        })
        .collect()
}

/// `after - before`, per counter.
pub fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netstat_pairs_parse() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 12 13\n\
                    IpExt: InNoRoutes\nIpExt: 4\n";
        let m = parse(text);
        assert_eq!(m["TcpExt:ListenOverflows"], 12);
        assert_eq!(m["TcpExt:ListenDrops"], 13);
        assert_eq!(m["IpExt:InNoRoutes"], 4);
        // This kernel's own files hold every counter the report shows.
        let mut live = BTreeMap::new();
        for file in ["netstat", "snmp"] {
            live.extend(parse(
                &fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap(),
            ));
        }
        for (table, name) in COUNTERS {
            assert!(
                live.contains_key(&format!("{table}:{name}")),
                "{table}:{name} not in /proc"
            );
        }
    }
}
