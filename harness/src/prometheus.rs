//! Prometheus text format, parsed by Python's `prometheus_client`: the
//! reference parser is the referee of the metrics test, not ours.

use std::{
    collections::BTreeMap,
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use serde::Deserialize;

use crate::process::wait_bounded;

/// A metric family as `prometheus_client` parsed it (counter families
/// are named without `_total`; their samples keep it).
#[derive(Clone, Debug, Deserialize)]
pub struct PromFamily {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub help: String,
    pub samples: Vec<PromSample>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PromSample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

const PROM_PARSER: &str = r#"
import json, sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    print("prometheus_client is missing (%s): pip install prometheus-client" % e, file=sys.stderr)
    sys.exit(3)
out = []
for i, text in enumerate(json.load(sys.stdin)):
    try:
        fams = [
            {"name": f.name, "type": f.type, "help": f.documentation,
             "samples": [{"name": s.name, "labels": s.labels, "value": float(s.value)} for s in f.samples]}
            for f in text_string_to_metric_families(text)
        ]
    except Exception as e:
        print("scrape %d does not parse: %r" % (i, e), file=sys.stderr)
        sys.exit(4)
    out.append(fams)
json.dump(out, sys.stdout, allow_nan=False)
"#;

/// Parses each exposition in `texts` with `prometheus_client` (one
/// `python3` run for all of them). Panics if python3 or the module is
/// missing ("pip install prometheus-client"), or if a text does not parse.
pub fn parse_prometheus(texts: &[String]) -> Vec<Vec<PromFamily>> {
    let mut child = match Command::new("python3")
        .arg("-c")
        .arg(PROM_PARSER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run python3 ({e}): the metrics test parses /metrics with Python's \
             prometheus_client: install python3, then pip install prometheus-client"
        ),
    };
    let input = serde_json::to_vec(texts).expect("texts as JSON");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = wait_bounded(
        child,
        Duration::from_secs(60),
        "python3 prometheus_client parser",
    );
    let _ = writer.join();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(3) => panic!(
            "{} (or, with Debian's python3: apt-get install python3-prometheus-client)",
            stderr.trim()
        ),
        _ => panic!(
            "prometheus_client could not parse /metrics ({}): {}",
            out.status,
            stderr.trim()
        ),
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the parser printed JSON we cannot read ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
