//! The report from synthetic runs written with the `records` writers.

use std::{collections::BTreeMap, fs, path::PathBuf};

use super::{plots, svg, *};
use crate::records::{
    CONNS_HEADER, ConnRecord, Event, GenSample, KernelFigures, Kind, RunInfo, write_conns,
    write_events, write_generations, write_run,
};

/// A temporary output folder, removed when the test ends (even failing).
struct TempOut(PathBuf);

impl TempOut {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("proxy-lab-report-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempOut(dir)
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn conn(start_us: u64, connect_us: Option<u64>, class: Class) -> ConnRecord {
    ConnRecord {
        start_us,
        connect_us,
        total_us: connect_us.unwrap_or(0) + 500,
        kind: Kind::Short,
        class,
    }
}

fn event(t_us: u64, name: &str, detail: &str) -> Event {
    Event {
        t_us,
        event: name.into(),
        detail: detail.into(),
    }
}

fn info(mode: &str, scenario: &str) -> RunInfo {
    RunInfo {
        mode: mode.into(),
        scenario: scenario.into(),
        rate: 100.0,
        mix: "short=100".into(),
        handovers: 2,
        interval_ms: 1000,
        duration_ms: 3000,
        ..RunInfo::default()
    }
}

/// Writes one run; `generations` None leaves generations.csv out.
fn write_run_dir(
    out: &Path,
    info: &RunInfo,
    conns: &[ConnRecord],
    events: &[Event],
    generations: Option<&[GenSample]>,
) -> PathBuf {
    let dir = out.join(&info.mode).join(&info.scenario);
    fs::create_dir_all(&dir).unwrap();
    write_run(&dir.join("run.json"), info).unwrap();
    if info.skipped.is_none() {
        write_conns(&dir.join("conns.csv"), conns).unwrap();
        write_events(&dir.join("events.csv"), events).unwrap();
        if let Some(g) = generations {
            write_generations(&dir.join("generations.csv"), g).unwrap();
        }
    }
    dir
}

/// 100 connections 10 ms apart connecting in 1..=100 ms, except: #3
/// refused, #5 connected then reset after its request, #7 timed out
/// connecting, #50 and #60 took 1 s and 3 s to connect (retransmitted SYNs).
fn rolling_conns() -> Vec<ConnRecord> {
    (1..=100u64)
        .map(|i| {
            let start = (i - 1) * 10_000;
            match i {
                3 => conn(start, None, Class::Refused),
                5 => conn(start, Some(5_000), Class::ResetAfterRequest),
                7 => conn(start, None, Class::Timeout),
                50 => conn(start, Some(1_000_000), Class::Ok),
                60 => conn(start, Some(3_000_000), Class::Ok),
                _ => conn(start, Some(i * 1000), Class::Ok),
            }
        })
        .collect()
}

fn rolling_events() -> Vec<Event> {
    vec![
        event(200_000, "handover", "generation 2"),
        event(210_000, "ready", "generation 2"),
        event(500_000, "sigstop", "pid 42"),
        event(600_000, "handover", "generation 3 <&\"quoted\">"),
        event(700_000, "kill", "pid 42"),
    ]
}

fn generations() -> Vec<GenSample> {
    let s = |t_us, generation, accepted| GenSample {
        t_us,
        generation,
        accepted,
    };
    vec![
        s(0, 1, 0),
        s(500_000, 1, 50),
        s(1_000_000, 1, 60),
        s(500_000, 2, 0),
        s(1_000_000, 2, 45),
        s(1_500_000, 2, 95),
    ]
}

/// A tag-stack scan: one `<svg>` root, every tag closed in order,
/// attribute values quoted, every `&` an entity.
fn assert_well_formed(doc: &str) {
    fn check_entities(s: &str, doc_part: &str) {
        for (i, _) in s.match_indices('&') {
            let rest = &s[i..];
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|e| rest.starts_with(e));
            assert!(ok, "a bare & in {doc_part:?}");
        }
    }
    let mut stack: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut rest = doc;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        check_entities(text, text);
        assert!(
            stack.is_empty() <= text.trim().is_empty(),
            "text outside the root: {text:?}"
        );
        let close = rest[open..].find('>').expect("a tag without its >") + open;
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "a < inside the tag {tag:?}");
        check_entities(tag, tag);
        if let Some(decl) = tag.strip_prefix('?') {
            assert!(decl.ends_with('?') && roots == 0, "declaration {tag:?}");
        } else if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop(), Some(name.trim()), "closing tag {tag:?}");
        } else {
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in {tag:?}"
            );
            let name = tag
                .split(|c: char| c.is_whitespace() || c == '/')
                .next()
                .unwrap();
            assert!(!name.is_empty(), "a tag without a name: {tag:?}");
            if stack.is_empty() {
                assert_eq!(name, "svg", "the root");
                roots += 1;
            }
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        rest = &rest[close + 1..];
    }
    assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
    assert!(stack.is_empty(), "unclosed tags: {stack:?}");
    assert_eq!(roots, 1, "one root element");
}

fn count_class(doc: &str, class: &str) -> usize {
    doc.matches(&format!("class=\"{class}\"")).count()
}

#[test]
fn percentiles_are_nearest_rank() {
    let v: Vec<u64> = (1..=100).collect();
    assert_eq!(percentile(&v, 50.0), Some(50));
    assert_eq!(percentile(&v, 99.0), Some(99));
    assert_eq!(percentile(&[7], 99.0), Some(7));
    assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
    assert_eq!(percentile(&[], 50.0), None);
}

#[test]
fn summary_figures_from_a_run() {
    let out = TempOut::new("figures");
    let mut info = info("ebpf", "rolling");
    info.kernel = KernelFigures {
        counters: BTreeMap::from([
            ("ListenOverflows".to_string(), 4),
            ("TcpExt:ListenDrops".to_string(), 5),
            ("TCPMigrateReqSuccess".to_string(), 6),
            ("TCPMigrateReqFailure".to_string(), 0),
            ("TCPSynRetrans".to_string(), 2),
            ("OutRsts".to_string(), 1),
        ]),
        program: Some(serde_json::json!({"selected": [90, 10]})),
    };
    info.notes.insert("rollbacks".into(), "0 | none".into());
    write_run_dir(
        &out.0,
        &info,
        &rolling_conns(),
        &rolling_events(),
        Some(&generations()),
    );

    let summary = build(&out.0).unwrap();
    assert_eq!(summary.runs.len(), 1);
    let r = &summary.runs[0];
    assert_eq!((r.mode.as_str(), r.scenario.as_str()), ("ebpf", "rolling"));
    assert_eq!(r.skipped, None);
    assert_eq!(r.connections, 100);
    assert_eq!(r.ok, 97);
    let failed: BTreeMap<&str, u64> = r.failed.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        failed,
        BTreeMap::from([
            ("refused", 1),
            ("reset_before_request", 0),
            ("reset_after_request", 1),
            ("timeout", 1),
            ("truncated", 0),
        ]),
        "every non-ok class, 0 included"
    );
    assert_eq!(r.failed_total(), 3);
    // 98 connected: 1..=100 ms without #3 and #7, #5 at 5 ms (as it was),
    // #50 at 1 s and #60 at 3 s. Sorted, the 49th (p50) is 52 ms (1..=49 ms
    // less 3 and 7 are 47 values, then 51, 52 ...), the 98th (p99) 3 s.
    assert_eq!(r.connect_p50_us, Some(52_000));
    assert_eq!(r.connect_p99_us, Some(3_000_000));
    assert_eq!(r.connect_max_us, Some(3_000_000));
    assert_eq!(r.slow_connects, 2, "1 s and 3 s");
    // 100 connections over 0.99 s of starts.
    assert!(
        (r.rate_achieved - 100.0 / 0.99).abs() < 1e-6,
        "{}",
        r.rate_achieved
    );
    assert_eq!(r.handovers, 2);
    assert!(!r.notes.contains_key("handovers_planned"));
    assert_eq!(r.kernel.get("ListenOverflows"), Some(&4));
    assert_eq!(r.program, info.kernel.program);

    // The files, and summary.json reads back as what build returned.
    let json = fs::read_to_string(out.0.join("summary.json")).unwrap();
    let mut back: Summary = serde_json::from_str(&json).unwrap();
    // serde_json's default float parsing may differ in the last bit.
    assert!((back.runs[0].rate_achieved - r.rate_achieved).abs() < 1e-9);
    back.runs[0].rate_achieved = r.rate_achieved;
    assert_eq!(back, summary);
    let md = fs::read_to_string(out.0.join("summary.md")).unwrap();
    let expected = "| ebpf | rolling | 100 | 97 | 3 | 1 | 0 | 1 | 1 | 0 | 52.00 / 3000.00 / 3000.00 \
                    | 2 | 4 | 5 | 6/0 | 2 | 1 | rollbacks=0 \\| none |";
    assert!(
        md.contains(expected),
        "expected the row\n{expected}\nin\n{md}"
    );
    assert!(
        md.contains(&markdown(&summary)),
        "summary.md holds the table"
    );
    assert!(md.contains("connects ≥ 1 s"), "legend:\n{md}");
    let dir = out.0.join("ebpf/rolling");
    assert!(dir.join("connect.svg").exists() && dir.join("generations.svg").exists());
}

#[test]
fn skipped_runs_and_order() {
    let out = TempOut::new("order");
    let conns = vec![
        conn(0, Some(100), Class::Ok),
        conn(1000, Some(200), Class::Ok),
    ];
    let mut skipped = info("haproxy-sf", "canary");
    skipped.skipped = Some("no canary with HAProxy".into());
    write_run_dir(&out.0, &skipped, &[], &[], None);
    for (mode, scenario) in [
        ("zz-other", "rolling"),
        ("reuseport", "rolling"),
        ("haproxy-sf", "rolling"),
        ("ebpf", "migrate-established"),
        ("ebpf", "rolling"),
        ("ebpf", "another"),
        ("reuseport+migrate", "rolling"),
        ("aa-other", "rolling"),
    ] {
        let mut i = info(mode, scenario);
        i.handovers = 0;
        write_run_dir(&out.0, &i, &conns, &[], None);
    }
    // Not runs: a stray file and an empty folder.
    fs::write(out.0.join("notes.txt"), "x").unwrap();
    fs::create_dir_all(out.0.join("ebpf/empty")).unwrap();

    let summary = build(&out.0).unwrap();
    let order: Vec<String> = summary
        .runs
        .iter()
        .map(|r| format!("{}/{}", r.mode, r.scenario))
        .collect();
    assert_eq!(
        order,
        [
            "ebpf/rolling",
            "ebpf/migrate-established",
            "ebpf/another",
            "reuseport/rolling",
            "reuseport+migrate/rolling",
            "haproxy-sf/rolling",
            "haproxy-sf/canary",
            "aa-other/rolling",
            "zz-other/rolling",
        ]
    );
    let s = summary.runs.iter().find(|r| r.skipped.is_some()).unwrap();
    assert_eq!((s.connections, s.ok, s.failed_total()), (0, 0, 0));
    assert_eq!(s.failed.len(), 5, "all the classes, at 0");
    assert_eq!(s.connect_p50_us, None);
    let md = markdown(&summary);
    let row = md
        .lines()
        .find(|l| l.starts_with("| haproxy-sf | canary |"))
        .unwrap();
    assert!(row.contains("skipped: no canary with HAProxy"), "{row}");
    assert_eq!(row.matches(" | ").count(), 17, "18 cells: {row}");
    let skipped_dir = out.0.join("haproxy-sf/canary");
    assert!(
        !skipped_dir.join("connect.svg").exists(),
        "no plots for a skipped run"
    );
    // No kernel counters: the dash, not 0.
    let plain = md
        .lines()
        .find(|l| l.starts_with("| ebpf | rolling |"))
        .unwrap();
    assert!(
        plain.contains("| 0.10 / 0.20 / 0.20 | 0 | – | – | – | – | – |"),
        "{plain}"
    );
}

#[test]
fn handovers_differing_from_the_plan_are_noted() {
    let out = TempOut::new("planned");
    let i = info("reuseport", "rolling"); // 2 planned
    write_run_dir(
        &out.0,
        &i,
        &[conn(0, Some(100), Class::Ok)],
        &[event(5, "handover", "")],
        None,
    );
    let summary = build(&out.0).unwrap();
    assert_eq!(summary.runs[0].handovers, 1);
    assert_eq!(summary.runs[0].notes["handovers_planned"], "2");
}

#[test]
fn svgs_are_well_formed_with_one_mark_per_event() {
    let out = TempOut::new("svg");
    let events = rolling_events();
    let dir = write_run_dir(
        &out.0,
        &info("ebpf", "rolling"),
        &rolling_conns(),
        &events,
        Some(&generations()),
    );
    build(&out.0).unwrap();
    for name in ["connect.svg", "generations.svg"] {
        let doc = fs::read_to_string(dir.join(name)).unwrap();
        assert_well_formed(&doc);
        assert!(doc.contains("ebpf / rolling"), "{name}: the title");
        assert_eq!(
            count_class(&doc, "ev-handover"),
            2,
            "{name}: handover marks"
        );
        assert_eq!(count_class(&doc, "ev-sigstop"), 1, "{name}: sigstop mark");
        assert_eq!(count_class(&doc, "ev-kill"), 1, "{name}: kill mark");
        assert_eq!(
            count_class(&doc, "ev-ready"),
            0,
            "{name}: ready is not drawn"
        );
        assert!(
            doc.contains("generation 3 &lt;&amp;&quot;quoted&quot;&gt;"),
            "{name}: escaped"
        );
        assert!(
            !doc.contains("url(") && !doc.contains("<style"),
            "{name}: self-contained"
        );
    }
    let connect = fs::read_to_string(dir.join("connect.svg")).unwrap();
    assert_eq!(
        connect.matches("<circle").count(),
        98 + 2,
        "98 dots and 2 legend dots"
    );
    assert_eq!(
        count_class(&connect, "failed"),
        3,
        "3 failed marks along the top"
    );
    assert_eq!(count_class(&connect, "failed-connected"), 1);
    assert!(connect.contains("connect time (ms, log scale)"));
    for tick in [">1<", ">10<", ">100<", ">1000<"] {
        assert!(connect.contains(tick), "a y tick {tick}");
    }
    let gens = fs::read_to_string(dir.join("generations.svg")).unwrap();
    assert_eq!(count_class(&gens, "gen"), 2, "one line per generation");
    assert!(gens.contains(">gen 1<") && gens.contains(">gen 2<"));
}

#[test]
fn generation_rates_from_cumulative_samples() {
    let samples = generations();
    let view = plots::RunView {
        title: "m / s".into(),
        conns: &[],
        events: &[],
        generations: &samples,
        duration_us: 2_000_000,
    };
    let doc = plots::generations_svg(&view);
    assert_well_formed(&doc);
    // gen 1: 100/s then 20/s; gen 2: 90/s then 100/s; the y axis to 100.
    let rates = plots::generation_rates(&samples);
    assert_eq!(
        rates,
        vec![
            (1, vec![(0.25, 100.0), (0.75, 20.0)]),
            (2, vec![(0.75, 90.0), (1.25, 100.0)]),
        ]
    );
}

#[test]
fn no_generations_gives_a_message() {
    let out = TempOut::new("nogen");
    let events = rolling_events();
    let dir = write_run_dir(
        &out.0,
        &info("haproxy-x", "rolling"),
        &rolling_conns(),
        &events,
        None,
    );
    build(&out.0).unwrap();
    let doc = fs::read_to_string(dir.join("generations.svg")).unwrap();
    assert_well_formed(&doc);
    assert!(doc.contains(plots::NO_GENERATIONS), "{doc}");
    // An empty file (no header even) reads as no samples.
    fs::write(dir.join("generations.csv"), "").unwrap();
    build(&out.0).unwrap();
    let doc = fs::read_to_string(dir.join("generations.svg")).unwrap();
    assert!(doc.contains(plots::NO_GENERATIONS), "{doc}");
}

#[test]
fn downsampling_keeps_slow_and_failed_points() {
    let records: Vec<ConnRecord> = (0..50_000u64)
        .map(|i| {
            if i % 1000 == 7 {
                conn(i, Some(plots::SLOW_POINT_US), Class::Ok)
            } else if i % 999 == 1 {
                conn(i, Some(50), Class::ResetAfterRequest)
            } else {
                conn(i, Some(50 + i % 100), Class::Ok)
            }
        })
        .collect();
    let refs: Vec<&ConnRecord> = records.iter().collect();
    let keep = plots::downsample(&refs, plots::MAX_POINTS);
    assert!(keep.len() < records.len());
    let special: Vec<usize> = (0..records.len())
        .filter(|&i| {
            records[i].connect_us.unwrap() >= plots::SLOW_POINT_US || records[i].class != Class::Ok
        })
        .collect();
    assert!(special.len() > 90);
    assert!(
        special.iter().all(|i| keep.binary_search(i).is_ok()),
        "every slow and failed point kept"
    );
    assert!(
        keep.len() <= plots::MAX_POINTS + special.len(),
        "{} kept",
        keep.len()
    );
    assert_eq!(
        keep,
        plots::downsample(&refs, plots::MAX_POINTS),
        "deterministic"
    );
    let few = &refs[..100];
    assert_eq!(plots::downsample(few, plots::MAX_POINTS).len(), 100);

    // And in the plot: the dots drawn, the subtitle says so.
    let view = plots::RunView {
        title: "m / s".into(),
        conns: &records,
        events: &[],
        generations: &[],
        duration_us: 0,
    };
    let doc = plots::connect_svg(&view);
    assert_well_formed(&doc);
    assert!(
        doc.contains(&format!("{} dots drawn", keep.len())),
        "subtitle"
    );
}

#[test]
fn a_malformed_csv_names_the_file_and_line() {
    let out = TempOut::new("bad");
    let dir = write_run_dir(
        &out.0,
        &info("ebpf", "rolling"),
        &rolling_conns(),
        &rolling_events(),
        None,
    );
    fs::write(
        dir.join("conns.csv"),
        format!("{CONNS_HEADER}\n0,100,200,short,ok\n1000,x,200,short,ok\n"),
    )
    .unwrap();
    let e = format!("{:#}", build(&out.0).unwrap_err());
    assert!(
        e.contains("conns.csv:3") && e.contains("connect_us"),
        "the file and line: {e}"
    );

    fs::write(
        dir.join("conns.csv"),
        format!("{CONNS_HEADER}\n0,100,200,short,ok\n"),
    )
    .unwrap();
    fs::write(dir.join("events.csv"), "t_us,event,detail\n5,handover\n").unwrap();
    let e = format!("{:#}", build(&out.0).unwrap_err());
    assert!(e.contains("events.csv:2"), "{e}");

    fs::remove_file(dir.join("events.csv")).unwrap();
    let e = format!("{:#}", build(&out.0).unwrap_err());
    assert!(e.contains("events.csv"), "a missing file is named: {e}");

    fs::write(dir.join("run.json"), "{ not json").unwrap();
    let e = format!("{:#}", build(&out.0).unwrap_err());
    assert!(e.contains("run.json"), "{e}");
}

#[test]
fn svg_writer_escapes_and_ticks() {
    assert_eq!(svg::escape(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&apos;");
    let lin = svg::Scale::Linear { lo: 0.0, hi: 10.0 };
    assert_eq!(lin.ticks(), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
    let log = svg::Scale::Log {
        lo: 0.01,
        hi: 1000.0,
    };
    assert_eq!(log.ticks().len(), 6);
    assert_eq!(svg::nice_max(93.0), 100.0);
    let mut chart = svg::Chart::new("a <b>", "", lin, log);
    chart.axes("x", "y", |v| v.to_string(), |v| v.to_string());
    chart.vline(5.0, svg::Pen::new("#000").class("ev-handover"), Some("t<"));
    let doc = chart.finish(&[(svg::Swatch::Dot(svg::Pen::new("#f00")), "&".into())]);
    assert_well_formed(&doc);
    assert_eq!(count_class(&doc, "ev-handover"), 1);
}
