//! The control loop: commands in, phase transitions out.
//!
//! Commands come as one stream passed in by the caller: `proxy run` feeds
//! it from the signals (HAProxy's: SIGUSR1 soft-stop, SIGTERM/SIGINT hard
//! stop, SIGTTOU pause, SIGTTIN resume), a test can feed it directly. What
//! the pinned maps say (replaced by a newer generation, traffic taken back
//! by an older one, a successor gone) becomes a command of the same kind
//! at every tick, and both go through [`Generation::apply`].

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use proxy_common::Phase;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use super::{Generation, canary};
use crate::{
    stage::DrainDeadline,
    steering::{CanaryRole, Holder},
    sys,
};

/// How often a generation publishes its heartbeat and looks at the maps.
pub const TICK: Duration = Duration::from_millis(50);

/// What a generation is told to do.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Stop accepting, drain, exit (SIGUSR1, or replaced).
    SoftStop(&'static str),
    /// Exit now (SIGTERM, SIGINT).
    HardStop,
    /// Stop accepting; queued connections migrate (SIGTTOU, or an older
    /// generation took the traffic back).
    Pause,
    /// Accept again and take the traffic back (SIGTTIN).
    Resume,
    /// The generation holding the active slot is gone: take the slot back
    /// if it still reads `seen`.
    RollBack(Option<crate::steering::Slot>),
    /// A canary: the active slot names us now.
    Promoted,
}

/// Installs the signal handlers now (a signal that arrives during startup
/// must not take its default action: terminate or stop the process) and
/// turns each signal into a [`Command`]. Needs a tokio runtime.
pub fn signal_commands() -> Result<mpsc::Receiver<Command>> {
    let install = |kind: SignalKind| signal(kind).context("installing signal handlers");
    let mut usr1 = install(SignalKind::user_defined1())?;
    let mut term = install(SignalKind::terminate())?;
    let mut int = install(SignalKind::interrupt())?;
    let mut ttou = install(SignalKind::from_raw(libc::SIGTTOU))?;
    let mut ttin = install(SignalKind::from_raw(libc::SIGTTIN))?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let command = tokio::select! {
                _ = usr1.recv() => Command::SoftStop("SIGUSR1"),
                _ = term.recv() => Command::HardStop,
                _ = int.recv() => Command::HardStop,
                _ = ttou.recv() => Command::Pause,
                _ = ttin.recv() => Command::Resume,
            };
            if tx.send(command).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Why the control loop ended.
#[derive(Debug)]
pub enum Outcome {
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

/// The next command, or None once the stream ended (no more commands: keep
/// running on the maps alone).
async fn next(commands: &mut Option<mpsc::Receiver<Command>>) -> Option<Command> {
    match commands {
        Some(rx) => {
            let command = rx.recv().await;
            if command.is_none() {
                *commands = None;
            }
            command
        }
        None => std::future::pending().await,
    }
}

/// What ends the loop after a command.
pub(super) enum Next {
    Continue,
    Drain,
    Stop(Outcome),
}

impl Generation {
    /// Runs until the generation has drained or was stopped.
    pub async fn control(&mut self, commands: mpsc::Receiver<Command>) -> Outcome {
        let mut commands = Some(commands);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let command = tokio::select! {
                _ = tick.tick() => self.observe(),
                c = next(&mut commands) => c,
            };
            let next = match command {
                Some(c) => self.apply(c),
                None => Next::Continue,
            };
            match next {
                Next::Continue => {}
                Next::Stop(outcome) => return outcome,
                Next::Drain => return self.drain(&mut commands).await,
            }
            self.beat();
            // Migrated connections may arrive without an epoll wakeup on
            // older kernels: sweep the queues every tick.
            self.shared.sweep.notify_waiters();
        }
    }

    /// What the pinned maps ask of us, while we are active: replaced
    /// (soft-stop after the grace), an older generation took the traffic
    /// back (stand by), or the active slot names a generation that died or
    /// stalled (roll back).
    fn observe(&mut self) -> Option<Command> {
        match self.life.phase() {
            Phase::Active => {}
            Phase::Canary => return self.observe_as_canary(),
            _ => return None,
        }
        let holder = match self.steering.holder() {
            Ok(h) => h,
            Err(e) => {
                warn!("{}: reading the active slot: {e}", self.label);
                return None;
            }
        };
        let label = &self.label;
        match holder {
            Holder::Us => {
                self.successor_seen = None;
                if let Some(own) = self.steering.slot() {
                    canary::tick(
                        &mut self.steering,
                        own,
                        &self.label,
                        &self.opts.config.global.canary,
                        &mut self.canary_watch,
                    );
                }
                None
            }
            // Flipped, not yet serving: wait.
            Holder::Newer { active: false, .. } => None,
            Holder::Newer { generation, .. } => {
                let seen = *self.successor_seen.get_or_insert_with(|| {
                    // A handover of this service is under way.
                    sys::sd_notify(&format!(
                        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS={label}: generation {generation} took over",
                        sys::monotonic_us(),
                    ));
                    Instant::now()
                });
                if seen.elapsed() < self.opts.config.global.handover_grace {
                    return None;
                }
                info!(
                    successor = generation,
                    "{label}: replaced by generation {generation}"
                );
                Some(Command::SoftStop("replaced"))
            }
            Holder::Older { generation } => {
                // The operator's choice (SIGTTIN): step back instead of
                // fighting over the slot.
                info!("{label}: generation {generation} took the traffic back: standing by");
                Some(Command::Pause)
            }
            Holder::Gone { seen } => Some(Command::RollBack(seen)),
        }
    }

    /// What the maps say to a canary: promoted (the active slot names us),
    /// aborted (nothing names us), or alone (the active generation is gone:
    /// take the active slot, as a rollback would).
    fn observe_as_canary(&mut self) -> Option<Command> {
        let label = &self.label;
        match self.steering.canary_role() {
            Ok(CanaryRole::Canary) => None,
            Ok(CanaryRole::Promoted) => Some(Command::Promoted),
            Ok(CanaryRole::Aborted) => {
                info!(
                    "{label}: canary aborted: every new connection goes to the active generation"
                );
                Some(Command::SoftStop("canary aborted"))
            }
            Ok(CanaryRole::ActiveGone { seen }) => match self.steering.take_over_as_canary(seen) {
                Ok(true) => {
                    warn!(
                        "{label}: the active generation is gone or stalled: the canary takes every \
                         new connection"
                    );
                    Some(Command::Promoted)
                }
                Ok(false) => None,
                Err(e) => {
                    error!("{label}: taking over from a dead active generation: {e}");
                    None
                }
            },
            Err(e) => {
                warn!("{label}: reading the canary state: {e}");
                None
            }
        }
    }

    /// The phase transitions, each through [`Lifecycle::enter`].
    ///
    /// [`Lifecycle::enter`]: super::lifecycle::Lifecycle::enter
    pub(super) fn apply(&mut self, command: Command) -> Next {
        let current = self.life.phase();
        let label = self.label.clone();
        match command {
            Command::HardStop => {
                info!("{label}: hard stop");
                return Next::Stop(Outcome::HardStop);
            }
            Command::SoftStop(why) => {
                info!("{label}: soft-stop ({why}): closing listeners, draining");
                if current == Phase::Canary
                    && let Some(slot) = self.steering.slot()
                    && let Err(e) = self.steering.abort_canary(slot)
                {
                    warn!("{label}: leaving the canary split: {e}");
                }
                sys::sd_notify(&format!("STOPPING=1\nSTATUS={label}: draining ({why})"));
                self.stop_listening();
                for (l, task) in &self.stats_listeners {
                    task.abort();
                    let _ = l.pause();
                }
                self.enter(Phase::Draining);
                return Next::Drain;
            }
            Command::Pause if current == Phase::Active => {
                info!("{label}: SIGTTOU: stopped accepting (queued connections migrate)");
                self.stop_listening();
                self.enter(Phase::Standby);
            }
            Command::Resume if current == Phase::Standby => match self.resume() {
                Ok(()) => {
                    info!("{label}: SIGTTIN: accepting again, traffic taken back");
                    self.successor_seen = None;
                    self.enter(Phase::Active);
                }
                // The open connections must not pay for it.
                Err(e) => error!("{label}: SIGTTIN failed, still standing by: {e:#}"),
            },
            Command::RollBack(seen) => self.roll_back(seen),
            Command::Promoted if current == Phase::Canary => {
                info!("{label}: promoted: the canary is now the active generation");
                sys::sd_notify(&format!(
                    "READY=1\nSTATUS={label}: active (promoted canary)"
                ));
                self.successor_seen = None;
                self.enter(Phase::Active);
            }
            Command::Promoted => debug!("{label}: promotion ignored in phase {current:?}"),
            Command::Pause | Command::Resume => {
                debug!("{label}: signal ignored in phase {current:?}")
            }
        }
        Next::Continue
    }

    fn stop_listening(&self) {
        for l in &self.listeners {
            if let Err(e) = l.pause() {
                warn!("{}: stopping listener {}: {e}", self.label, l.addr);
            }
        }
    }

    fn resume(&mut self) -> Result<()> {
        for l in self.listeners.iter().filter(|l| l.is_tcp()) {
            l.resume()
                .with_context(|| format!("listening again on {}", l.addr))?;
        }
        self.steering.take_back()?;
        Ok(())
    }

    /// No live generation holds the active slot: take the traffic back.
    fn roll_back(&mut self, seen: Option<crate::steering::Slot>) {
        let label = &self.label;
        match self.steering.roll_back(seen) {
            Ok(true) => {
                warn!(
                    dead_slot = seen.map_or(-1, |a| i64::from(a.0)),
                    "{label}: the generation holding the active slot is gone or stalled: rolled back, taking traffic again"
                );
                sys::sd_notify(&format!(
                    "READY=1\nSTATUS={label}: active again (rolled back)"
                ));
                self.successor_seen = None;
                // The dead generation had renamed its UNIX sockets over
                // ours: take the paths back for our chained stages.
                for l in &self.listeners {
                    if let Err(e) = l.republish() {
                        error!("{label}: taking back {} after the rollback: {e}", l.addr);
                    }
                }
            }
            Ok(false) => {}
            Err(e) => error!("{label}: rollback failed: {e}"),
        }
    }

    /// Waits for in-flight connections, at most `hard_stop_after`; a hard
    /// stop command cuts it short.
    async fn drain(&mut self, commands: &mut Option<mpsc::Receiver<Command>>) -> Outcome {
        let hard_stop_after = self.opts.config.global.hard_stop_after;
        let deadline = Instant::now() + hard_stop_after;
        // Upgraded tunnels close on their own before it, spread over
        // close_spread_time (stage/http/upgrade.rs).
        self.life.set_drain_deadline(DrainDeadline {
            at: tokio::time::Instant::from_std(deadline),
            spread: self.opts.config.global.close_spread(),
        });
        let mut tick = tokio::time::interval(TICK);
        loop {
            let left = self.open_connections();
            if left == 0 {
                return Outcome::Drained;
            }
            if Instant::now() >= deadline {
                warn!(
                    "{}: hard_stop_after ({hard_stop_after:?}) reached with {left} connections open: cutting them",
                    self.label
                );
                return Outcome::DeadlineCut;
            }
            tokio::select! {
                _ = tick.tick() => {}
                c = next(commands) => if c == Some(Command::HardStop) {
                    return Outcome::HardStop;
                },
            }
            self.beat();
        }
    }
}
