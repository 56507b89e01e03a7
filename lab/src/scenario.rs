//! The scenarios: what happens to the generations while the load runs.
//! Each run gets a fresh sandbox (network namespace, bpffs mount), its
//! contender, the lab's backend, and writes its records.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use proxy_harness::{Sandbox, certs::make_cert, config::BACKEND_ADDR, config::PROXY_ADDR};

use crate::{
    backend, kernel,
    load::{Load, Mix, Target},
    migrate,
    modes::{Contender, Gen, Mode, Setup},
    records::{self, Event, GenSample, KernelFigures, Kind, RunInfo},
};

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Scenario {
    Rolling,
    HungOld,
    DiesAfterFlip,
    KillDraining,
    ManyGenerations,
    Canary,
    /// One of the kernel selftest's four migration paths (no load: a few
    /// clients set up for the path).
    Migrate(migrate::Path),
}

impl Scenario {
    pub const ALL: [Scenario; 10] = [
        Scenario::Rolling,
        Scenario::HungOld,
        Scenario::DiesAfterFlip,
        Scenario::KillDraining,
        Scenario::ManyGenerations,
        Scenario::Canary,
        Scenario::Migrate(migrate::Path::Established),
        Scenario::Migrate(migrate::Path::Fastopen),
        Scenario::Migrate(migrate::Path::SynackTimer),
        Scenario::Migrate(migrate::Path::FinalAck),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Rolling => "rolling",
            Scenario::HungOld => "hung-old",
            Scenario::DiesAfterFlip => "dies-after-flip",
            Scenario::KillDraining => "kill-draining",
            Scenario::ManyGenerations => "many-generations",
            Scenario::Canary => "canary",
            Scenario::Migrate(path) => path.name(),
        }
    }

    /// One line for `--help`.
    pub fn help(self) -> &'static str {
        match self {
            Scenario::Rolling => "N handovers at a fixed interval",
            Scenario::HungOld => {
                "the old generation is stopped (SIGSTOP) just before each handover and resumed \
                 (or killed, --hung-fate kill) one interval later"
            }
            Scenario::DiesAfterFlip => {
                "the new generation is SIGKILLed as soon as it serves (rollback); a fresh one \
                 follows one interval later where the old one did not take the traffic back"
            }
            Scenario::KillDraining => {
                "the old generation is SIGKILLed while it drains: handover_grace + 50 ms after \
                 its successor serves (ours has closed its listeners then; HAProxy got -sf)"
            }
            Scenario::ManyGenerations => {
                "handovers faster than the drain (streams in the mix keep old generations busy): \
                 several generations drain at once"
            }
            Scenario::Canary => {
                "ours with eBPF only: a 10% canary, promoted; then a second canary, aborted"
            }
            Scenario::Migrate(path) => path.help(),
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|m| m.name()).collect();
                format!("{s:?}: expected one of {}", names.join(", "))
            })
    }
}

/// What to do with a hung old generation.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HungFate {
    Resume,
    Kill,
}

/// The settings of every run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub proxy_bin: PathBuf,
    pub rate: f64,
    pub mix: Mix,
    pub handovers: u32,
    pub interval: Duration,
    pub conn_timeout: Duration,
    pub listener_mode: String,
    pub hard_stop_after: Duration,
    pub handover_grace: Duration,
    pub hung_fate: HungFate,
    /// Before the first and after the last handover.
    pub settle: Duration,
}

/// The events of a run, timed from its start.
struct Events {
    t0: Instant,
    list: Mutex<Vec<Event>>,
}

impl Events {
    fn count(&self, event: &str) -> usize {
        self.list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| e.event == event)
            .count()
    }

    fn push(&self, event: &str, detail: impl fmt::Display) {
        self.list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event {
                t_us: self.t0.elapsed().as_micros() as u64,
                event: event.to_string(),
                detail: detail.to_string(),
            });
    }
}

fn label(g: &Gen) -> String {
    match g.generation {
        Some(n) => format!("generation {n} pid {}", g.pid),
        None => format!("pid {}", g.pid),
    }
}

/// Runs `scenario` against `mode`; writes the records into `dir`.
pub fn run(mode: Mode, scenario: Scenario, s: &Settings, dir: &Path) -> Result<RunInfo> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut info = RunInfo {
        mode: mode.name().into(),
        scenario: scenario.name().into(),
        rate: s.rate,
        mix: s.mix.to_string(),
        handovers: s.handovers,
        interval_ms: s.interval.as_millis() as u64,
        ..RunInfo::default()
    };
    if let Scenario::Migrate(path) = scenario {
        let outcome = migrate::run(path, mode, &s.proxy_bin)?;
        info.handovers = 1;
        info.kernel = outcome.kernel;
        info.notes = outcome.notes;
        info.skipped = outcome.skipped;
        if info.skipped.is_none() {
            records::write_conns(&dir.join("conns.csv"), &outcome.records)?;
            records::write_events(&dir.join("events.csv"), &outcome.events)?;
        }
        records::write_run(&dir.join("run.json"), &info)?;
        return Ok(info);
    }
    if scenario == Scenario::Canary && mode != Mode::Ebpf {
        info.skipped = Some(
            "a canary needs kernel steering: no reload of this contender can split new \
             connections"
                .into(),
        );
        records::write_run(&dir.join("run.json"), &info)?;
        return Ok(info);
    }
    let sb = Sandbox::with_proxy(
        &format!("lab-{}-{}", mode.name().replace('+', "-"), scenario.name()),
        s.proxy_bin.clone(),
    );
    let rt = sb.runtime();
    backend::start(&rt, BACKEND_ADDR).context("starting the lab's backend")?;
    let tls = s.mix.has(Kind::Tls);
    let cert = tls.then(|| make_cert(&sb.dir, "lab", &["lab.test"]));
    let setup = Setup {
        listener_mode: s.listener_mode.clone(),
        tls,
        hard_stop_after: s.hard_stop_after,
        handover_grace: s.handover_grace,
    };
    let contender = Contender::new(&sb, mode, setup, cert.as_ref())?;
    let t0 = Instant::now();
    let events = Events {
        t0,
        list: Mutex::new(Vec::new()),
    };
    let first = contender.start()?;
    events.push("ready", label(&first));

    let target = Target {
        addr: PROXY_ADDR.to_string(),
        tls: cert.as_ref().map(|c| {
            let config = proxy_harness::tls::trusting(&c.der, &[], false);
            (
                tokio_rustls::TlsConnector::from(config),
                rustls::pki_types::ServerName::try_from("lab.test").expect("a DNS name"),
            )
        }),
        conn_timeout: s.conn_timeout,
    };
    let before = kernel::snapshot();
    let sampling = Arc::new(AtomicBool::new(true));
    let samples = Arc::new(Mutex::new(Vec::new()));
    /// Stops the sampler however the scope ends (a panic included: the
    /// scope waits for its threads).
    struct StopOnDrop<'f>(&'f AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }
    let notes = std::thread::scope(|scope| -> Result<BTreeMap<String, String>> {
        let _stop = StopOnDrop(&sampling);
        if mode == Mode::Ebpf {
            let (sampling, samples, sb) = (sampling.clone(), samples.clone(), &sb);
            scope.spawn(move || sample(sb, t0, &sampling, &samples));
        }
        let bound = s.settle * 2 + s.interval * (s.handovers + 8) + Duration::from_secs(10);
        let load = Load::start(&rt, s.rate, bound, s.mix.clone(), target, t0);
        std::thread::sleep(s.settle);
        let mut run = Run {
            contender: &contender,
            events: &events,
            current: first,
            old: Vec::new(),
            notes: BTreeMap::new(),
            max_alive: 1,
            sb: &sb,
        };
        let acted = run.act(scenario, s);
        std::thread::sleep(s.settle);
        let (conns, shed) = load.finish(&rt);
        sampling.store(false, Ordering::Relaxed);
        acted?;
        run.finish(s);
        info.duration_ms = t0.elapsed().as_millis() as u64;
        records::write_conns(&dir.join("conns.csv"), &conns)?;
        run.notes
            .insert("max_generations_alive".into(), run.max_alive.to_string());
        if shed > 0 {
            run.notes.insert("shed_by_client".into(), shed.to_string());
        }
        Ok(run.notes)
    })?;
    let after = kernel::snapshot();
    let program = (mode == Mode::Ebpf)
        .then(|| sb.try_status().ok())
        .flatten()
        .map(|st| {
            serde_json::json!({
                "selected": st.counters.selected,
                "migrated": st.counters.migrated,
                "fallback_new": st.counters.fallback_new,
                "fallback_migrate": st.counters.fallback_migrate,
            })
        });
    info.kernel = KernelFigures {
        counters: kernel::delta(&before, &after),
        program,
    };
    info.notes = notes;
    records::write_events(
        &dir.join("events.csv"),
        &events.list.lock().unwrap_or_else(|p| p.into_inner()),
    )?;
    records::write_generations(
        &dir.join("generations.csv"),
        &samples.lock().unwrap_or_else(|p| p.into_inner()),
    )?;
    records::write_run(&dir.join("run.json"), &info)?;
    Ok(info)
}

/// Every 100 ms: each generation's accepted connections.
fn sample(sb: &Sandbox, t0: Instant, on: &AtomicBool, out: &Mutex<Vec<GenSample>>) {
    while on.load(Ordering::Relaxed) {
        if let Ok(st) = sb.try_status() {
            let t_us = t0.elapsed().as_micros() as u64;
            let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
            for g in st.generations.iter().filter(|g| g.alive) {
                out.push(GenSample {
                    t_us,
                    generation: g.generation,
                    accepted: g.accepted,
                });
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The generations of one run.
struct Run<'a> {
    contender: &'a Contender<'a>,
    events: &'a Events,
    current: Gen,
    /// Replaced generations, until they exit.
    old: Vec<Gen>,
    notes: BTreeMap<String, String>,
    max_alive: usize,
    sb: &'a Sandbox,
}

impl Run<'_> {
    /// Notes the exits of old generations; counts the live ones.
    fn reap(&mut self) {
        let events = self.events;
        self.old.retain_mut(|g| {
            if g.exited() {
                events.push("old_exit", label(g));
                false
            } else {
                true
            }
        });
        self.max_alive = self.max_alive.max(self.old.len() + 1);
    }

    /// Waits until `at`, reaping meanwhile.
    fn until(&mut self, at: Instant) {
        while Instant::now() < at {
            self.reap();
            std::thread::sleep(Duration::from_millis(5).min(at - Instant::now()));
        }
    }

    fn hand_over(&mut self) -> Result<()> {
        self.events.push("handover", label(&self.current));
        let next = self.contender.hand_over(&self.current).map_err(|e| {
            let status = if self.contender.mode == Mode::Ebpf {
                self.sb
                    .try_status()
                    .map(|st| format!("{st:#?}"))
                    .unwrap_or_else(|e| e)
            } else {
                String::new()
            };
            e.context(format!(
                "handover {} failed; status:\n{status}",
                self.events.count("handover")
            ))
        })?;
        self.events.push("ready", label(&next));
        let old = std::mem::replace(&mut self.current, next);
        self.old.push(old);
        self.reap();
        Ok(())
    }

    fn act(&mut self, scenario: Scenario, s: &Settings) -> Result<()> {
        let mut next = Instant::now();
        match scenario {
            Scenario::Rolling | Scenario::ManyGenerations => {
                for _ in 0..s.handovers {
                    self.until(next);
                    next += s.interval;
                    self.hand_over()?;
                }
            }
            Scenario::HungOld => {
                for _ in 0..s.handovers {
                    self.until(next);
                    next += s.interval;
                    let old_pid = self.current.pid;
                    self.current.signal(libc::SIGSTOP);
                    self.events.push("sigstop", label(&self.current));
                    // The release comes from another thread: a contender
                    // whose handover needs the old process (HAProxy -x)
                    // waits for it.
                    let fate = s.hung_fate;
                    let delay = s.interval;
                    let events = self.events;
                    std::thread::scope(|scope| -> Result<()> {
                        scope.spawn(move || {
                            std::thread::sleep(delay);
                            let (sig, what) = match fate {
                                HungFate::Resume => (libc::SIGCONT, "sigcont"),
                                HungFate::Kill => (libc::SIGKILL, "kill"),
                            };
                            // Safety: kill(2) on a PID we started.
                            unsafe { libc::kill(old_pid as i32, sig) };
                            events.push(what, format!("pid {old_pid}"));
                        });
                        self.hand_over()
                    })?;
                }
            }
            Scenario::DiesAfterFlip => {
                let mut rollbacks = 0;
                for _ in 0..s.handovers {
                    self.until(next);
                    next += s.interval;
                    self.events.push("handover", label(&self.current));
                    let mut doomed = self.contender.hand_over(&self.current)?;
                    doomed.signal(libc::SIGKILL);
                    self.events.push("kill", label(&doomed));
                    doomed.wait_exit(Duration::from_secs(5));
                    // Ours with eBPF rolls back: the old generation takes
                    // the traffic again. The others were told to stop: a
                    // fresh generation replaces them half an interval later.
                    std::thread::sleep(s.interval / 2);
                    if self.contender.mode == Mode::Ebpf && !self.current.exited() {
                        rollbacks += 1;
                        continue;
                    }
                    self.events.push("restart", "");
                    let fresh = self.contender.start()?;
                    self.events.push("ready", label(&fresh));
                    let old = std::mem::replace(&mut self.current, fresh);
                    self.old.push(old);
                }
                self.notes
                    .insert("rolled_back".into(), rollbacks.to_string());
            }
            Scenario::KillDraining => {
                for _ in 0..s.handovers {
                    self.until(next);
                    next += s.interval;
                    let replaced = self.current.pid;
                    self.hand_over()?;
                    self.until(Instant::now() + s.handover_grace + Duration::from_millis(50));
                    // Unless it has drained and exited already.
                    if let Some(old) = self.old.iter().find(|g| g.pid == replaced) {
                        old.signal(libc::SIGKILL);
                        self.events.push("kill", label(old));
                    }
                }
            }
            Scenario::Canary => self.canary(s)?,
            // Dispatched by run() before any load starts.
            Scenario::Migrate(_) => {}
        }
        Ok(())
    }

    /// A 10% canary, promoted; then another, aborted.
    fn canary(&mut self, s: &Settings) -> Result<()> {
        let admin = |what: &str| -> Result<()> {
            let out = self.sb.run_proxy_cmd(
                &[
                    what,
                    "--name",
                    &self.sb.name,
                    "--bpffs",
                    &self.sb.bpffs.display().to_string(),
                ],
                Duration::from_secs(10),
            );
            anyhow::ensure!(
                out.status.success(),
                "proxy {what}: {}{}",
                out.stdout,
                out.stderr
            );
            Ok(())
        };
        let hold = s.interval * s.handovers.max(2);
        let canary = self.contender.start_with(&["--canary", "10"])?;
        self.events.push("canary", label(&canary));
        self.until(Instant::now() + hold);
        admin("promote")?;
        self.events.push("promote", label(&canary));
        let old = std::mem::replace(&mut self.current, canary);
        self.old.push(old);
        self.until(Instant::now() + hold);
        let mut second = self.contender.start_with(&["--canary", "10"])?;
        self.events.push("canary", label(&second));
        self.until(Instant::now() + hold);
        admin("abort")?;
        self.events.push("abort", label(&second));
        let exited = second.wait_exit(s.hard_stop_after + Duration::from_secs(2));
        if exited {
            self.events.push("old_exit", label(&second));
        }
        Ok(())
    }

    /// Waits for the replaced generations, then stops the last one.
    fn finish(&mut self, s: &Settings) {
        let deadline = Instant::now() + s.hard_stop_after + Duration::from_secs(2);
        while !self.old.is_empty() && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(10));
        }
        for g in self.old.iter().chain(std::iter::once(&self.current)) {
            g.signal(libc::SIGKILL);
        }
        for g in self
            .old
            .iter_mut()
            .chain(std::iter::once(&mut self.current))
        {
            g.wait_exit(Duration::from_secs(5));
        }
    }
}
