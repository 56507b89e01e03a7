//! The four paths of the kernel's own `migrate_reuseport` selftest
//! (tools/testing/selftests/bpf/prog_tests/migrate_reuseport.c), reproduced
//! against our listeners and our handover instead of bare sockets: a
//! connection is made to wait on the old generation's listener in the state
//! the selftest puts it in, the contender hands over its own way (eBPF:
//! the maps, then the old generation's `shutdown()` after
//! `handover_grace`; reuseport: `-sf`, SIGUSR1, the same `shutdown()`),
//! and the case records whether each client still got its response, and
//! what the program and the kernel counted.
//!
//! # The cases
//!
//! - `migrate-established` (selftest: `TCP_ESTABLISHED inet_csk_listen_stop`):
//!   the old generation runs with `maxconn = 1` and one idle keep-alive
//!   holder, so the clients complete their handshake and send their request
//!   into an accept queue it never reaches (the selftest's server never
//!   calls `accept()`).
//! - `migrate-fastopen` (`TCP_SYN_RECV inet_csk_listen_stop`): the same,
//!   with `net.ipv4.tcp_fastopen` giving every listener a Fast Open queue,
//!   clients with `TCP_FASTOPEN_CONNECT` (the request rides in the SYN) and
//!   their final ACK held: the children wait in the accept queue in
//!   `SYN_RECV`.
//! - `migrate-synack-timer` (`TCP_NEW_SYN_RECV reqsk_timer_handler`): the
//!   final ACK held and no request written, so the requests stay in
//!   `NEW_SYN_RECV`; after the close the SYN+ACK retransmit timer migrates
//!   them; then the ACKs go through and the clients write.
//! - `migrate-final-ack` (`TCP_NEW_SYN_RECV inet_csk_complete_hashdance`):
//!   the same, but the hold goes the moment the old listener closes and the
//!   clients write at once: the request's first segment, which carries the
//!   ACK, migrates it on arrival.
//!
//! The ACK hold is an nftables rule in the sandbox's namespace (the
//! selftest uses XDP on `lo`), scoped to the clients' own source address,
//! 127.0.0.2. Each case proves itself with a counter that moves only when a
//! request migrates: the program's `migrated` of the new generation's slot
//! (eBPF) and the namespace's `TCPMigrateReqSuccess`. Our program counts
//! per slot, not per state, so which path migrated comes from the case's
//! construction and timing (recorded as notes: what waited, what moved
//! before the release). Without a migrate program and with
//! `tcp_migrate_req` unset (`reuseport`), a closing listener leaves its
//! group at once and the kernel does not even try: its children are reset
//! (`OutRsts`), its half-open requests dropped, and `TCPMigrateReqFailure`
//! stays 0.

mod client;
mod hold;
mod socks;

use std::{
    collections::BTreeMap,
    fmt, fs,
    net::SocketAddr,
    str::FromStr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use proxy_harness::{
    Sandbox,
    config::{BACKEND_ADDR, PROXY_ADDR},
    procfs::accept_queues,
    sandbox::write_sysctl,
    status::Counters,
};

use self::{
    client::{CLIENT_IP, Clients, Plan},
    hold::AckHold,
};
use crate::{
    backend, kernel,
    modes::{Contender, Gen, Mode, Setup, listens},
    records::{Class, ConnRecord, Event, KernelFigures},
};

/// One path of the selftest.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    Established,
    Fastopen,
    SynackTimer,
    FinalAck,
}

impl Path {
    pub const ALL: [Path; 4] = [
        Path::Established,
        Path::Fastopen,
        Path::SynackTimer,
        Path::FinalAck,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::Established => "migrate-established",
            Path::Fastopen => "migrate-fastopen",
            Path::SynackTimer => "migrate-synack-timer",
            Path::FinalAck => "migrate-final-ack",
        }
    }

    /// One line for `--help`.
    pub fn help(self) -> &'static str {
        match self {
            Path::Established => {
                "established connections queued in the old generation's accept queue when it closes"
            }
            Path::Fastopen => {
                "TCP Fast Open children (request in the SYN, final ACK held) queued in SYN_RECV when \
                 the old generation closes"
            }
            Path::SynackTimer => {
                "half-open requests (final ACK held) migrated by the SYN+ACK retransmit timer after \
                 the old generation closed"
            }
            Path::FinalAck => {
                "half-open requests (final ACK held) migrated when their ACK arrives, let through \
                 right after the old generation closed"
            }
        }
    }

    /// The selftest's subtest this path reproduces.
    pub fn kernel_case(self) -> &'static str {
        match self {
            Path::Established => "TCP_ESTABLISHED inet_csk_listen_stop",
            Path::Fastopen => "TCP_SYN_RECV inet_csk_listen_stop",
            Path::SynackTimer => "TCP_NEW_SYN_RECV reqsk_timer_handler",
            Path::FinalAck => "TCP_NEW_SYN_RECV inet_csk_complete_hashdance",
        }
    }

    /// The clients wait in the accept queue (behind the holder).
    fn queues_children(self) -> bool {
        matches!(self, Path::Established | Path::Fastopen)
    }

    /// The clients' final ACK is held.
    fn holds_ack(self) -> bool {
        !matches!(self, Path::Established)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Path {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Path::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Path::ALL.iter().map(|p| p.name()).collect();
                format!("{s:?}: expected one of {}", names.join(", "))
            })
    }
}

/// What one path against one contender did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// One per client of the case (class `ok`: it got its whole response
    /// after the migration).
    pub records: Vec<ConnRecord>,
    /// `ready`, `holder`, `hold`, `queued` / `held`, `handover`, `close`
    /// (the old listener stopped listening), `settled` (Fast Open: its
    /// children migrated or reset), `timer` (the SYN+ACK timer fired after
    /// the close), `release` (the held ACKs let through), `old_exit`.
    pub events: Vec<Event>,
    /// Kernel counters over the case, and the program's counters (eBPF).
    pub kernel: KernelFigures,
    /// `selftest_case`, `clients`, `ok`, `migrated_in_new_slot` (eBPF),
    /// `tcp_migrate_req_success` / `_failure`, what waited, what moved
    /// before the release, and `verdict`.
    pub notes: BTreeMap<String, String>,
    /// Why the path does not apply to the contender (no records then).
    pub skipped: Option<String>,
}

/// Clients per case (the selftest has 25 over 4 listeners).
const CLIENTS: u64 = 8;
/// Our generations' settings for these cases.
const HANDOVER_GRACE: Duration = Duration::from_millis(100);
const HARD_STOP_AFTER: Duration = Duration::from_secs(5);
/// Bound of each wait for a precondition (queued, held, closed).
const STEP: Duration = Duration::from_secs(5);
/// The SYN+ACK timer fires 1, 3, 7 s after the SYN: the first firing after
/// the close comes within this.
const TIMER: Duration = Duration::from_secs(9);
/// A client's bound for connect(), and for its exchange once it may write.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// net.ipv4.tcp_fastopen as the selftest sets it (client, server, no
/// cookie either way: 0x207), plus 0x400: a Fast Open queue for every
/// listener at listen() time, without the TCP_FASTOPEN socket option that
/// our listeners do not set.
const TFO_SYSCTL: &str = "1543";

/// Why `mode` has no run of these paths.
fn skip_reason(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Ebpf | Mode::Reuseport | Mode::ReuseportMigrate => None,
        Mode::HaproxySf => Some(
            "HAProxy's -sf reload closes its listeners with no migrate program and \
             tcp_migrate_req unset: the outcome of the `reuseport` row; the cases drive our \
             listener (maxconn) and our handover",
        ),
        Mode::HaproxyX => Some(
            "HAProxy -x hands the listening sockets themselves to the new process: no listener \
             closes, so nothing migrates",
        ),
    }
}

/// Runs one path against `mode` in a fresh sandbox; returns what happened.
pub fn run(path: Path, mode: Mode, proxy_bin: &std::path::Path) -> Result<Outcome> {
    if let Some(reason) = skip_reason(mode) {
        return Ok(Outcome {
            skipped: Some(reason.into()),
            ..Outcome::default()
        });
    }
    // Declared first, dropped last: kills what the case started.
    let sb = Sandbox::with_proxy(
        &format!("lab-{}-{}", mode.name().replace('+', "-"), path.name()),
        proxy_bin.to_path_buf(),
    );
    let rt = sb.runtime();
    if path == Path::Fastopen {
        // Before any listen(): the listener's Fast Open queue is sized then.
        write_sysctl("net/ipv4/tcp_fastopen", TFO_SYSCTL);
    }
    backend::start(&rt, BACKEND_ADDR).context("starting the lab's backend")?;
    let setup = Setup {
        listener_mode: "tcp".into(),
        tls: false,
        hard_stop_after: HARD_STOP_AFTER,
        handover_grace: HANDOVER_GRACE,
    };
    let contender = Contender::new(&sb, mode, setup, None)?;
    if path.queues_children() {
        cap_accepts(&sb, 1)?;
    }
    let mut case = Case::new(path, mode);
    let before = kernel::snapshot();
    let records = drive(&mut case, &sb, &rt, &contender)?;
    let after = kernel::snapshot();
    let counters = kernel::delta(&before, &after);
    let program = case.program_after.as_ref().map(|c| {
        serde_json::json!({
            "selected": c.selected,
            "migrated": c.migrated,
            "fallback_new": c.fallback_new,
            "fallback_migrate": c.fallback_migrate,
        })
    });
    let figures = Figures {
        clients: CLIENTS,
        records: &records,
        program_migrated: case.program_migrated(),
        success: counters.get("TCPMigrateReqSuccess").copied().unwrap_or(0),
        failure: counters.get("TCPMigrateReqFailure").copied().unwrap_or(0),
    };
    case.note("tcp_migrate_req_success", figures.success);
    case.note("tcp_migrate_req_failure", figures.failure);
    case.note("ok", figures.ok());
    case.note("verdict", verdict(&figures));
    Ok(Outcome {
        records,
        events: case.events,
        kernel: KernelFigures { counters, program },
        notes: case.notes,
        skipped: None,
    })
}

/// The state of one case: its events, notes, and the program's counters
/// around the handover.
struct Case {
    path: Path,
    mode: Mode,
    t0: Instant,
    events: Vec<Event>,
    notes: BTreeMap<String, String>,
    /// The new generation's slot (eBPF).
    new_slot: Option<u32>,
    program_before: Option<Counters>,
    program_after: Option<Counters>,
}

impl Case {
    fn new(path: Path, mode: Mode) -> Case {
        let mut case = Case {
            path,
            mode,
            t0: Instant::now(),
            events: Vec::new(),
            notes: BTreeMap::new(),
            new_slot: None,
            program_before: None,
            program_after: None,
        };
        case.note("selftest_case", path.kernel_case());
        case.note("clients", CLIENTS);
        case
    }

    fn event(&mut self, event: &str, detail: impl fmt::Display) {
        self.events.push(Event {
            t_us: self.t0.elapsed().as_micros() as u64,
            event: event.into(),
            detail: detail.to_string(),
        });
    }

    fn note(&mut self, key: &str, value: impl fmt::Display) {
        self.notes.insert(key.into(), value.to_string());
    }

    /// `proxy status` counters (eBPF only: the others have no program).
    fn program(&self, sb: &Sandbox) -> Option<Counters> {
        (self.mode == Mode::Ebpf)
            .then(|| sb.try_status().ok())
            .flatten()
            .map(|st| st.counters)
    }

    /// Requests the program migrated into the new generation's slot during
    /// the case.
    fn program_migrated(&self) -> Option<u64> {
        let (slot, before, after) = (
            self.new_slot?,
            self.program_before.as_ref()?,
            self.program_after.as_ref()?,
        );
        let at = |c: &Counters| c.migrated.get(slot as usize).copied().unwrap_or(0);
        Some(at(after).saturating_sub(at(before)))
    }
}

fn label(g: &Gen) -> String {
    match g.generation {
        Some(n) => format!("generation {n} pid {}", g.pid),
        None => format!("pid {}", g.pid),
    }
}

fn proxy_port() -> Result<u16> {
    Ok(PROXY_ADDR
        .parse::<SocketAddr>()
        .context("PROXY_ADDR")?
        .port())
}

/// Gives the `front` listener of our config `maxconn = n`: the old
/// generation accepts the holder and nothing more, so the clients wait in
/// its accept queue like the selftest's, whose server never calls
/// `accept()`. Every generation of the case reads the same file.
fn cap_accepts(sb: &Sandbox, n: u32) -> Result<()> {
    let path = sb.dir.join("proxy.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let text = with_maxconn(&text, n).with_context(|| path.display().to_string())?;
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// `text` with `maxconn = n` in the `[[listener]]` named `front`.
fn with_maxconn(text: &str, n: u32) -> Result<String> {
    let marker = "name = \"front\"\n";
    let at = text.find(marker).context("no listener named front")? + marker.len();
    let block = &text[at..];
    let block = &block[..block.find("\n[").unwrap_or(block.len())];
    ensure!(
        !block.lines().any(|l| l.trim_start().starts_with("maxconn")),
        "the front listener already has a maxconn; the case sets its own"
    );
    let mut text = text.to_string();
    text.insert_str(at, &format!("maxconn = {n}\n"));
    Ok(text)
}

/// Polls `done` every `step` for at most `bound`; the time it took.
fn wait_for(bound: Duration, step: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= bound {
            return None;
        }
        std::thread::sleep(step);
    }
}

/// `TCPMigrateReqSuccess + TCPMigrateReqFailure` now.
fn migration_attempts() -> u64 {
    let now = kernel::snapshot();
    ["TCPMigrateReqSuccess", "TCPMigrateReqFailure"]
        .iter()
        .map(|k| now.get(*k).copied().unwrap_or(0))
        .sum()
}

/// Children waiting in the accept queues of `port`.
fn queued(port: u16) -> u64 {
    accept_queues(port).iter().map(|&q| u64::from(q)).sum()
}

/// The case itself: returns the clients' records.
fn drive(
    case: &mut Case,
    sb: &Sandbox,
    rt: &tokio::runtime::Runtime,
    contender: &Contender,
) -> Result<Vec<ConnRecord>> {
    let path = case.path;
    let port = proxy_port()?;
    let n = CLIENTS as usize;
    let tfo_before = socks::tcp_ext("TCPFastOpenPassive");
    let mut old = contender.start()?;
    case.event("ready", label(&old));

    // The holder takes the old generation's only accept slot.
    let holder = if path.queues_children() {
        let h = rt
            .block_on(client::hold_slot(STEP))
            .context("the holder (the connection that takes the old generation's accept slot)")?;
        case.event(
            "holder",
            "keep-alive connection accepted by the old generation",
        );
        Some(h)
    } else {
        None
    };
    let mut hold = if path.holds_ack() {
        let h = AckHold::install(&sb.dir, CLIENT_IP, port)?;
        case.event(
            "hold",
            format!("ACKs from {CLIENT_IP} to port {port} dropped"),
        );
        Some(h)
    } else {
        None
    };

    let plan = Plan {
        fastopen: path == Path::Fastopen,
        write_on_go: !path.queues_children(),
        timeout: CLIENT_TIMEOUT,
    };
    let clients = Clients::start(rt, CLIENTS, plan, case.t0);
    if path.queues_children() {
        if wait_for(STEP, Duration::from_millis(2), || queued(port) == CLIENTS).is_none() {
            bail!(
                "{CLIENTS} connections did not queue at the old generation within {STEP:?}: \
                 accept queue {}, {} clients connected, Fast Open children {}",
                queued(port),
                clients.connected(),
                socks::tcp_ext("TCPFastOpenPassive").saturating_sub(tfo_before),
            );
        }
        case.event(
            "queued",
            format!("{CLIENTS} in the old generation's accept queue"),
        );
        case.note("queued_at_handover", queued(port));
    } else {
        let held = || clients.connected() == n && socks::half_open(CLIENT_IP, port) == n;
        if wait_for(STEP, Duration::from_millis(2), held).is_none() {
            bail!(
                "{CLIENTS} requests did not wait half-open within {STEP:?}: {} connected, {} \
                 half-open",
                clients.connected(),
                socks::half_open(CLIENT_IP, port),
            );
        }
        case.event("held", format!("{CLIENTS} requests in NEW_SYN_RECV"));
        case.note("half_open_at_handover", socks::half_open(CLIENT_IP, port));
    }
    if path == Path::Fastopen {
        let children = socks::tcp_ext("TCPFastOpenPassive").saturating_sub(tfo_before);
        case.note("tcp_fastopen_passive", children);
        ensure!(
            children >= CLIENTS,
            "the kernel made {children} Fast Open children of {CLIENTS}: the case would not be \
             the SYN_RECV path"
        );
    }

    case.program_before = case.program(sb);
    let attempts_before = migration_attempts();
    case.event("handover", label(&old));
    let new = contender.hand_over(&old)?;
    case.event("ready", label(&new));
    if case.mode == Mode::Ebpf {
        case.new_slot = sb
            .try_status()
            .ok()
            .and_then(|st| Some(st.generation(new.generation?)?.slot));
    }
    // Fast: the final-ACK case lets the ACKs through right after this.
    if wait_for(STEP, Duration::from_millis(1), || !listens(old.pid, port)).is_none() {
        bail!(
            "the old generation ({}) still listens {STEP:?} after the handover",
            label(&old)
        );
    }
    case.event("close", label(&old));

    let moved = || migration_attempts().saturating_sub(attempts_before);
    match path {
        Path::Established => {}
        Path::Fastopen => {
            // Migrated at the close, or reset: either way at once.
            let settled = || moved() >= CLIENTS || clients.done() == n;
            wait_for(STEP, Duration::from_millis(2), settled);
            let detail = format!("{} migrated; {} clients done", moved(), clients.done());
            case.event("settled", detail);
        }
        Path::SynackTimer => {
            // Each request is migrated (counted) or dropped (gone from the
            // table: a listener that left its group is not even offered).
            let gone = || n.saturating_sub(socks::half_open(CLIENT_IP, port)) as u64;
            match wait_for(TIMER, Duration::from_millis(5), || {
                moved() + gone() >= CLIENTS
            }) {
                Some(after) => {
                    case.note("timer_after_close_ms", after.as_millis());
                    case.note("dropped_by_timer", gone());
                    let detail = format!("SYN+ACK timer: {} migrated; {} dropped", moved(), gone());
                    case.event("timer", detail);
                }
                None => case.note("timer_after_close_ms", format!("none within {TIMER:?}")),
            }
        }
        Path::FinalAck => {}
    }
    if let Some(h) = hold.as_mut() {
        case.note(
            "held_acks",
            h.held().map_or("unknown".into(), |p| p.to_string()),
        );
        case.note("migrated_before_release", moved());
        h.release()?;
        case.event("release", "held ACKs let through");
        clients.go();
    }
    let records = clients.finish(rt);
    case.program_after = case.program(sb);
    if let Some(m) = case.program_migrated() {
        case.note("migrated_in_new_slot", m);
    }
    if let (Some(b), Some(a)) = (&case.program_before, &case.program_after) {
        case.note(
            "fallback_migrate",
            a.fallback_migrate.saturating_sub(b.fallback_migrate),
        );
    }

    // The holder kept the old generation draining: let it go.
    drop(holder);
    if old.wait_exit(HARD_STOP_AFTER + Duration::from_secs(1)) {
        case.event("old_exit", label(&old));
    }
    Ok(records)
}

/// What the verdict is made of.
struct Figures<'a> {
    clients: u64,
    records: &'a [ConnRecord],
    /// The program's migrations into the new slot (eBPF).
    program_migrated: Option<u64>,
    success: u64,
    failure: u64,
}

impl Figures<'_> {
    fn ok(&self) -> u64 {
        self.records.iter().filter(|r| r.class == Class::Ok).count() as u64
    }

    /// `3 reset_after_request, 1 timeout`.
    fn failures(&self) -> String {
        let mut by: BTreeMap<Class, u64> = BTreeMap::new();
        for r in self.records.iter().filter(|r| r.class != Class::Ok) {
            *by.entry(r.class).or_default() += 1;
        }
        let missing = self.clients.saturating_sub(self.records.len() as u64);
        let mut parts: Vec<String> = by.iter().map(|(c, n)| format!("{n} {c}")).collect();
        if missing > 0 {
            parts.push(format!("{missing} without a record"));
        }
        parts.join(", ")
    }
}

/// One line: migrated or not, by whom, and what the clients saw.
fn verdict(f: &Figures) -> String {
    let ok = f.ok();
    let counted = match f.program_migrated {
        Some(m) => format!("program counter +{m}, TCPMigrateReqSuccess +{}", f.success),
        None => format!(
            "no program, TCPMigrateReqSuccess +{}, TCPMigrateReqFailure +{}",
            f.success, f.failure
        ),
    };
    let migrated = f.program_migrated.unwrap_or(f.success);
    let failures = f.failures();
    let tail = if failures.is_empty() {
        format!("{ok}/{} ok", f.clients)
    } else {
        format!("{ok}/{} ok, {failures}", f.clients)
    };
    if ok == f.clients && migrated >= f.clients {
        format!("migrated ({counted}): {tail}")
    } else if ok == f.clients {
        format!("served without migrating ({counted}): the case did not hold: {tail}")
    } else if ok == 0 && migrated == 0 {
        format!("not migrated ({counted}): {tail}")
    } else {
        format!("partly migrated ({counted}): {tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Kind;

    fn records(classes: &[Class]) -> Vec<ConnRecord> {
        classes
            .iter()
            .enumerate()
            .map(|(i, &class)| ConnRecord {
                start_us: i as u64,
                connect_us: Some(10),
                total_us: 100,
                kind: Kind::Short,
                class,
            })
            .collect()
    }

    #[test]
    fn paths_have_names_help_and_parse_back() {
        for p in Path::ALL {
            assert!(p.name().starts_with("migrate-"), "{p:?}");
            assert!(!p.help().is_empty() && !p.help().contains('\n'), "{p:?}");
            assert_eq!(p.name().parse::<Path>(), Ok(p));
        }
        assert!(
            "migrate-nope"
                .parse::<Path>()
                .unwrap_err()
                .contains("migrate-final-ack")
        );
        assert!(Path::ALL.iter().filter(|p| p.holds_ack()).count() == 3);
        assert!(Path::Fastopen.queues_children() && Path::Fastopen.holds_ack());
    }

    #[test]
    fn the_front_listener_gets_a_maxconn() {
        let cfg = "[global]\nname = \"x\"\nmaxconn = 100\n\n[[listener]]\nname = \"front\"\n\
                   bind = [\"127.0.0.1:8080\"]\nbacklog = 4096\n\n[[backend]]\nname = \"app\"\n";
        let capped = with_maxconn(cfg, 1).unwrap();
        assert!(
            capped.contains("name = \"front\"\nmaxconn = 1\nbind"),
            "{capped}"
        );
        // The global maxconn is not the listener's.
        assert!(capped.contains("maxconn = 100"), "{capped}");
        assert!(
            with_maxconn(&capped, 1)
                .unwrap_err()
                .to_string()
                .contains("already")
        );
        assert!(with_maxconn("[[listener]]\nname = \"tls\"\n", 1).is_err());
    }

    #[test]
    fn haproxy_is_skipped_with_a_reason_and_ours_all_run() {
        assert!(skip_reason(Mode::HaproxySf).is_some());
        assert!(skip_reason(Mode::HaproxyX).is_some());
        for m in [Mode::Ebpf, Mode::Reuseport, Mode::ReuseportMigrate] {
            assert_eq!(skip_reason(m), None, "{m}");
        }
    }

    #[test]
    fn verdicts_say_who_migrated_and_what_the_clients_saw() {
        let all_ok = records(&[Class::Ok; 8]);
        let ebpf = Figures {
            clients: 8,
            records: &all_ok,
            program_migrated: Some(8),
            success: 8,
            failure: 0,
        };
        assert_eq!(
            verdict(&ebpf),
            "migrated (program counter +8, TCPMigrateReqSuccess +8): 8/8 ok"
        );
        let hash = Figures {
            program_migrated: None,
            ..ebpf
        };
        assert!(verdict(&hash).starts_with("migrated (no program, TCPMigrateReqSuccess +8"));

        let reset = records(&[Class::ResetAfterRequest; 8]);
        let plain = Figures {
            clients: 8,
            records: &reset,
            program_migrated: None,
            success: 0,
            failure: 0,
        };
        assert_eq!(
            verdict(&plain),
            "not migrated (no program, TCPMigrateReqSuccess +0, TCPMigrateReqFailure +0): 0/8 ok, \
             8 reset_after_request"
        );

        let mixed = records(&[Class::Ok, Class::Ok, Class::Timeout]);
        let partly = Figures {
            clients: 4,
            records: &mixed,
            program_migrated: Some(2),
            success: 2,
            failure: 0,
        };
        assert_eq!(
            verdict(&partly),
            "partly migrated (program counter +2, TCPMigrateReqSuccess +2): 2/4 ok, 1 timeout, \
             1 without a record"
        );

        let unmigrated = Figures {
            program_migrated: Some(0),
            success: 0,
            ..ebpf
        };
        assert!(verdict(&unmigrated).starts_with("served without migrating"));
    }
}
