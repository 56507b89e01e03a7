//! The stats page as an operator sees it, in a real browser: Debian's
//! headless chromium loads `http://127.0.0.1:8404/` (inside the test's
//! network namespace) while a handover is under way, with the old generation
//! held draining by an open client connection. The DOM chromium built must
//! show the instance name, the banner (from an environment variable, through
//! `${STATS_BANNER:-...}` interpolation) and both generations: the new one
//! active, the old one draining. A screenshot is kept in the sandbox folder.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use proxy_harness::{
    Backend, Held, Load, LoadSpec, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, Signal,
    chromium::{require_chromium, run_chromium},
    config::{STATS_ADDR, config_text},
    http_get::http_get_ok,
    next_id,
    process::tail,
    report,
    status::StatsJson,
};

/// The banner, set in the proxy's environment only.
const BANNER: &str = "Blue-green drill 7f3a: generation handover in progress";
/// Bound on one chromium run.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(45);

#[test]
fn operator_stats_browser() {
    // Fail before setting anything up when the browser is missing.
    require_chromium();
    let (sb, rt) = Sandbox::with_runtime("op-browser");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let text = config_text(
        &sb,
        &ProxyConfig::draining("20s"),
        "",
        "[stats]\nbanner = \"${STATS_BANNER:-no banner set}\"\n",
    );
    let cfg = sb.write_file("proxy.toml", &text);
    let env = [("STATS_BANNER", BANNER)];

    // Generation 1 serves traffic for a little over one history interval,
    // so that the chart has points.
    let mut gen1 = Proxy::start(&sb, &cfg, &env);
    let g1 = gen1.wait_active(&sb, Duration::from_secs(10)).generation;
    let load = Load::start(&rt, LoadSpec::new(300.0, Duration::from_secs(10)));
    load.wait_ok(100, Duration::from_secs(10));
    let chart_deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let json = stats_json();
        if json
            .history
            .iter()
            .any(|s| s.generation == g1 && !s.points.is_empty())
        {
            break;
        }
        assert!(
            Instant::now() < chart_deadline,
            "no history point for generation {g1} after several seconds: {:?}",
            json.history
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let lr = load.finish(&rt);
    lr.assert_clean("traffic through generation 1");

    // A client holds a connection on generation 1: it will stay draining.
    let held = rt.block_on(Held::open(PROXY_ADDR, next_id()));
    sb.wait_status(
        "the held connection open in generation 1",
        Duration::from_secs(5),
        |st| st.generation(g1).is_some_and(|g| g.active_conns == 1),
    );
    let mut gen2 = Proxy::start(&sb, &cfg, &env);
    let g2 = gen2.wait_active(&sb, Duration::from_secs(10)).generation;
    sb.wait_status("generation 1 draining", Duration::from_secs(5), |st| {
        st.generation(g1).is_some_and(|g| g.state == "draining")
    });

    // What the server says, for the messages.
    let json = stats_json();
    assert_eq!(json.banner, BANNER, "the banner came from the environment");

    // The browser.
    let url = format!("http://{STATS_ADDR}/");
    let run = run_chromium(
        &sb.dir,
        &["--dump-dom".to_string(), url.clone()],
        BROWSER_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("chromium --dump-dom {url}: {e}"));
    assert!(
        run.status.success(),
        "chromium --dump-dom exited with {}; stderr tail:\n{}",
        run.status,
        tail(&run.stderr, 20)
    );
    let dom = run.stdout;
    sb.write_file("stats-dom.html", &dom);
    report(
        &sb,
        &format!(
            "operator_stats_browser: chromium rendered {url} in {:.2?} ({} bytes of DOM)",
            run.took,
            dom.len()
        ),
    );
    // Still the same situation after the browser ran (20 s of hard stop
    // leave plenty of room): the page showed gen 1 draining.
    let st = sb.status();
    assert!(
        st.generation(g1).is_some_and(|g| g.state == "draining") && st.is_serving(g2),
        "generation 1 must still be draining and 2 active after the browser ran: {st:#?}"
    );

    check_dom(&dom, &sb.name, g1, g2, &json);

    // Once more for a screenshot of the page, kept in the sandbox folder.
    let png = sb.dir.join("stats.png");
    let run = run_chromium(
        &sb.dir,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1200,1000".to_string(),
            "--hide-scrollbars".to_string(),
            url.clone(),
        ],
        BROWSER_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("chromium --screenshot {url}: {e}"));
    assert!(
        run.status.success(),
        "chromium --screenshot exited with {}; stderr tail:\n{}",
        run.status,
        tail(&run.stderr, 20)
    );
    check_png(&png, 1200, 1000);
    report(
        &sb,
        &format!(
            "operator_stats_browser: screenshot {} (kept with PROXY_IT_KEEP=1)",
            png.display()
        ),
    );

    // The held connection completes through the draining generation, which
    // then exits by itself.
    rt.block_on(held.finish(Duration::from_secs(5)))
        .expect("the held connection completes on the draining generation");
    let exit = gen1.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "generation {g1} exited with {exit}");
    gen2.signal(Signal::Usr1);
    let exit = gen2.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "generation {g2} exited with {exit}");
}

fn stats_json() -> StatsJson {
    let (r, _) = http_get_ok(STATS_ADDR, "/stats.json", Duration::from_secs(5));
    serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("/stats.json does not parse ({e}):\n{}", r.body))
}

/// The assertions on the DOM chromium serialized.
fn check_dom(dom: &str, instance: &str, g1: u64, g2: u64, json: &StatsJson) {
    let context = || format!("server-side view: {json:#?}\nDOM:\n{dom}");
    // The parser's own work: tables get a <tbody>, which the server never
    // sends; so this is the browser's DOM, not the raw page.
    assert!(
        dom.contains("<tbody>"),
        "the DOM has no <tbody>: not a browser-built DOM?\n{}",
        context()
    );
    let h1 =
        element(dom, "instance").unwrap_or_else(|| panic!("no id=\"instance\"\n{}", context()));
    assert!(
        h1.contains(&format!("<b>{instance}</b>")),
        "the title names instance {instance}: {h1}"
    );
    let banner =
        element(dom, "banner").unwrap_or_else(|| panic!("no id=\"banner\"\n{}", context()));
    assert!(
        banner.contains(BANNER),
        "the banner shows {BANNER:?}: {banner}"
    );
    assert!(
        dom.contains("<title>proxy ") && dom.contains(" stats</title>"),
        "page title\n{}",
        context()
    );

    // The generations table: one row per generation.
    let table = element(dom, "generations")
        .unwrap_or_else(|| panic!("no id=\"generations\" table\n{}", context()));
    let rows = generation_rows(table);
    let row = |g: u64| {
        rows.iter()
            .find(|r| r.generation == g)
            .unwrap_or_else(|| panic!("no row for generation {g} in {rows:#?}\n{}", context()))
    };
    let (old, new) = (row(g1), row(g2));
    assert_eq!(new.state, "active", "generation {g2} row: {new:?}");
    assert!(
        new.class.split_whitespace().any(|c| c == "active"),
        "the active generation's row has class active: {new:?}"
    );
    assert!(
        new.cells.iter().any(|c| c == "active"),
        "the active row's state cell says active: {new:?}"
    );
    assert_eq!(old.state, "draining", "generation {g1} row: {old:?}");
    assert!(
        !old.class.split_whitespace().any(|c| c == "active"),
        "the draining generation is not marked active: {old:?}"
    );
    assert!(
        old.cells.iter().any(|c| c.contains("draining")),
        "the draining row says so: {old:?}"
    );
    assert_eq!(
        rows.iter().filter(|r| r.class.contains("active")).count(),
        1,
        "exactly one active row: {rows:#?}"
    );

    // The chart (an SVG once there is history), and the other tables.
    assert!(
        dom.contains("<svg id=\"chart\""),
        "a chart of new connections (generation {g1} had history points)\n{}",
        context()
    );
    assert!(
        dom.contains(&format!("gen {g1}")),
        "the chart names generation {g1}\n{}",
        context()
    );
    for id in ["listeners", "servers", "ebpf"] {
        assert!(
            dom.contains(&format!("id=\"{id}\"")),
            "no id=\"{id}\" table\n{}",
            context()
        );
    }
    let listeners = element(dom, "listeners").expect("listeners table");
    assert!(listeners.contains(">front<"), "listener front: {listeners}");
}

/// A `<tr data-generation=...>` row of the generations table.
#[derive(Debug)]
struct Row {
    generation: u64,
    state: String,
    class: String,
    cells: Vec<String>,
}

fn generation_rows(table: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut rest = table;
    while let Some(at) = rest.find("<tr") {
        let tag_end = rest[at..].find('>').map(|e| at + e).unwrap_or(rest.len());
        let tag = &rest[at..tag_end];
        let row_end = rest[at..]
            .find("</tr>")
            .map(|e| at + e)
            .unwrap_or(rest.len());
        let body = &rest[tag_end.min(row_end)..row_end];
        if let Some(g) = attr(tag, "data-generation") {
            rows.push(Row {
                generation: g
                    .parse()
                    .unwrap_or_else(|_| panic!("data-generation {g:?}")),
                state: attr(tag, "data-state").unwrap_or_default(),
                class: attr(tag, "class").unwrap_or_default(),
                cells: body
                    .split("<td")
                    .skip(1)
                    .map(|c| strip_tags(&format!("<td{c}")))
                    .collect(),
            });
        }
        rest = &rest[row_end.min(rest.len())..];
        if rest.starts_with("</tr>") {
            rest = &rest[5..];
        } else if rest.is_empty() || row_end == at {
            break;
        }
    }
    rows
}

/// `name="value"` of a start tag.
fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    let end = tag[at..].find('"')?;
    Some(tag[at..at + end].to_string())
}

fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.trim().to_string()
}

/// The element with `id="<id>"`, from its start tag to the matching end tag
/// of the same name (no nesting of the same tag name in what we look at,
/// except tables, whose inner tables we do not have).
fn element<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let needle = format!("id=\"{id}\"");
    let at = dom.find(&needle)?;
    let start = dom[..at].rfind('<')?;
    let name: String = dom[start + 1..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let end_tag = format!("</{name}>");
    let end = dom[start..].find(&end_tag)? + start + end_tag.len();
    Some(&dom[start..end])
}

/// A PNG of the window size.
fn check_png(path: &Path, width: u32, height: u32) {
    let data = std::fs::read(path)
        .unwrap_or_else(|e| panic!("chromium wrote no screenshot at {}: {e}", path.display()));
    assert!(
        data.len() > 24 && data.starts_with(b"\x89PNG\r\n\x1a\n") && &data[12..16] == b"IHDR",
        "{} is not a PNG",
        path.display()
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let (w, h) = (be(&data[16..20]), be(&data[20..24]));
    assert_eq!(
        (w, h),
        (width, height),
        "screenshot size of {}",
        path.display()
    );
    assert!(
        data.len() > 10_000,
        "a screenshot of a page, not a blank: {} bytes",
        data.len()
    );
}
