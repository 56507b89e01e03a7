//! eBPF steering: the pinned maps of an instance and the `sk_reuseport`
//! program attached to each reuseport group.
//!
//! The kernel ABI (map names, slot layout, counters, records) comes from
//! `proxy-common`; this module only opens, loads and writes. Every write that
//! must not race with another generation (claiming a slot, allocating a group,
//! flipping the active slot) happens under an exclusive `flock` of the
//! instance's pin folder, which works across PID namespaces because it is a
//! lock on the shared bpffs inode.

pub mod canary;
mod maps;
mod program;

pub use canary::LiveCanary;
pub use maps::{HealthMap, Locked, Maps, ProgramCounters, Totals};
pub use program::ensure_pinned;

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use proxy_common::{
    GenRecord, GroupKey, HISTORY_INTERVAL_MS, MAP_METRICS, MAP_OBJECTS, MAX_GROUPS, MAX_OBJECTS,
    MAX_SLOTS, Phase, Published, STALE_NS,
};

use crate::{
    config::{Addr, SteeringMode},
    sys,
};

/// A generation slot: which column of the sockarray a generation owns.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(pub u32);

/// A reuseport group: the stable index of one bind address.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Group(pub u32);

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error(
        "this proxy binary was built without its eBPF object (build it with `cargo xtask build`)"
    )]
    NoObject,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Map {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("loading the eBPF program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "all {MAX_SLOTS} generation slots are in use by live generations: see `proxy status`, \
         wait for draining ones to exit or stop one"
    )]
    NoFreeSlot,
    #[error("all {MAX_GROUPS} reuseport groups of this instance are in use")]
    NoFreeGroup,
    #[error(
        "all {MAX_OBJECTS} listener and server numbers of this instance are in use (it is safe \
         to remove {MAP_OBJECTS} and {MAP_METRICS} when no generation runs)"
    )]
    NoFreeObject,
    #[error("no pinned state for instance at {0} (is a generation running with eBPF steering?)")]
    NotFound(PathBuf),
    #[error(
        "no active generation: a canary takes a share of the traffic of a running active \
         generation; start this one without --canary"
    )]
    NoActiveForCanary,
    #[error(
        "generation {generation} (slot {slot}) is already the canary of this instance: promote \
         it (`proxy promote`) or abort it (`proxy abort`) first"
    )]
    CanaryExists { generation: u64, slot: u32 },
    #[error("no canary generation is running in this instance (see `proxy status`)")]
    NoCanary,
    #[error("canary share: {0}")]
    Weight(String),
}

pub type Result<T> = std::result::Result<T, SteeringError>;

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> SteeringError {
    let what = what.into();
    move |source| SteeringError::Map { what, source }
}

/// Where an instance keeps its pins: `<bpffs>/proxy/<name>`.
pub fn pin_dir(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join("proxy").join(name)
}

/// Whether the generation of `record` is alive, as every part of the proxy
/// judges it: [`GenRecord::is_alive`] (not stopped, fresh heartbeat), and,
/// when it runs in our PID namespace, its process still exists.
pub fn is_alive(record: &GenRecord) -> bool {
    record.is_alive(sys::boottime_ns(), STALE_NS) && !process_gone(record)
}

/// Whether a new generation may take the slot of `record`: free, stopped,
/// or not alive with no process left that could come back to it (a
/// generation stopped with SIGSTOP in our namespace keeps its slot).
pub fn is_reclaimable(record: &GenRecord, now_ns: u64) -> bool {
    match record.phase() {
        None | Some(Phase::Stopped) => true,
        Some(_) => {
            !record.is_alive(now_ns, STALE_NS)
                && (record.pidns != sys::pidns_inode() || !sys::pid_alive(record.pid))
        }
    }
}

/// The process of `record` runs in our PID namespace and is gone.
fn process_gone(record: &GenRecord) -> bool {
    record.pidns == sys::pidns_inode() && !sys::pid_alive(record.pid)
}

/// The reuseport group key of a TCP address.
pub fn group_key(sa: &SocketAddr) -> GroupKey {
    let mut addr = [0u8; 16];
    let family = match sa.ip() {
        IpAddr::V4(ip) => {
            addr[..4].copy_from_slice(&ip.octets());
            libc::AF_INET as u16
        }
        IpAddr::V6(ip) => {
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

/// How this generation's new connections reach it: chosen once at startup.
pub enum Steering {
    /// The eBPF program and our slot in the pinned maps.
    Ebpf(Box<Pinned>),
    /// Plain SO_REUSEPORT: the kernel hashes new connections across every
    /// generation's listeners; nothing to register, flip or publish.
    Reuseport,
}

/// This generation's part of the pinned state.
pub struct Pinned {
    maps: Maps,
    slot: Slot,
    record: GenRecord,
    /// Every steered listening socket, to register again after a resume.
    registered: Vec<(Group, Arc<dyn AsFd + Send + Sync>)>,
    /// The loaded programs, one per group; kept so that their log ring
    /// buffers stay open.
    programs: Vec<(Group, aya::Ebpf)>,
    /// When counters and history were last published, and in which phase.
    metrics_at: Instant,
    history_at: Instant,
    last_phase: Phase,
}

/// What the pinned maps say to a canary generation.
pub enum CanaryRole {
    /// Still the canary.
    Canary,
    /// The active slot names us: promoted.
    Promoted,
    /// Neither the active slot nor the canary entry names us: aborted.
    Aborted,
    /// The active generation is gone: `seen` is the active slot as read.
    ActiveGone { seen: Option<Slot> },
}

/// What the pinned maps say about the generation holding the active slot,
/// seen by a generation that is active itself.
pub enum Holder {
    /// We do (or the maps cannot be read: nothing to do).
    Us,
    /// A newer generation flipped the slot and is alive; `active` once it
    /// marked itself active.
    Newer { generation: u64, active: bool },
    /// An older generation took the traffic back (SIGTTIN).
    Older { generation: u64 },
    /// Nobody alive: the slot was flipped to a generation that died or
    /// stalled (or cleared). `seen` is the slot as read, for the
    /// compare-and-swap of the rollback.
    Gone { seen: Option<Slot> },
}

impl Steering {
    /// Sets up steering as `mode` asks: opens (or creates) the pinned maps
    /// and claims a free slot before anything is bound, so that a full
    /// instance fails early. `auto` falls back to plain SO_REUSEPORT, loudly.
    pub fn claim(mode: SteeringMode, dir: &Path) -> Result<Self> {
        if mode == SteeringMode::Reuseport {
            tracing::warn!(
                "steering = \"reuseport\": eBPF steering disabled by config; plain SO_REUSEPORT soft-stop, queued connections of a closing listener may be reset"
            );
            return Ok(Steering::Reuseport);
        }
        let mut maps = match ensure_pinned(dir).and_then(|()| Maps::open(dir)) {
            Ok(maps) => maps,
            Err(e) if mode == SteeringMode::Auto => {
                tracing::error!(error = %e, "eBPF STEERING UNAVAILABLE: falling back to plain SO_REUSEPORT soft-stop; new connections are hashed across generations and queued connections of a closing listener may be reset");
                return Ok(Steering::Reuseport);
            }
            Err(e) => return Err(e),
        };
        let now = sys::boottime_ns();
        let record = GenRecord {
            generation: 0,
            started_unix_ms: sys::unix_ms(),
            heartbeat_ns: now,
            accepted: 0,
            active_conns: 0,
            pid: std::process::id(),
            state: Phase::Starting.code(),
            pidns: sys::pidns_inode(),
        };
        let (slot, record) = maps.lock()?.claim(record, now)?;
        Ok(Steering::Ebpf(Box::new(Pinned {
            maps,
            slot,
            record,
            registered: Vec::new(),
            programs: Vec::new(),
            metrics_at: Instant::now(),
            history_at: Instant::now() - Duration::from_millis(HISTORY_INTERVAL_MS),
            last_phase: Phase::Starting,
        })))
    }

    fn pinned(&mut self) -> Option<&mut Pinned> {
        match self {
            Steering::Ebpf(p) => Some(p),
            Steering::Reuseport => None,
        }
    }

    /// How the logs name this generation.
    pub fn label(&self) -> String {
        match self {
            Steering::Ebpf(p) => format!("generation {} (slot {})", p.record.generation, p.slot.0),
            Steering::Reuseport => format!("generation pid {}", std::process::id()),
        }
    }

    /// Our generation number (0 without eBPF steering).
    pub fn generation(&self) -> u64 {
        match self {
            Steering::Ebpf(p) => p.record.generation,
            Steering::Reuseport => 0,
        }
    }

    /// Our slot, if steered.
    pub fn slot(&self) -> Option<Slot> {
        match self {
            Steering::Ebpf(p) => Some(p.slot),
            Steering::Reuseport => None,
        }
    }

    /// Another handle on the pinned maps (for a stats listener), opened now
    /// while we still have the privileges to.
    pub fn open_maps(&self) -> Result<Option<Maps>> {
        match self {
            Steering::Ebpf(p) => Maps::open(p.maps.dir()).map(Some),
            Steering::Reuseport => Ok(None),
        }
    }

    /// A handle on the pinned health-check states (for the health checks),
    /// opened now while we still have the privileges to; None without eBPF
    /// steering (the states then live in this process only).
    pub fn open_health(&self) -> Result<Option<HealthMap>> {
        match self {
            Steering::Ebpf(p) => HealthMap::open(p.maps.dir()).map(Some),
            Steering::Reuseport => Ok(None),
        }
    }

    /// Puts a listening TCP socket under steering: the program attached to
    /// its reuseport group (once per group), the socket registered in our
    /// slot. UNIX sockets are not steered.
    pub fn register(&mut self, addr: &Addr, listener: Arc<dyn AsFd + Send + Sync>) -> Result<()> {
        let Some(p) = self.pinned() else {
            return Ok(());
        };
        let Addr::Tcp(sa) = addr else {
            return Ok(());
        };
        let group = p.maps.lock()?.group(group_key(sa))?;
        if !p.programs.iter().any(|(g, _)| *g == group) {
            let mut ebpf = program::attach(p.maps.dir(), group, &listener.as_fd())?;
            program::forward_log(&mut ebpf);
            p.programs.push((group, ebpf));
        }
        p.maps.register(group, p.slot, &listener.as_fd())?;
        p.registered.push((group, listener));
        Ok(())
    }

    /// Registers every steered socket again (they left the sockarray when
    /// they stopped listening) and flips the active slot to us.
    pub fn take_back(&mut self) -> Result<()> {
        let Some(p) = self.pinned() else {
            return Ok(());
        };
        for (group, listener) in &p.registered {
            p.maps.register(*group, p.slot, &listener.as_fd())?;
        }
        p.maps.lock()?.flip(p.slot, None)?;
        Ok(())
    }

    /// The one map write of a handover: every new connection now goes to
    /// us. Returns the slot that was active before.
    pub fn flip(&mut self) -> Result<Option<Slot>> {
        let Some(p) = self.pinned() else {
            return Ok(None);
        };
        let previous = p.maps.active_slot()?;
        p.maps.lock()?.flip(p.slot, None)?;
        Ok(previous)
    }

    /// Checks, before anything is bound, that we may start as a canary.
    pub fn check_canary(&self) -> Result<()> {
        let Steering::Ebpf(p) = self else {
            return Ok(());
        };
        match p.maps.canary_refusal(p.slot)? {
            Some(refusal) => Err(refusal),
            None => Ok(()),
        }
    }

    /// Instead of the flip: every new connection whose flow hash falls in
    /// `weight_bp` now comes to us (one map write), the rest stays with
    /// the active generation.
    pub fn become_canary(&mut self, weight_bp: u32) -> Result<()> {
        let Some(p) = self.pinned() else {
            return Ok(());
        };
        let slot = p.slot;
        p.maps.lock()?.start_canary(slot, weight_bp)
    }

    /// What the maps say of us, a canary.
    pub fn canary_role(&self) -> Result<CanaryRole> {
        let Steering::Ebpf(p) = self else {
            return Ok(CanaryRole::Canary);
        };
        let active = p.maps.active_slot()?;
        if active == Some(p.slot) {
            return Ok(CanaryRole::Promoted);
        }
        if p.maps.canary()?.is_none_or(|c| c.slot != p.slot.0) {
            return Ok(CanaryRole::Aborted);
        }
        let holder_alive = match active {
            Some(a) => is_alive(&p.maps.record(a)?),
            None => false,
        };
        Ok(if holder_alive {
            CanaryRole::Canary
        } else {
            CanaryRole::ActiveGone { seen: active }
        })
    }

    /// A canary whose active generation is gone takes the active slot (if
    /// it still reads `seen`) and leaves the canary entry. True when it did.
    pub fn take_over_as_canary(&mut self, seen: Option<Slot>) -> Result<bool> {
        let Some(p) = self.pinned() else {
            return Ok(false);
        };
        let slot = p.slot;
        let mut locked = p.maps.lock()?;
        if !locked.flip(slot, Some(seen))? {
            return Ok(false);
        }
        locked.clear_canary_of(slot)?;
        Ok(true)
    }

    /// The canary entry of the instance (alive or not), with its record.
    pub fn canary(&self) -> Result<Option<LiveCanary>> {
        let Steering::Ebpf(p) = self else {
            return Ok(None);
        };
        let Some(canary) = p.maps.canary()? else {
            return Ok(None);
        };
        let record = p.maps.record(Slot(canary.slot))?;
        Ok(Some(LiveCanary { canary, record }))
    }

    /// Sums of listener counters (indexes of the listener table) that
    /// `slot` published.
    pub fn listener_sums(&self, slot: Slot, counters: &[u32]) -> Result<Vec<u64>> {
        match self {
            Steering::Ebpf(p) => p.maps.listener_sums(slot, counters),
            Steering::Reuseport => Ok(vec![0; counters.len()]),
        }
    }

    /// Aborts the canary in `slot` (no-op if it is no longer the canary).
    pub fn abort_canary(&mut self, slot: Slot) -> Result<bool> {
        let Some(p) = self.pinned() else {
            return Ok(false);
        };
        p.maps.lock()?.clear_canary_of(slot)
    }

    /// Promotes the canary in `slot` (an error if it no longer is one).
    pub fn promote_canary(&mut self, slot: Slot) -> Result<()> {
        let Some(p) = self.pinned() else {
            return Ok(());
        };
        p.maps.lock()?.promote_canary(Some(slot)).map(|_| ())
    }

    /// Takes the active slot back if it still reads `seen` (a rollback
    /// never undoes a newer flip). True when it flipped.
    pub fn roll_back(&mut self, seen: Option<Slot>) -> Result<bool> {
        let Some(p) = self.pinned() else {
            return Ok(false);
        };
        let slot = p.slot;
        p.maps.lock()?.flip(slot, Some(seen))
    }

    /// Who holds the active slot, as judged by [`is_alive`].
    pub fn holder(&self) -> Result<Holder> {
        let Steering::Ebpf(p) = self else {
            return Ok(Holder::Us);
        };
        let active = p.maps.active_slot()?;
        if active == Some(p.slot) {
            return Ok(Holder::Us);
        }
        let record = match active {
            Some(a) => Some(p.maps.record(a)?),
            None => None,
        };
        Ok(match record {
            Some(r) if is_alive(&r) && r.generation > p.record.generation => Holder::Newer {
                generation: r.generation,
                active: r.phase() == Some(Phase::Active),
            },
            Some(r) if is_alive(&r) && r.phase() == Some(Phase::Active) => Holder::Older {
                generation: r.generation,
            },
            _ => Holder::Gone { seen: active },
        })
    }

    /// Publishes our record (phase, heartbeat, connection counts); the
    /// counters of `figures` once a second and at every phase change, and a
    /// history sample every [`HISTORY_INTERVAL_MS`] while active.
    pub fn publish<I: IntoIterator<Item = Published>>(
        &mut self,
        phase: Phase,
        accepted: u64,
        open: u64,
        figures: impl FnOnce() -> I,
    ) {
        let Some(p) = self.pinned() else { return };
        p.record.state = phase.code();
        p.record.heartbeat_ns = sys::boottime_ns();
        p.record.accepted = accepted;
        p.record.active_conns = open;
        if let Err(e) = p.maps.write_record(p.slot, &p.record) {
            tracing::warn!("publishing the generation record: {e}");
        }
        let now = Instant::now();
        if phase != p.last_phase || now.duration_since(p.metrics_at) >= Duration::from_secs(1) {
            p.metrics_at = now;
            p.last_phase = phase;
            if let Err(e) = p.maps.publish_metrics(p.slot, figures()) {
                tracing::warn!("publishing counters: {e}");
            }
        }
        if phase == Phase::Active
            && now.duration_since(p.history_at) >= Duration::from_millis(HISTORY_INTERVAL_MS)
        {
            p.history_at = now;
            if let Err(e) = p.maps.record_history() {
                tracing::warn!("recording history: {e}");
            }
        }
    }

    /// The last words of a generation: its record says stopped and the
    /// active slot is cleared if it was ours.
    pub fn leave(&mut self) {
        let Some(p) = self.pinned() else { return };
        p.record.state = Phase::Stopped.code();
        let _ = p.maps.write_record(p.slot, &p.record);
        if let Ok(mut locked) = p.maps.lock() {
            let _ = locked.clear_active(p.slot);
            let _ = locked.clear_canary_of(p.slot);
        }
    }
}
