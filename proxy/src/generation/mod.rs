//! One running copy of the proxy: its lifecycle, its listeners, and the
//! handover with the generations before and after it.
//!
//! The lifecycle is one [`Phase`] on a `watch` channel; signals, the pinned
//! maps and the accept loops all act on it:
//!
//! ```text
//! starting -> ready -> active -> draining -> stopped
//!                        ^  \
//!          SIGTTIN/back  |   v SIGTTOU
//!                       standby
//! ```
//!
//! Handover, seen from the new generation: claim a free slot, bind with
//! SO_REUSEPORT, attach the steering program and register the sockets, flip
//! the active slot (one map write), mark itself active. Seen from the old
//! generation (it polls the pinned maps, so no PID is needed): the active slot
//! names another generation; once that one is active and alive, wait
//! `handover_grace`, then stop listening (the kernel migrates the accept
//! queue), drain, exit. If the new generation dies or stalls before the old
//! one stopped listening, the old one flips the slot back (rollback).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use proxy_common::{GenRecord, GroupKey, HISTORY_INTERVAL_MS, HistorySample, Phase};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, Semaphore, watch},
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{BindAddr, Config, Steering as SteeringMode},
    stats::counters::Registry,
    stage::socket::{Listener, PeerAddr, Stream},
    stage::{Stage, StageContext, StageRuntime},
    stats::{self, StatsSource},
    steering::{self, Group, Maps, Slot},
    sys,
};

/// How often a generation publishes its heartbeat and looks at the maps.
const TICK: Duration = Duration::from_millis(50);
/// A generation whose heartbeat is older than this is taken for dead.
const STALE: Duration = Duration::from_secs(1);

/// Fault injection for the tests, from `PROXY_TEST_HOOK`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TestHook {
    /// SIGSTOP ourselves right after the flip, before marking active.
    StopAfterFlip,
}

impl TestHook {
    pub fn from_env() -> Option<Self> {
        match std::env::var("PROXY_TEST_HOOK").ok()?.as_str() {
            "stop-after-flip" => Some(TestHook::StopAfterFlip),
            _ => None,
        }
    }
}

/// What `proxy run` was asked to do.
pub struct Options {
    pub config: Config,
    /// Write our PID here once active (overrides `global.pidfile`).
    pub pidfile: Option<PathBuf>,
    /// PIDs to send SIGUSR1 (soft-stop) once we are active (`-sf`).
    pub soft_stop: Vec<u32>,
    /// PIDs to send SIGTERM (hard stop) once we are active (`-st`).
    pub hard_stop: Vec<u32>,
    pub hook: Option<TestHook>,
}

/// Counters of this generation, shared with the connection tasks.
#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    active: AtomicU64,
    failed: AtomicU64,
}

/// What the accept loops and the control loop share.
struct Shared {
    stats: Stats,
    /// Whether the accept loops may accept.
    accepting: watch::Sender<bool>,
    /// Wakes the accept loops to try `accept()` without waiting for epoll.
    sweep: Notify,
    /// Set when the generation drains (HTTP keep-alive answers with
    /// `Connection: close` from then on).
    draining: watch::Sender<bool>,
    /// Per listener and per server counters.
    metrics: Arc<Registry>,
    /// When this generation flipped the active slot, to log how soon the
    /// first connection arrived after it (the handover gap operators ask
    /// about).
    flipped_at: std::sync::OnceLock<Instant>,
    first_conn_logged: std::sync::atomic::AtomicBool,
}

/// The eBPF side of this generation.
struct Steer {
    maps: Maps,
    slot: Slot,
    record: GenRecord,
    /// (listener index, group) of every TCP listener, to re-register them
    /// after a resume.
    groups: Vec<(usize, Group)>,
    /// The loaded programs with their maps; kept so that their log ring
    /// buffers stay open.
    programs: Vec<aya::Ebpf>,
    /// When counters and history were last published, and in which phase.
    metrics_at: Instant,
    history_at: Instant,
    last_phase: Phase,
}

/// The signals a generation obeys, installed first thing: a signal that
/// arrives during startup must not take its default action (terminate or
/// stop the process).
struct Signals {
    usr1: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    ttou: tokio::signal::unix::Signal,
    ttin: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            usr1: signal(SignalKind::user_defined1())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
        })
    }
}

/// The listening sockets the control loop stops and resumes.
#[derive(Clone, Copy)]
struct Sockets<'a> {
    listeners: &'a [Arc<Listener>],
    /// Stats listeners and their serving tasks.
    stats: &'a [(Arc<Listener>, tokio::task::AbortHandle)],
}

/// Runs one generation until it has stopped.
pub async fn run(opts: Options) -> Result<()> {
    let mut signals = Signals::install().context("installing signal handlers")?;
    let cfg = &opts.config;
    let name = &cfg.global.name;
    let (phase_tx, _phase_rx) = watch::channel(Phase::Starting);

    let dir = steering::pin_dir(&cfg.global.bpffs, name);
    let mut steer_maps = match cfg.global.steering {
        SteeringMode::Reuseport => {
            warn!(
                "steering = \"reuseport\": eBPF steering disabled by config; plain SO_REUSEPORT soft-stop, queued connections of a closing listener may be reset"
            );
            None
        }
        mode => match steering::ensure_pinned(&dir).and_then(|()| Maps::open(&dir)) {
            Ok(maps) => Some(maps),
            Err(e) if mode == SteeringMode::Auto => {
                error!(error = %e, "eBPF STEERING UNAVAILABLE: falling back to plain SO_REUSEPORT soft-stop; new connections are hashed across generations and queued connections of a closing listener may be reset");
                None
            }
            Err(e) => {
                return Err(e).context("steering = \"ebpf\" but eBPF steering cannot be set up");
            }
        },
    };

    // Claim a slot before binding, so that a full instance fails early.
    let mut slot_record = None;
    if let Some(maps) = steer_maps.as_mut() {
        let record = GenRecord {
            generation: 0,
            started_unix_ms: sys::unix_ms(),
            heartbeat_ns: sys::boottime_ns(),
            accepted: 0,
            active_conns: 0,
            pid: std::process::id(),
            state: Phase::Starting.code(),
            pidns: sys::pidns_inode(),
        };
        let claimed = maps
            .lock()?
            .claim(record, sys::boottime_ns(), STALE.as_nanos() as u64)?;
        slot_record = Some(claimed);
    }
    let gen_label = slot_record
        .map(|(s, r)| format!("generation {} (slot {})", r.generation, s.0))
        .unwrap_or_else(|| format!("generation pid {}", std::process::id()));

    let result = serve(
        &opts,
        steer_maps.take().zip(slot_record),
        &gen_label,
        phase_tx,
        &mut signals,
    )
    .await;
    if let Err(e) = &result {
        error!("{gen_label}: {e:#}");
        // Free the slot at once rather than after the heartbeat goes stale.
        if let Some((slot, mut record)) = slot_record
            && let Ok(mut maps) = Maps::open(&dir)
        {
            record.state = Phase::Stopped.code();
            let _ = maps.write_record(slot, &record);
        }
    }
    result
}

async fn serve(
    opts: &Options,
    steer: Option<(Maps, (Slot, GenRecord))>,
    label: &str,
    phase: watch::Sender<Phase>,
    signals: &mut Signals,
) -> Result<()> {
    let cfg = &opts.config;
    let shared = Arc::new(Shared {
        stats: Stats::default(),
        accepting: watch::channel(true).0,
        sweep: Notify::new(),
        draining: watch::channel(false).0,
        metrics: Arc::new(Registry::new(cfg)),
        flipped_at: std::sync::OnceLock::new(),
        first_conn_logged: std::sync::atomic::AtomicBool::new(false),
    });

    // Bind every listener first: a failure here leaves the running
    // generation untouched (we hold no active slot yet).
    // Each listener gets its stage (and its pinned runtime, if it has cpus);
    // its sockets are registered with that runtime's reactor.
    let mut runtimes = Vec::new();
    let mut listeners = Vec::new();
    for l in &cfg.listeners {
        let runtime = StageRuntime::new(&l.name, l.cpus.as_deref())?;
        let stage = Stage::new(
            cfg,
            l,
            StageContext {
                draining: shared.draining.subscribe(),
                metrics: &shared.metrics,
                generation: steer.as_ref().map_or(0, |(_, (_, r))| r.generation),
            },
        )?;
        for addr in &l.bind {
            let _entered = runtime.handle().enter();
            let listener = Listener::bind(addr, l.backlog, l.unix_mode)
                .with_context(|| format!("listener {}: binding {addr}", l.name))?;
            listeners.push((
                l,
                Arc::new(listener),
                stage.clone(),
                runtime.handle().clone(),
            ));
        }
        runtimes.push(runtime);
    }

    let mut steer = match steer {
        Some((mut maps, (slot, record))) => {
            let mut groups = Vec::new();
            let mut programs = Vec::new();
            for (i, (l, listener, _, _)) in listeners.iter().enumerate() {
                let BindAddr::Tcp(sa) = &listener.addr else {
                    continue;
                };
                let group = maps.lock()?.group(group_key(sa))?;
                let ebpf = steering::attach(maps.dir(), group, listener.as_ref())
                    .with_context(|| format!("listener {}: attaching steering to {sa}", l.name))?;
                maps.register(group, slot, listener.as_ref())?;
                groups.push((i, group));
                programs.push(ebpf);
            }
            for ebpf in &mut programs {
                spawn_ebpf_log(ebpf);
            }
            Some(Steer {
                maps,
                slot,
                record,
                groups,
                programs,
                metrics_at: Instant::now(),
                history_at: Instant::now() - Duration::from_millis(HISTORY_INTERVAL_MS),
                last_phase: Phase::Starting,
            })
        }
        None => None,
    };

    // Stats listeners (instance-wide and per stage): SO_REUSEPORT too, so
    // old and new generations can both hold them during a handover; they
    // show the same figures, read from the pinned maps.
    let mut stats_listeners = Vec::new();
    let stats_configs = cfg.stats.iter().map(|s| (None, s)).chain(
        cfg.listeners
            .iter()
            .filter_map(|l| l.stats.as_ref().map(|s| (Some(l.name.clone()), s))),
    );
    for (only, sc) in stats_configs {
        let listener = Arc::new(
            Listener::bind(&BindAddr::Tcp(sc.bind), 128, 0)
                .with_context(|| format!("stats listener: binding {}", sc.bind))?,
        );
        let source = Arc::new(StatsSource {
            instance: cfg.global.name.clone(),
            banner: sc.banner.clone(),
            only_listener: only,
            maps: match &steer {
                Some(s) => Some(std::sync::Mutex::new(Maps::open(s.maps.dir())?)),
                None => None,
            },
            own_slot: steer.as_ref().map(|s| s.slot),
            registry: shared.metrics.clone(),
            listener_backends: cfg
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.backend.clone()))
                .collect(),
        });
        // Steered like the data listeners, so that the stats port follows
        // the active generation and its queue migrates at a handover.
        if let Some(s) = steer.as_mut() {
            let group = s.maps.lock()?.group(group_key(&sc.bind))?;
            let ebpf = steering::attach(s.maps.dir(), group, listener.as_ref())
                .with_context(|| format!("stats listener: attaching steering to {}", sc.bind))?;
            s.maps.register(group, s.slot, listener.as_ref())?;
            s.programs.push(ebpf);
        }
        let task = tokio::spawn(stats::serve(listener.clone(), source));
        stats_listeners.push((listener, task.abort_handle()));
    }

    // Accept loops run from the start: before the flip the program sends
    // nothing here (unless the active slot is empty and the kernel falls
    // back), after it everything.
    for (l, listener, stage, handle) in &listeners {
        let maxconn = l.maxconn.map(|n| Arc::new(Semaphore::new(n)));
        handle.spawn(accept_loop(
            listener.clone(),
            stage.clone(),
            shared.clone(),
            maxconn,
        ));
    }
    // Written before the flip, so that a pidfile problem stops us while the
    // old generation still has the traffic.
    let pidfile = opts.pidfile.clone().or_else(|| cfg.global.pidfile.clone());
    if let Some(path) = &pidfile {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing pidfile {}", path.display()))?;
    }
    // UNIX listeners take over their paths now, the last step that can fail
    // before the flip.
    for (l, listener, _, _) in &listeners {
        listener
            .publish()
            .with_context(|| format!("listener {}: publishing {}", l.name, listener.addr))?;
    }

    phase.send_replace(Phase::Ready);
    publish(&mut steer, &shared, Phase::Ready);

    // The flip: one map write.
    if let Some(s) = steer.as_mut() {
        let previous = s.maps.active_slot()?;
        s.maps.lock()?.flip(s.slot, None)?;
        let _ = shared.flipped_at.set(Instant::now());
        info!(
            previous_slot = previous.map_or(-1, |p| i64::from(p.0)),
            "{label}: flipped the active slot to {}", s.slot.0
        );
        if opts.hook == Some(TestHook::StopAfterFlip) {
            warn!("{label}: PROXY_TEST_HOOK=stop-after-flip: stopping myself");
            sys::stop_self();
        }
    }
    phase.send_replace(Phase::Active);
    publish(&mut steer, &shared, Phase::Active);
    shared.sweep.notify_waiters();
    info!(listeners = listeners.len(), "{label}: active");
    sys::sd_notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS={label}: active",
        std::process::id()
    ));

    for (pids, sig, what) in [
        (&opts.soft_stop, libc::SIGUSR1, "soft-stop (SIGUSR1)"),
        (&opts.hard_stop, libc::SIGTERM, "hard stop (SIGTERM)"),
    ] {
        for &pid in pids.iter() {
            match sys::kill(pid, sig) {
                Ok(()) => info!("{label}: sent {what} to old process {pid}"),
                Err(e) => warn!("{label}: could not send {what} to process {pid}: {e}"),
            }
        }
    }

    let listeners: Vec<Arc<Listener>> = listeners.into_iter().map(|(_, l, _, _)| l).collect();
    let outcome = control(
        cfg,
        &mut steer,
        &shared,
        &Sockets {
            listeners: &listeners,
            stats: &stats_listeners,
        },
        &phase,
        label,
        signals,
    )
    .await;

    // Stopped: leave the slot for the next generation.
    phase.send_replace(Phase::Stopped);
    publish(&mut steer, &shared, Phase::Stopped);
    if let Some(s) = steer.as_mut()
        && let Ok(mut locked) = s.maps.lock()
    {
        let _ = locked.clear_active(s.slot);
    }
    if let Some(path) = &pidfile
        && std::fs::read_to_string(path).is_ok_and(|p| p.trim() == std::process::id().to_string())
    {
        let _ = std::fs::remove_file(path);
    }
    for l in &listeners {
        l.remove_path_if_ours();
    }
    drop(runtimes);
    let st = &shared.stats;
    info!(
        accepted = st.accepted.load(Ordering::Relaxed),
        failed = st.failed.load(Ordering::Relaxed),
        cut = st.active.load(Ordering::Relaxed),
        "{label}: generation stopped ({})",
        outcome
            .as_ref()
            .map(|o| o.to_string())
            .unwrap_or_else(|e| format!("{e:#}"))
    );
    outcome.map(|_| ())
}

fn group_key(sa: &std::net::SocketAddr) -> GroupKey {
    let mut addr = [0u8; 16];
    let family = match sa.ip() {
        std::net::IpAddr::V4(ip) => {
            addr[..4].copy_from_slice(&ip.octets());
            libc::AF_INET as u16
        }
        std::net::IpAddr::V6(ip) => {
            addr.copy_from_slice(&ip.octets());
            libc::AF_INET6 as u16
        }
    };
    GroupKey {
        family,
        port: sa.port(),
        addr,
    }
}

/// Publishes our record (phase, heartbeat, counters) in our slot.
fn publish(steer: &mut Option<Steer>, shared: &Shared, phase: Phase) {
    let Some(s) = steer.as_mut() else { return };
    s.record.state = phase.code();
    s.record.heartbeat_ns = sys::boottime_ns();
    s.record.accepted = shared.stats.accepted.load(Ordering::Relaxed);
    s.record.active_conns = shared.stats.active.load(Ordering::Relaxed);
    if let Err(e) = s.maps.write_record(s.slot, &s.record) {
        warn!("publishing the generation record: {e}");
    }
    // Counters once a second (and at every phase change), history every
    // HISTORY_INTERVAL_MS while active.
    let now = Instant::now();
    if phase != s.last_phase || now.duration_since(s.metrics_at) >= Duration::from_secs(1) {
        s.metrics_at = now;
        s.last_phase = phase;
        let snapshot = shared.metrics.snapshot();
        if let Err(e) = s
            .maps
            .publish_metrics(s.slot, snapshot.iter().map(|(id, v)| (id.as_str(), *v)))
        {
            warn!("publishing counters: {e}");
        }
    }
    if phase == Phase::Active
        && now.duration_since(s.history_at) >= Duration::from_millis(HISTORY_INTERVAL_MS)
    {
        s.history_at = now;
        if let Err(e) = push_history(&mut s.maps) {
            warn!("recording history: {e}");
        }
    }
}

/// One history sample: connections accepted so far by each live slot.
fn push_history(maps: &mut Maps) -> Result<(), steering::SteeringError> {
    let mut sample = HistorySample {
        unix_ms: sys::unix_ms(),
        ..Default::default()
    };
    for (slot, r) in maps.records()? {
        if !r.is_free() {
            sample.accepted[slot.0 as usize] = r.accepted;
            sample.generation[slot.0 as usize] = r.generation;
        }
    }
    maps.push_history(&sample)
}

/// Why the control loop ended.
#[derive(Debug)]
enum Outcome {
    Drained,
    DeadlineCut,
    HardStop,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Drained => "all connections drained",
            Outcome::DeadlineCut => "hard_stop_after reached, remaining connections cut",
            Outcome::HardStop => "hard stop",
        })
    }
}

/// What the control loop decided this tick.
enum Action {
    None,
    SoftStop(&'static str),
    HardStop,
    Pause,
    Resume,
}

async fn control(
    cfg: &Config,
    steer: &mut Option<Steer>,
    shared: &Arc<Shared>,
    sockets: &Sockets<'_>,
    phase: &watch::Sender<Phase>,
    label: &str,
    signals: &mut Signals,
) -> Result<Outcome> {
    let Sockets {
        listeners,
        stats: stats_listeners,
    } = *sockets;
    let Signals {
        usr1,
        term,
        int,
        ttou,
        ttin,
    } = signals;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When we first saw an active successor.
    let mut successor_seen: Option<Instant> = None;

    loop {
        let action = tokio::select! {
            _ = tick.tick() => Action::None,
            _ = usr1.recv() => Action::SoftStop("SIGUSR1"),
            _ = term.recv() => Action::HardStop,
            _ = int.recv() => Action::HardStop,
            _ = ttou.recv() => Action::Pause,
            _ = ttin.recv() => Action::Resume,
        };
        let current = *phase.borrow();
        let action = match action {
            Action::None if current == Phase::Active => watch_handover(
                steer,
                label,
                &mut successor_seen,
                cfg.global.handover_grace,
                listeners,
            ),
            other => other,
        };
        match action {
            Action::None => {}
            Action::HardStop => {
                info!("{label}: hard stop");
                return Ok(Outcome::HardStop);
            }
            Action::SoftStop(why) => {
                info!("{label}: soft-stop ({why}): closing listeners, draining");
                sys::sd_notify(&format!("STOPPING=1\nSTATUS={label}: draining ({why})"));
                stop_accepting(shared, listeners, label);
                for (l, task) in stats_listeners {
                    task.abort();
                    let _ = l.pause();
                }
                shared.draining.send_replace(true);
                phase.send_replace(Phase::Draining);
                publish(steer, shared, Phase::Draining);
                return Ok(drain(cfg, steer, shared, label, term, int).await);
            }
            Action::Pause if current == Phase::Active => {
                info!("{label}: SIGTTOU: stopped accepting (queued connections migrate)");
                stop_accepting(shared, listeners, label);
                phase.send_replace(Phase::Standby);
            }
            Action::Resume if current == Phase::Standby => {
                match resume(steer, shared, listeners, label) {
                    Ok(()) => {
                        successor_seen = None;
                        phase.send_replace(Phase::Active);
                    }
                    // The open connections must not pay for it.
                    Err(e) => error!("{label}: SIGTTIN failed, still standing by: {e:#}"),
                }
            }
            Action::Pause | Action::Resume => {
                debug!("{label}: signal ignored in phase {current:?}")
            }
        }
        publish(steer, shared, *phase.borrow());
        // Migrated connections may arrive without an epoll wakeup on older
        // kernels: sweep the queues every tick.
        shared.sweep.notify_waiters();
    }
}

/// Looks at the pinned maps while we are active: replaced (soft-stop after
/// the grace), or a successor that flipped and died (roll back).
fn watch_handover(
    steer: &mut Option<Steer>,
    label: &str,
    successor_seen: &mut Option<Instant>,
    grace: Duration,
    listeners: &[Arc<Listener>],
) -> Action {
    let Some(s) = steer.as_mut() else {
        return Action::None;
    };
    let active = match s.maps.active_slot() {
        Ok(a) => a,
        Err(e) => {
            warn!("{label}: reading the active slot: {e}");
            return Action::None;
        }
    };
    if active == Some(s.slot) {
        *successor_seen = None;
        return Action::None;
    }
    let alive = |r: &GenRecord| {
        let fresh = sys::boottime_ns().saturating_sub(r.heartbeat_ns) <= STALE.as_nanos() as u64;
        let pid_ok = r.pidns != sys::pidns_inode() || sys::pid_alive(r.pid);
        fresh && pid_ok && r.state != Phase::Stopped.code() && !r.is_free()
    };
    let successor = active.and_then(|a| s.maps.record(a).ok().map(|r| (a, r)));
    match successor {
        Some((_, r)) if alive(&r) && r.generation > s.record.generation => {
            if r.state != Phase::Active.code() {
                return Action::None; // flipped, not yet serving: wait
            }
            let seen = *successor_seen.get_or_insert_with(|| {
                // A handover of this service is under way.
                sys::sd_notify(&format!(
                    "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS={label}: generation {} took over",
                    sys::monotonic_us(),
                    r.generation
                ));
                Instant::now()
            });
            if seen.elapsed() >= grace {
                info!(
                    successor = r.generation,
                    "{label}: replaced by generation {}", r.generation
                );
                return Action::SoftStop("replaced");
            }
            Action::None
        }
        Some((_, r)) if alive(&r) && r.state == Phase::Active.code() => {
            // An older generation took the traffic back (SIGTTIN): it is the
            // operator's choice, step back instead of fighting over the slot.
            info!(
                "{label}: generation {} took the traffic back: standing by",
                r.generation
            );
            Action::Pause
        }
        other => {
            // No live generation holds the active slot: take traffic back.
            let expected = active;
            match s
                .maps
                .lock()
                .and_then(|mut l| l.flip(s.slot, Some(expected)))
            {
                Ok(true) => {
                    warn!(
                        dead_slot = other.map_or(-1, |(a, _)| i64::from(a.0)),
                        "{label}: the generation holding the active slot is gone or stalled: rolled back, taking traffic again"
                    );
                    sys::sd_notify(&format!(
                        "READY=1\nSTATUS={label}: active again (rolled back)"
                    ));
                    *successor_seen = None;
                    // The dead generation had renamed its UNIX sockets over
                    // ours: take the paths back for our chained stages.
                    for l in listeners {
                        if let Err(e) = l.republish() {
                            error!("{label}: taking back {} after the rollback: {e}", l.addr);
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => error!("{label}: rollback failed: {e}"),
            }
            Action::None
        }
    }
}

fn stop_accepting(shared: &Shared, listeners: &[Arc<Listener>], label: &str) {
    shared.accepting.send_replace(false);
    for l in listeners {
        if let Err(e) = l.pause() {
            warn!("{label}: stopping listener {}: {e}", l.addr);
        }
    }
}

fn resume(
    steer: &mut Option<Steer>,
    shared: &Shared,
    listeners: &[Arc<Listener>],
    label: &str,
) -> Result<()> {
    for l in listeners.iter().filter(|l| l.is_tcp()) {
        l.resume()
            .with_context(|| format!("listening again on {}", l.addr))?;
    }
    if let Some(s) = steer.as_mut() {
        for &(i, group) in &s.groups {
            s.maps.register(group, s.slot, listeners[i].as_ref())?;
        }
        s.maps.lock()?.flip(s.slot, None)?;
    }
    shared.accepting.send_replace(true);
    info!("{label}: SIGTTIN: accepting again, traffic taken back");
    Ok(())
}

/// Waits for in-flight connections, at most `hard_stop_after`.
async fn drain(
    cfg: &Config,
    steer: &mut Option<Steer>,
    shared: &Shared,
    label: &str,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> Outcome {
    let deadline = Instant::now() + cfg.global.hard_stop_after;
    let mut tick = tokio::time::interval(TICK);
    loop {
        let left = shared.stats.active.load(Ordering::Relaxed);
        if left == 0 {
            return Outcome::Drained;
        }
        if Instant::now() >= deadline {
            warn!(
                "{label}: hard_stop_after ({:?}) reached with {left} connections open: cutting them",
                cfg.global.hard_stop_after
            );
            return Outcome::DeadlineCut;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => return Outcome::HardStop,
            _ = int.recv() => return Outcome::HardStop,
        }
        publish(steer, shared, Phase::Draining);
    }
}

async fn accept_loop(
    listener: Arc<Listener>,
    stage: Arc<Stage>,
    shared: Arc<Shared>,
    maxconn: Option<Arc<Semaphore>>,
) {
    let mut accepting = shared.accepting.subscribe();
    // A UNIX listener cannot hand its queue to a successor, and the stages
    // chained to it (ours, while they drain; nobody else once a successor
    // renamed its path) still need it: it accepts until the generation
    // exits.
    let always = !listener.is_tcp();
    loop {
        if !always && !*accepting.borrow_and_update() {
            if accepting.changed().await.is_err() {
                return;
            }
            continue;
        }
        let permit = match &maxconn {
            Some(sem) => tokio::select! {
                p = sem.clone().acquire_owned() => p.ok(),
                _ = accepting.changed(), if !always => continue,
            },
            None => None,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = accepting.changed(), if !always => continue,
            _ = shared.sweep.notified() => continue,
        };
        match accepted {
            Ok((stream, peer)) => spawn_conn(stream, peer, &stage, &shared, permit),
            Err(e) if !*accepting.borrow() => {
                debug!("listener {}: accept after stop: {e}", stage.name)
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(
                    "listener {} ({}): accept failed: {e}",
                    stage.name, listener.addr
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One open connection in [`Stats::active`], until dropped.
struct OpenConn(Arc<Shared>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs one connection on the current (stage) runtime.
fn spawn_conn(
    stream: Stream,
    peer: PeerAddr,
    stage: &Arc<Stage>,
    shared: &Arc<Shared>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    shared.stats.active.fetch_add(1, Ordering::Relaxed);
    if let Some(flipped) = shared.flipped_at.get()
        && !shared.first_conn_logged.load(Ordering::Relaxed)
        && !shared.first_conn_logged.swap(true, Ordering::Relaxed)
    {
        info!(
            after_flip_us = flipped.elapsed().as_micros() as u64,
            listener = %stage.name,
            "first connection after the flip"
        );
    }
    let stage = stage.clone();
    // Counts the connection as open until the task ends, even by a panic:
    // the drain waits for this count.
    let open = OpenConn(shared.clone());
    tokio::spawn(async move {
        if let Err(e) = stage.serve(stream, peer.clone()).await {
            open.0.stats.failed.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, listener = %stage.name, "connection failed: {e}");
        }
        drop(open);
        drop(permit);
    });
}

/// Forwards the steering program's aya-log events to our log (debug level).
fn spawn_ebpf_log(ebpf: &mut aya::Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => match sys::async_fd(logger) {
            Ok(mut fd) => {
                tokio::spawn(async move {
                    while let Ok(mut guard) = fd.readable_mut().await {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(e) => debug!("eBPF log not readable: {e}"),
        },
        Err(e) => debug!("eBPF log not available: {e}"),
    }
}

/// Checks that nothing else is wrong with the options before touching state.
pub fn validate(opts: &Options) -> Result<()> {
    for &pid in opts.soft_stop.iter().chain(&opts.hard_stop) {
        if pid == 0 || pid == std::process::id() {
            bail!("-sf/-st: {pid} is not the PID of an old generation");
        }
    }
    Ok(())
}
