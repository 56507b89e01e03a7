//! One running copy of the proxy as a value: bind, take over, serve, hand
//! over.
//!
//! The lifecycle is one [`Phase`] (see [`lifecycle`]), changed only by
//! [`Generation::enter`]; the control loop ([`control`]) turns commands
//! (signals, pinned-map changes) into transitions; the accept loops
//! ([`accept`]) follow the phase.
//!
//! Handover, seen from the new generation: claim a free slot, bind with
//! SO_REUSEPORT, attach the steering program and register the sockets, flip
//! the active slot (one map write), mark itself active. Seen from the old
//! generation (it polls the pinned maps, so no PID is needed): the active slot
//! names another generation; once that one is active and alive, wait
//! `handover_grace`, then stop listening (the kernel migrates the accept
//! queue), drain, exit. If the new generation dies or stalls before the old
//! one stopped listening, the old one flips the slot back (rollback).

mod accept;
pub mod canary;
pub mod control;
pub mod lifecycle;

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Instant,
};

use anyhow::{Context, Result, bail};
pub use control::{Command, signal_commands};
use proxy_common::Phase;
use tokio::{
    sync::{Semaphore, mpsc},
    task::AbortHandle,
};
use tracing::{error, info, warn};

use self::{
    accept::{Shared, accept_loop},
    control::Outcome,
    lifecycle::Lifecycle,
};
use crate::{
    config::{Addr, Config, Mode, SteeringMode},
    health::Health,
    stage::{Stage, StageContext, StageRuntime, StageSettings, socket::ListenSocket},
    stats::{StatsSource, counters::Registry},
    steering::{self, Steering},
    sys,
};

/// Fault injection for the tests.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TestHook {
    /// SIGSTOP ourselves right after the flip, before marking active.
    StopAfterFlip,
}

impl TestHook {
    /// From `PROXY_TEST_HOOK`, in builds with the `test-hooks` feature only
    /// (`cargo xtask test` builds them); a production build never reads it.
    pub fn from_env() -> Option<Self> {
        #[cfg(feature = "test-hooks")]
        if std::env::var("PROXY_TEST_HOOK").as_deref() == Ok("stop-after-flip") {
            return Some(TestHook::StopAfterFlip);
        }
        None
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
    /// Start as a canary taking this share (basis points) of new
    /// connections beside the active generation, instead of taking over.
    pub canary: Option<u32>,
    pub hook: Option<TestHook>,
}

impl Options {
    /// Checks that nothing else is wrong with the options before touching
    /// state.
    pub fn validate(&self) -> Result<()> {
        for &pid in self.soft_stop.iter().chain(&self.hard_stop) {
            if pid == 0 || pid == std::process::id() {
                bail!("-sf/-st: {pid} is not the PID of an old generation");
            }
        }
        if self.canary.is_some() && !(self.soft_stop.is_empty() && self.hard_stop.is_empty()) {
            bail!(
                "--canary with -sf/-st: a canary runs beside the active generation; stop the \
                 old one with `proxy promote` instead"
            );
        }
        if self.canary.is_some() && self.config.global.steering == SteeringMode::Reuseport {
            bail!(
                "--canary needs eBPF steering (global.steering is \"reuseport\"): without the \
                 program nothing can split new connections"
            );
        }
        Ok(())
    }
}

/// One generation, from its slot claim to its exit.
pub struct Generation {
    opts: Options,
    /// How the logs name it: `generation N (slot S)`.
    label: String,
    steering: Steering,
    life: Lifecycle,
    shared: Arc<Shared>,
    /// Per listener and per server counters.
    registry: Arc<Registry>,
    /// Server states: checked while active, followed in every phase.
    health: Arc<Health>,
    /// Data listeners (TCP and UNIX), stopped and resumed by the control
    /// loop.
    listeners: Vec<Arc<ListenSocket>>,
    /// Stats listeners and their serving tasks.
    stats_listeners: Vec<(Arc<ListenSocket>, AbortHandle)>,
    /// The stages' own runtimes; dropped last.
    runtimes: Vec<StageRuntime>,
    pidfile: Option<PathBuf>,
    /// When we first saw an active successor (the grace starts then).
    successor_seen: Option<Instant>,
    /// While active: the canary beside us, as we judge it.
    canary_watch: Option<canary::Watch>,
}

/// Runs one generation until it has stopped. `commands` is what it obeys
/// (see [`signal_commands`]).
pub async fn run(opts: Options, commands: mpsc::Receiver<Command>) -> Result<()> {
    let global = &opts.config.global;
    let dir = steering::pin_dir(&global.bpffs, &global.name);
    // Claim a slot before binding, so that a full instance fails early.
    let steering = Steering::claim(global.steering, &dir).with_context(|| {
        if global.steering == SteeringMode::Ebpf {
            "steering = \"ebpf\" but eBPF steering cannot be set up"
        } else {
            "claiming a generation slot"
        }
    })?;
    if opts.canary.is_some() {
        if let Steering::Reuseport = steering {
            bail!(
                "--canary needs eBPF steering, which is unavailable here (see the error above): \
                 nothing can split new connections"
            );
        }
        if let Err(e) = steering.check_canary() {
            let mut steering = steering;
            steering.leave();
            return Err(e).context("--canary");
        }
    }
    let mut generation = Generation::new(opts, steering);
    if let Err(e) = generation.start().await {
        error!("{}: {e:#}", generation.label);
        // Free the slot at once rather than after the heartbeat goes stale.
        generation.steering.leave();
        return Err(e);
    }
    let outcome = generation.control(commands).await;
    generation.finish(outcome);
    Ok(())
}

/// Descriptors kept aside for listeners, runtimes, maps and logs.
const RESERVED_FDS: u64 = 64;

/// Which connections may splice (`global.splice`, a tcp listener without
/// TLS), and so hold two pipes: four descriptors each, for at most a
/// quarter of them (HAProxy's `maxpipes` default).
#[derive(Debug, PartialEq)]
enum Splicing {
    Off,
    /// Only listeners with a `maxconn` of their own: this many connections.
    Bounded(u64),
    /// A listener bounded only by the generation's `maxconn`.
    Unbounded,
}

fn splicing(cfg: &Config) -> Splicing {
    let mut plain = cfg
        .listeners
        .iter()
        .filter(|l| l.mode == Mode::Tcp && l.tls.is_none())
        .peekable();
    if !cfg.global.splice || plain.peek().is_none() {
        return Splicing::Off;
    }
    plain
        .map(|l| l.maxconn.map(|n| n as u64))
        .sum::<Option<u64>>()
        .map_or(Splicing::Unbounded, Splicing::Bounded)
}

/// How many connections may hold pipes at once.
fn max_splicing(splicing: &Splicing, maxconn: usize) -> usize {
    match *splicing {
        Splicing::Off => 0,
        Splicing::Bounded(n) => (n / 4) as usize,
        Splicing::Unbounded => maxconn / 4,
    }
}

/// The generation's connection cap: `global.maxconn`, at most what the
/// open-file limit allows, two descriptors a connection, and the pipes of
/// those that may splice ([`Splicing`]): a descriptor a connection of
/// their listeners when these have a `maxconn`, else one more for every
/// connection (three). The limit is raised first: to what `global.maxconn`
/// needs (HAProxy's way), or else the soft limit to the hard one.
fn maxconn(cfg: &Config, splicing: &Splicing, label: &str) -> usize {
    let listeners = cfg
        .listeners
        .iter()
        .map(|l| l.bind.len() as u64)
        .sum::<u64>();
    let reserved = RESERVED_FDS + 2 * listeners;
    let needed = |n: u64| {
        reserved
            + match *splicing {
                Splicing::Off => 2 * n,
                Splicing::Bounded(pipes) => 2 * n + pipes,
                Splicing::Unbounded => 3 * n,
            }
    };
    let wanted = cfg.global.maxconn.map(|n| needed(n as u64));
    let nofile = sys::raise_nofile_limit(wanted).unwrap_or(1024);
    let room = nofile.saturating_sub(reserved);
    let budget = match *splicing {
        Splicing::Off => room / 2,
        Splicing::Bounded(n) => room.saturating_sub(n) / 2,
        Splicing::Unbounded => room / 3,
    }
    .max(1) as usize;
    match cfg.global.maxconn {
        Some(n) if n > budget => {
            warn!(
                "{label}: global.maxconn {n} needs {} open files, and the limit could be \
                 raised only to {nofile}: using maxconn {budget} (the proxy raises the hard \
                 limit itself when it has CAP_SYS_RESOURCE, up to the sysctl fs.nr_open; \
                 else raise it with LimitNOFILE= or ulimit -Hn)",
                needed(n as u64)
            );
            budget
        }
        Some(n) => {
            info!("{label}: maxconn {n} (open-file limit {nofile})");
            n
        }
        None => {
            info!("{label}: maxconn {budget} (open-file limit {nofile})");
            budget
        }
    }
}

impl Generation {
    fn new(opts: Options, steering: Steering) -> Self {
        let registry = Arc::new(Registry::new(&opts.config));
        let splicing = splicing(&opts.config);
        let maxconn = maxconn(&opts.config, &splicing, &steering.label());
        crate::stage::set_max_splicing(max_splicing(&splicing, maxconn));
        let health_map = steering.open_health().unwrap_or_else(|e| {
            warn!(
                "{}: server states stay in this generation (the pinned ones cannot be \
                 opened: {e})",
                steering.label()
            );
            None
        });
        let health = Health::new(&opts.config, health_map, steering.generation());
        Self {
            health,
            label: steering.label(),
            pidfile: opts
                .pidfile
                .clone()
                .or_else(|| opts.config.global.pidfile.clone()),
            opts,
            steering,
            life: Lifecycle::default(),
            shared: Arc::new(Shared::new(maxconn)),
            registry,
            listeners: Vec::new(),
            stats_listeners: Vec::new(),
            runtimes: Vec::new(),
            successor_seen: None,
            canary_watch: None,
        }
    }

    /// The only way the phase changes.
    fn enter(&mut self, phase: Phase) {
        self.life.enter(
            phase,
            &mut self.steering,
            &self.shared.conns,
            &self.registry,
        );
    }

    /// The heartbeat in the current phase.
    fn beat(&mut self) {
        self.life
            .beat(&mut self.steering, &self.shared.conns, &self.registry);
    }

    fn open_connections(&self) -> u64 {
        self.shared.conns.open.load(Relaxed)
    }

    /// Binds, registers, serves, and takes over: active when it returns.
    /// A failure before the flip leaves the running generation untouched.
    async fn start(&mut self) -> Result<()> {
        self.health.spawn(self.life.subscribe());
        self.bind()?;
        self.bind_stats()?;
        // Written before the flip, so that a pidfile problem stops us while
        // the old generation still has the traffic.
        if let Some(path) = &self.pidfile {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .with_context(|| format!("writing pidfile {}", path.display()))?;
        }
        // UNIX listeners take over their paths now, the last step that can
        // fail before the flip.
        for l in &self.listeners {
            l.publish()
                .with_context(|| format!("publishing {}", l.addr))?;
        }
        self.enter(Phase::Ready);
        self.take_over()?;
        sys::release_freed_memory();
        Ok(())
    }

    /// Every listener's sockets, each with its stage on the stage's runtime,
    /// steered, with an accept loop running from the start: before the flip
    /// the program sends nothing here (unless the active slot is empty and
    /// the kernel falls back), after it everything.
    fn bind(&mut self) -> Result<()> {
        let cfg = &self.opts.config;
        for l in &cfg.listeners {
            let runtime = StageRuntime::new(&l.name, l.cpus.as_deref())?;
            let stage = Stage::new(
                StageSettings::try_from((cfg, l))?,
                StageContext {
                    draining: self.life.draining(),
                    drain_deadline: self.life.drain_deadline(),
                    metrics: &self.registry,
                    health: &self.health,
                    generation: self.steering.generation(),
                },
            );
            let maxconn = l.maxconn.map(|n| Arc::new(Semaphore::new(n)));
            for addr in &l.bind {
                let listener = {
                    let _entered = runtime.handle().enter();
                    ListenSocket::bind(addr, l.backlog, l.unix_mode)
                        .with_context(|| format!("listener {}: binding {addr}", l.name))?
                };
                let listener = Arc::new(listener);
                self.steering
                    .register(addr, listener.clone())
                    .with_context(|| {
                        format!("listener {}: attaching steering to {addr}", l.name)
                    })?;
                runtime.handle().spawn(accept_loop(
                    listener.clone(),
                    stage.clone(),
                    self.shared.clone(),
                    self.life.subscribe(),
                    maxconn.clone(),
                ));
                self.listeners.push(listener);
            }
            self.runtimes.push(runtime);
        }
        Ok(())
    }

    /// Stats listeners (instance-wide and per stage): SO_REUSEPORT and
    /// steered like the data listeners, so that the stats port follows the
    /// active generation and its queue migrates at a handover; every
    /// generation shows the same figures, read from the pinned maps.
    fn bind_stats(&mut self) -> Result<()> {
        let cfg = &self.opts.config;
        let stats_configs = cfg.stats.iter().map(|s| (None, s)).chain(
            cfg.listeners
                .iter()
                .filter_map(|l| l.stats.as_ref().map(|s| (Some(l.name.clone()), s))),
        );
        for (only, sc) in stats_configs {
            let listener = Arc::new(
                ListenSocket::bind(&Addr::Tcp(sc.bind), 128, 0)
                    .with_context(|| format!("stats listener: binding {}", sc.bind))?,
            );
            let source = Arc::new(StatsSource {
                instance: cfg.global.name.clone(),
                banner: sc.banner.clone(),
                only_listener: only,
                maps: self.steering.open_maps()?.map(std::sync::Mutex::new),
                own_slot: self.steering.slot(),
                registry: self.registry.clone(),
                health: self.health.clone(),
                listener_backends: cfg
                    .listeners
                    .iter()
                    .map(|l| (l.name.clone(), l.backend.clone()))
                    .collect(),
            });
            self.steering
                .register(&listener.addr, listener.clone())
                .with_context(|| format!("stats listener: attaching steering to {}", sc.bind))?;
            let task = tokio::spawn(accept::stats_loop(
                listener.clone(),
                source,
                sc.maxconn,
                sc.http_request_timeout,
            ));
            self.stats_listeners.push((listener, task.abort_handle()));
        }
        Ok(())
    }

    /// The flip (one map write), then active; tells the old processes named
    /// by `-sf`/`-st`. A canary writes its share instead and stays beside
    /// the active generation.
    fn take_over(&mut self) -> Result<()> {
        let label = self.label.clone();
        if let Some(weight_bp) = self.opts.canary {
            self.steering
                .become_canary(weight_bp)
                .context("--canary: taking a share of new connections")?;
            let _ = self.shared.flipped_at.set(Instant::now());
            self.enter(Phase::Canary);
            self.shared.sweep.notify_waiters();
            info!(
                share_percent = steering::canary::percent(weight_bp),
                listeners = self.listeners.len(),
                "{label}: canary: takes {}% of new connections beside the active generation \
                 (`proxy promote` to make it active, `proxy abort` to stop it)",
                steering::canary::percent(weight_bp)
            );
            sys::sd_notify(&format!(
                "READY=1\nMAINPID={}\nSTATUS={label}: canary",
                std::process::id()
            ));
            return Ok(());
        }
        if let Steering::Ebpf(_) = self.steering {
            let stop = self.opts.hook == Some(TestHook::StopAfterFlip);
            if stop {
                warn!(
                    "{label}: PROXY_TEST_HOOK=stop-after-flip: stopping myself right after the flip"
                );
            }
            let previous = self.steering.flip()?;
            // At once: the accept loops run on other threads, and the
            // stalled generation this models takes no connection.
            if stop {
                sys::stop_self();
            }
            let _ = self.shared.flipped_at.set(Instant::now());
            info!(
                previous_slot = previous.map_or(-1, |p| i64::from(p.0)),
                "{label}: flipped the active slot to {}",
                self.steering.slot().map_or(0, |s| s.0)
            );
        }
        self.enter(Phase::Active);
        self.shared.sweep.notify_waiters();
        info!(listeners = self.listeners.len(), "{label}: active");
        sys::sd_notify(&format!(
            "READY=1\nMAINPID={}\nSTATUS={label}: active",
            std::process::id()
        ));
        for (pids, sig, what) in [
            (&self.opts.soft_stop, libc::SIGUSR1, "soft-stop (SIGUSR1)"),
            (&self.opts.hard_stop, libc::SIGTERM, "hard stop (SIGTERM)"),
        ] {
            for &pid in pids.iter() {
                match sys::kill(pid, sig) {
                    Ok(()) => info!("{label}: sent {what} to old process {pid}"),
                    Err(e) => warn!("{label}: could not send {what} to process {pid}: {e}"),
                }
            }
        }
        Ok(())
    }

    /// Stopped: leave the slot for the next generation, remove what is ours.
    fn finish(mut self, outcome: Outcome) {
        self.enter(Phase::Stopped);
        self.steering.leave();
        if let Some(path) = &self.pidfile
            && std::fs::read_to_string(path)
                .is_ok_and(|p| p.trim() == std::process::id().to_string())
        {
            let _ = std::fs::remove_file(path);
        }
        for l in &self.listeners {
            l.remove_path_if_ours();
        }
        drop(std::mem::take(&mut self.runtimes));
        let conns = &self.shared.conns;
        info!(
            accepted = conns.accepted.load(Relaxed),
            failed = conns.failed.load(Relaxed),
            cut = conns.open.load(Relaxed),
            "{}: generation stopped ({outcome})",
            self.label,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::UnixStream,
        time::timeout,
    };

    use super::*;

    /// A generation with one UNIX listener that waits for a PROXY header
    /// (so a client that sends nothing holds a connection open), without
    /// eBPF: nothing here needs root.
    async fn started(dir: &std::path::Path) -> (Generation, PathBuf) {
        started_with(dir, "").await
    }

    async fn started_with(dir: &std::path::Path, global: &str) -> (Generation, PathBuf) {
        let sock = dir.join("front.sock");
        let config = Config::for_tests(
            &format!("steering = \"reuseport\"\n{global}"),
            &format!("unix:{}", sock.display()),
            "accept_proxy = true\naccept_proxy_timeout = \"60s\"",
        );
        let mut generation = Generation::new(options(config), Steering::Reuseport);
        generation.start().await.expect("starts");
        (generation, sock)
    }

    #[test]
    fn pipes_count_in_maxconn_only_where_a_connection_may_splice() {
        let with =
            |global: &str, listener: &str| Config::for_tests(global, "127.0.0.1:1", listener);
        let plain = with("", "mode = \"tcp\"");
        let bounded = with("", "mode = \"tcp\"\nmaxconn = 400");
        let http = with("", "mode = \"http\"");
        let off = with("splice = false", "mode = \"tcp\"");
        assert_eq!(splicing(&plain), Splicing::Unbounded);
        assert_eq!(splicing(&bounded), Splicing::Bounded(400));
        assert_eq!(
            (splicing(&http), splicing(&off)),
            (Splicing::Off, Splicing::Off)
        );
        let room = sys::raise_nofile_limit(None).unwrap() - RESERVED_FDS - 2;
        let limits = |cfg: &Config| {
            let splicing = splicing(cfg);
            let n = maxconn(cfg, &splicing, "unit");
            (n as u64, max_splicing(&splicing, n))
        };
        let (n, pipes) = limits(&plain);
        assert_eq!(n, room / 3);
        assert_eq!(pipes as u64, n / 4);
        let (n, pipes) = limits(&bounded);
        assert_eq!(n, (room - 400) / 2);
        assert_eq!(pipes, 100);
        let (n, pipes) = limits(&http);
        assert_eq!(n, room / 2);
        assert_eq!(pipes, 0);
        assert_eq!(limits(&off).0, room / 2);
    }

    fn options(config: Config) -> Options {
        Options {
            config,
            pidfile: None,
            soft_stop: Vec::new(),
            hard_stop: Vec::new(),
            canary: None,
            hook: None,
        }
    }

    #[tokio::test]
    async fn commands_drive_the_phases_and_the_drain() {
        let dir = tempfile::tempdir().unwrap();
        let (mut generation, sock) = started(dir.path()).await;
        assert_eq!(generation.life.phase(), Phase::Active);

        assert!(matches!(
            generation.apply(Command::Pause),
            control::Next::Continue
        ));
        assert_eq!(generation.life.phase(), Phase::Standby);
        // Pause again is ignored; resume takes the traffic back.
        generation.apply(Command::Pause);
        assert_eq!(generation.life.phase(), Phase::Standby);
        generation.apply(Command::Resume);
        assert_eq!(generation.life.phase(), Phase::Active);

        // A client that sends nothing keeps its connection open: the drain
        // waits for it until a hard stop comes down the same stream.
        let mut client = UnixStream::connect(&sock).await.expect("connects");
        client.write_all(b"").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while generation.open_connections() == 0 {
            assert!(
                Instant::now() < deadline,
                "the connection was never accepted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (tx, rx) = mpsc::channel(4);
        tx.send(Command::SoftStop("test")).await.unwrap();
        let outcome = {
            let control = generation.control(rx);
            tokio::pin!(control);
            assert!(
                timeout(Duration::from_millis(300), &mut control)
                    .await
                    .is_err(),
                "a soft-stop must wait for the open connection"
            );
            tx.send(Command::HardStop).await.unwrap();
            timeout(Duration::from_secs(5), control)
                .await
                .expect("a hard stop ends the drain")
        };
        assert!(matches!(outcome, Outcome::HardStop), "{outcome:?}");
        assert_eq!(generation.life.phase(), Phase::Draining);
        drop(client);
        generation.finish(outcome);
        assert!(!sock.exists(), "the generation removes its UNIX socket");
    }

    #[tokio::test]
    async fn stats_listener_caps_connections_and_times_out_heads() {
        let dir = tempfile::tempdir().unwrap();
        let stats =
            "[stats]\nbind = \"127.0.0.1:0\"\nmaxconn = 1\nhttp_request_timeout = \"300ms\"";
        let (generation, _sock) = started_with(dir.path(), stats).await;
        let addr = generation.stats_listeners[0].0.bound_addr().unwrap();

        // A half-sent head holds the only slot, then is closed at the timeout.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        second
            .write_all(b"GET /stats.json HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut first_byte = [0u8; 1];
        assert!(
            timeout(Duration::from_millis(150), second.read(&mut first_byte))
                .await
                .is_err(),
            "the second connection must wait for the slot"
        );
        let mut rest = Vec::new();
        let closed = timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "the slow client is closed at http_request_timeout"
        );
        let mut answer = Vec::new();
        timeout(Duration::from_secs(5), second.read_to_end(&mut answer))
            .await
            .expect("served once the slot is free")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        generation.finish(Outcome::HardStop);
    }

    #[tokio::test]
    async fn global_maxconn_holds_the_next_connection_until_one_closes() {
        let dir = tempfile::tempdir().unwrap();
        let (generation, sock) = started_with(dir.path(), "maxconn = 1").await;
        let accepted = || generation.shared.conns.accepted.load(Relaxed);
        let first = UnixStream::connect(&sock).await.unwrap();
        let wait_for = |n: u64| async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while accepted() < n {
                assert!(Instant::now() < deadline, "{n} connections never accepted");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        wait_for(1).await;
        let _second = UnixStream::connect(&sock).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(accepted(), 1, "the second connection waits for a slot");
        drop(first);
        wait_for(2).await;
    }

    #[tokio::test]
    async fn soft_stop_with_nothing_open_drains_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut generation, _sock) = started(dir.path()).await;
        let (tx, rx) = mpsc::channel(1);
        tx.send(Command::SoftStop("test")).await.unwrap();
        let outcome = timeout(Duration::from_secs(5), generation.control(rx))
            .await
            .expect("drains");
        assert!(matches!(outcome, Outcome::Drained), "{outcome:?}");
    }
}
