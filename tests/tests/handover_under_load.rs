//! Twenty generations replace each other while clients open ~2,500 new
//! connections per second: not one connection may fail, and every
//! generation's own `accepted` count must match what the eBPF steering
//! program says it sent there.

use std::time::{Duration, Instant};

use proxy_harness::{
    Backend, Load, LoadSpec, Proxy, ProxyConfig, Sandbox, Signal, Status, config::config_text,
    report,
};

/// Generations started in total (the first one plus 19 handovers).
const GENERATIONS: usize = 20;
/// New connections per second asked of the load generator.
const RATE: f64 = 2500.0;
/// Bound on the whole handover sequence.
const SEQUENCE_LIMIT: Duration = Duration::from_secs(60);

/// What one generation did, from its log and from the pinned counters.
#[derive(Debug)]
struct GenFigures {
    generation: u64,
    slot: u32,
    /// From its final `generation stopped` line.
    accepted: u64,
    /// `selected[slot]`: new connections the program steered to it.
    steered: u64,
    /// `migrated[slot]`: queued connections the kernel moved into it.
    migrated_in: u64,
    /// Connections migrated out of it, into its successor.
    migrated_out: u64,
}

/// Timings of one handover, from status polling (resolution: one `proxy
/// status` call, a few milliseconds).
#[derive(Debug, Default)]
struct Timings {
    spawn_to_flip: Option<Duration>,
    flip_to_first_conn: Option<Duration>,
    spawn_to_active: Option<Duration>,
    spawn_to_old_exit: Option<Duration>,
}

#[test]
fn handover_under_load() {
    handover_under_load_with("handover", "");
}

/// The same with `nbthread = 1`: every generation serves from one event
/// loop on its main thread, and hands over as the default does.
#[test]
fn handover_under_load_single_thread() {
    handover_under_load_with("handover1t", "nbthread = 1");
}

fn handover_under_load_with(name: &str, global_extra: &str) {
    let (sb, rt) = Sandbox::with_runtime(name);
    let backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_file(
        "proxy.toml",
        &config_text(&sb, &ProxyConfig::draining("10s"), global_extra, ""),
    );

    let mut current = Proxy::start(&sb, &cfg, &[]);
    current.wait_active(&sb, Duration::from_secs(10));
    if global_extra.contains("nbthread = 1") {
        let status = std::fs::read_to_string(format!("/proc/{}/status", current.pid)).unwrap();
        assert!(
            status.lines().any(|l| l == "Threads:\t1"),
            "nbthread = 1 runs on one thread; /proc status:\n{status}"
        );
    }
    let load = Load::start(
        &rt,
        LoadSpec::new(RATE, SEQUENCE_LIMIT + Duration::from_secs(10)),
    );
    // Traffic flows through generation 1 before the first handover.
    load.wait_ok(500, Duration::from_secs(10));

    let sequence_start = Instant::now();
    let mut figures: Vec<GenFigures> = Vec::new();
    let mut timings: Vec<(u64, Timings)> = Vec::new();
    // migrated[slot] of the current generation, read when its predecessor
    // had exited (final from then on: only the predecessor migrates into it).
    let mut current_migrated_in = 0u64;

    for _ in 1..GENERATIONS {
        assert!(
            sequence_start.elapsed() < SEQUENCE_LIMIT,
            "the handover sequence took longer than {SEQUENCE_LIMIT:?} after {} handovers",
            figures.len()
        );
        let spawned = Instant::now();
        let mut next = Proxy::start(&sb, &cfg, &[]);
        let mut t = watch_flip(&sb, &next, spawned);
        let next_id = next.wait_active(&sb, Duration::from_secs(10));
        t.spawn_to_active.get_or_insert(spawned.elapsed());

        // The old generation learns of the takeover from the maps alone.
        let exit = current.expect_exit(Duration::from_secs(15));
        assert!(
            exit.success(),
            "generation {} exited with {exit}; log:\n{}",
            current.generation(),
            current.log()
        );
        t.spawn_to_old_exit = Some(spawned.elapsed());

        // Read the old generation's counters now: its slot keeps them until
        // the next generation started after this one claims it.
        let st = sb.status();
        let old = record(&st, current.generation(), "just exited");
        assert_eq!(
            old.state, "stopped",
            "generation {} exited but its record says {:?}",
            old.generation, old.state
        );
        let new = record(&st, next_id.generation, "just became active");
        figures.push(GenFigures {
            generation: old.generation,
            slot: old.slot,
            accepted: current.final_accepted(),
            steered: old.steered,
            migrated_in: current_migrated_in,
            migrated_out: new.migrated_in,
        });
        // Sanity: the record's published count is the logged one.
        assert_eq!(
            old.accepted,
            current.final_accepted(),
            "generation {}: status record and final log line disagree on accepted",
            old.generation
        );
        assert_eq!(
            old.migrated_in, current_migrated_in,
            "generation {}: migrated[slot] changed after its predecessor exited",
            old.generation
        );
        current_migrated_in = new.migrated_in;
        timings.push((next_id.generation, t));
        current = next;
    }
    let sequence_time = sequence_start.elapsed();

    let load_report = load.finish(&rt);

    // The last generation: soft-stop it once the load is over (nothing is
    // queued any more, so nothing migrates out of it).
    current.signal(Signal::Usr1);
    let exit = current.expect_exit(Duration::from_secs(15));
    assert!(exit.success(), "last generation exited with {exit}");
    let st = sb.status();
    let last = record(&st, current.generation(), "soft-stopped last");
    figures.push(GenFigures {
        generation: last.generation,
        slot: last.slot,
        accepted: current.final_accepted(),
        steered: last.steered,
        migrated_in: current_migrated_in,
        migrated_out: 0,
    });

    // Figures first, so that they are printed even when an assert fails.
    report(
        &sb,
        &format!(
            "handover_under_load: {} connections in {:.2?} = {:.0} new conn/s (asked {RATE}), ok={} failed={}; \
             {} handovers in {sequence_time:.2?}; backend served={}",
            load_report.started,
            load_report.duration,
            load_report.rate(),
            load_report.ok,
            load_report.failed,
            GENERATIONS - 1,
            backend
                .stats
                .served
                .load(std::sync::atomic::Ordering::Relaxed),
        ),
    );
    for (generation, t) in &timings {
        report(
            &sb,
            &format!(
                "  gen {generation:>2}: spawn->flip {:>9.2?}  flip->first conn <= {:>9.2?}  spawn->active {:>9.2?}  spawn->old exit {:>9.2?}",
                t.spawn_to_flip.unwrap_or_default(),
                t.flip_to_first_conn.unwrap_or_default(),
                t.spawn_to_active.unwrap_or_default(),
                t.spawn_to_old_exit.unwrap_or_default(),
            ),
        );
    }
    for f in &figures {
        report(
            &sb,
            &format!(
                "  gen {:>2} slot {}: accepted {:>5} = steered {:>5} + migrated in {:>3} - migrated out {:>3}",
                f.generation, f.slot, f.accepted, f.steered, f.migrated_in, f.migrated_out
            ),
        );
    }
    let flips: Vec<Duration> = timings
        .iter()
        .filter_map(|(_, t)| t.flip_to_first_conn)
        .collect();
    if let Some(max) = flips.iter().max() {
        report(
            &sb,
            &format!(
                "  flip->first connection (upper bound, status polling): max {max:.2?}, mean {:.2?} over {} handovers",
                flips.iter().sum::<Duration>() / flips.len() as u32,
                flips.len()
            ),
        );
    }

    load_report.assert_clean("load during 19 handovers");
    assert!(
        load_report.rate() >= 2000.0,
        "expected at least 2,000 new connections/s, the load generator achieved {:.0}/s",
        load_report.rate()
    );
    for f in &figures {
        assert_eq!(
            f.accepted as i128,
            f.steered as i128 + f.migrated_in as i128 - f.migrated_out as i128,
            "generation {} (slot {}): accepted must equal steered + migrated in - migrated out: {f:?}",
            f.generation,
            f.slot
        );
    }
    let total_accepted: u64 = figures.iter().map(|f| f.accepted).sum();
    assert_eq!(
        total_accepted, load_report.started,
        "the generations accepted {total_accepted} connections in total, the clients opened {}",
        load_report.started
    );
    assert_eq!(
        st.counters.fallback_new, 0,
        "the steering program fell back to the kernel hash for new connections: {:?}",
        st.counters
    );
    assert_eq!(
        st.counters.fallback_migrate, 0,
        "the steering program fell back to the kernel hash for migrations: {:?}",
        st.counters
    );
    assert_eq!(figures.len(), GENERATIONS, "one record per generation");
}

fn record<'a>(st: &'a Status, generation: u64, what: &str) -> &'a proxy_harness::GenStatus {
    st.generation(generation).unwrap_or_else(|| {
        panic!("no status record for generation {generation} ({what}); status: {st:#?}")
    })
}

/// Polls status while `next` starts: when the active slot becomes its slot
/// (the flip), and when the program first steers a connection there.
/// Bounded by 10 s; stops once both are seen or `next` is active and
/// serving (then the first connection was not caught by polling).
fn watch_flip(sb: &Sandbox, next: &Proxy, spawned: Instant) -> Timings {
    let mut t = Timings::default();
    let mut flipped_at = None;
    let deadline = spawned + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(st) = sb.try_status() else {
            continue;
        };
        let now = Instant::now();
        // The record of `next`, by PID (it runs in our PID namespace).
        let Some(rec) = st.generations.iter().find(|g| g.pid == next.pid) else {
            continue;
        };
        if flipped_at.is_none() && st.active_slot == Some(rec.slot) {
            flipped_at = Some(now);
            t.spawn_to_flip = Some(now - spawned);
        }
        if let Some(flip) = flipped_at {
            if rec.steered + rec.migrated_in > 0 {
                t.flip_to_first_conn = Some(now - flip);
                break;
            }
            if rec.state == "active" && now - flip > Duration::from_secs(1) {
                break;
            }
        }
    }
    t
}
