//! eBPF steering: the pinned maps of an instance and the `sk_reuseport`
//! program attached to each reuseport group.
//!
//! The kernel ABI (map names, slot layout, counters, records) comes from
//! `proxy-common`; this module only opens, loads and writes. Every write that
//! must not race with another generation (claiming a slot, allocating a group,
//! flipping the active slot) happens under an exclusive `flock` of the
//! instance's pin folder, which works across PID namespaces because it is a
//! lock on the shared bpffs inode.

use std::{
    fs::{self, File},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues, ReusePortSockArray},
    programs::SkReuseport,
    util::nr_cpus,
};
use proxy_common::{
    ALL_MAPS, COUNTER_ENTRIES, Counter, GLOBAL_GROUP, GenRecord, GroupKey, HISTORY_LEN,
    HistorySample, MAP_COUNTERS, MAP_GENS, MAP_GROUPS, MAP_HISTORY, MAP_METRICS, MAP_SOCKS,
    MAP_STATE, MAX_GROUPS, MAX_SLOTS, METRIC_ID_LEN, MetricKey, NO_SLOT, PROGRAM, RETIRED_SLOT,
    STATE_ACTIVE_SLOT, STATE_GEN_SEQ, STATE_HISTORY_CURSOR, Phase, sock_index,
};

/// The eBPF object, embedded at build time by `cargo xtask build` (see
/// build.rs). Empty when the proxy was built without it.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

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
    #[error("no pinned state for instance at {0} (is a generation running with eBPF steering?)")]
    NotFound(PathBuf),
}

type Result<T> = std::result::Result<T, SteeringError>;

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> SteeringError {
    let what = what.into();
    move |source| SteeringError::Map { what, source }
}

/// The pinned maps of one instance, opened by path.
pub struct Maps {
    dir: PathBuf,
    socks: ReusePortSockArray<MapData>,
    state: Array<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    gens: Array<MapData, GenRecord>,
    groups: HashMap<MapData, GroupKey, u32>,
    metrics: HashMap<MapData, MetricKey, u64>,
    history: Array<MapData, HistorySample>,
}

/// Where an instance keeps its pins: `<bpffs>/proxy/<name>`.
pub fn pin_dir(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join("proxy").join(name)
}

/// Counters of the steering program, summed over CPUs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counters {
    pub selected: Vec<u64>,
    pub migrated: Vec<u64>,
    pub fallback_new: u64,
    pub fallback_migrate: u64,
}

/// Holds the instance lock until dropped.
pub struct Locked<'a> {
    maps: &'a mut Maps,
    _lock: File,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Maps;
    fn deref(&self) -> &Maps {
        self.maps
    }
}

impl Maps {
    /// Opens the maps of an instance that some generation already pinned.
    pub fn open(dir: &Path) -> Result<Self> {
        if !ALL_MAPS.iter().all(|m| dir.join(m).exists()) {
            return Err(SteeringError::NotFound(dir.to_path_buf()));
        }
        let pin = |name: &str| {
            MapData::from_pin(dir.join(name)).map_err(map_err(format!("opening pinned {name}")))
        };
        let conv = |name: &str| map_err(format!("pinned {name} has an unexpected type or layout"));
        Ok(Self {
            dir: dir.to_path_buf(),
            socks: ReusePortSockArray::try_from(Map::ReusePortSockArray(pin(MAP_SOCKS)?))
                .map_err(conv(MAP_SOCKS))?,
            state: Array::try_from(Map::Array(pin(MAP_STATE)?)).map_err(conv(MAP_STATE))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(pin(MAP_COUNTERS)?))
                .map_err(conv(MAP_COUNTERS))?,
            gens: Array::try_from(Map::Array(pin(MAP_GENS)?)).map_err(conv(MAP_GENS))?,
            groups: HashMap::try_from(Map::HashMap(pin(MAP_GROUPS)?)).map_err(conv(MAP_GROUPS))?,
            metrics: HashMap::try_from(Map::HashMap(pin(MAP_METRICS)?))
                .map_err(conv(MAP_METRICS))?,
            history: Array::try_from(Map::Array(pin(MAP_HISTORY)?)).map_err(conv(MAP_HISTORY))?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the instance lock (blocking; held for microseconds by others).
    pub fn lock(&mut self) -> Result<Locked<'_>> {
        let lock = File::open(&self.dir).map_err(|source| SteeringError::Io {
            what: format!("opening {}", self.dir.display()),
            source,
        })?;
        lock.lock().map_err(|source| SteeringError::Io {
            what: format!("locking {}", self.dir.display()),
            source,
        })?;
        Ok(Locked {
            maps: self,
            _lock: lock,
        })
    }

    pub fn active_slot(&self) -> Result<Option<Slot>> {
        let v = self
            .state
            .get(&STATE_ACTIVE_SLOT, 0)
            .map_err(map_err("reading the active slot"))?;
        Ok((v < MAX_SLOTS as u64).then_some(Slot(v as u32)))
    }

    pub fn record(&self, slot: Slot) -> Result<GenRecord> {
        self.gens
            .get(&slot.0, 0)
            .map_err(map_err(format!("reading generation slot {}", slot.0)))
    }

    pub fn records(&self) -> Result<Vec<(Slot, GenRecord)>> {
        (0..MAX_SLOTS)
            .map(|s| Ok((Slot(s), self.record(Slot(s))?)))
            .collect()
    }

    /// Publishes this generation's record. Only the owner of a slot calls it.
    pub fn write_record(&mut self, slot: Slot, record: &GenRecord) -> Result<()> {
        self.gens
            .set(slot.0, record, 0)
            .map_err(map_err(format!("writing generation slot {}", slot.0)))
    }

    pub fn counters(&self) -> Result<Counters> {
        let mut sums = vec![0u64; COUNTER_ENTRIES as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            let values = self
                .counters
                .get(&(i as u32), 0)
                .map_err(map_err("reading the counters"))?;
            *sum = values.iter().sum();
        }
        let at = |c: Counter| sums[c.index() as usize];
        Ok(Counters {
            selected: (0..MAX_SLOTS).map(|s| at(Counter::Selected(s))).collect(),
            migrated: (0..MAX_SLOTS).map(|s| at(Counter::Migrated(s))).collect(),
            fallback_new: at(Counter::FallbackNew),
            fallback_migrate: at(Counter::FallbackMigrate),
        })
    }

    /// Registers a listening socket of `slot` for `group`.
    pub fn register(&mut self, group: Group, slot: Slot, socket: &impl AsFd) -> Result<()> {
        use std::os::fd::AsRawFd;
        let fd = socket.as_fd().as_raw_fd();
        self.socks
            .set(sock_index(group.0, slot.0), &fd, 0)
            .map_err(map_err(format!(
                "registering the socket of slot {} group {} in {MAP_SOCKS}",
                slot.0, group.0
            )))
    }
}

/// Metric ids whose values are levels, not running totals: they are summed
/// over live generations only and never folded into the retired totals.
pub fn is_gauge(id: &str) -> bool {
    id.ends_with("/current") || id.ends_with("/up")
}

fn metric_key(slot: u32, id: &str) -> Option<MetricKey> {
    let bytes = id.as_bytes();
    if bytes.len() > METRIC_ID_LEN {
        return None;
    }
    let mut key = MetricKey {
        slot,
        id: [0; METRIC_ID_LEN],
    };
    key.id[..bytes.len()].copy_from_slice(bytes);
    Some(key)
}

fn metric_id(key: &MetricKey) -> String {
    let end = key.id.iter().position(|&b| b == 0).unwrap_or(METRIC_ID_LEN);
    String::from_utf8_lossy(&key.id[..end]).into_owned()
}

impl Maps {
    /// Publishes this generation's counters (ids too long for the map are
    /// kept in-process only).
    pub fn publish_metrics<'a>(
        &mut self,
        slot: Slot,
        values: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<()> {
        let mut first_error = Ok(());
        for (id, value) in values {
            if let Some(key) = metric_key(slot.0, id)
                && let Err(e) = self.metrics.insert(key, value, 0)
                && first_error.is_ok()
            {
                first_error = Err(map_err(format!("publishing metric {id}"))(e));
            }
        }
        first_error
    }

    /// Per metric id: the sum over the retired totals and every generation
    /// (gauges: live generations only). `live` says which slots are alive.
    pub fn metric_totals(&self, live: &[Slot]) -> Result<std::collections::BTreeMap<String, u64>> {
        let mut totals = std::collections::BTreeMap::new();
        for entry in self.metrics.iter() {
            let (key, value) = entry.map_err(map_err("reading metrics"))?;
            let id = metric_id(&key);
            if is_gauge(&id) && !live.contains(&Slot(key.slot)) {
                continue;
            }
            *totals.entry(id).or_insert(0) += value;
        }
        Ok(totals)
    }

    /// Appends a history sample.
    pub fn push_history(&mut self, sample: &HistorySample) -> Result<()> {
        let cursor = self
            .state
            .get(&STATE_HISTORY_CURSOR, 0)
            .map_err(map_err("reading the history cursor"))?;
        self.history
            .set((cursor % HISTORY_LEN as u64) as u32, sample, 0)
            .map_err(map_err("writing history"))?;
        self.state
            .set(STATE_HISTORY_CURSOR, cursor + 1, 0)
            .map_err(map_err("advancing the history cursor"))
    }

    /// The history samples, oldest first.
    pub fn history(&self) -> Result<Vec<HistorySample>> {
        let cursor = self
            .state
            .get(&STATE_HISTORY_CURSOR, 0)
            .map_err(map_err("reading the history cursor"))?;
        let len = HISTORY_LEN as u64;
        let first = cursor.saturating_sub(len);
        (first..cursor)
            .map(|i| {
                self.history
                    .get(&((i % len) as u32), 0)
                    .map_err(map_err("reading history"))
            })
            .collect()
    }
}

impl Locked<'_> {
    /// Moves the counters published under `slot` into the retired totals
    /// (gauges are dropped), so that a new owner of the slot starts at zero
    /// and instance totals never go back.
    fn retire_metrics(&mut self, slot: Slot) -> Result<()> {
        let entries: Vec<(MetricKey, u64)> = self
            .maps
            .metrics
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(k, _)| k.slot == slot.0)
            .collect();
        for (key, value) in entries {
            // Remove first: the retired entry may need the room.
            let _ = self.maps.metrics.remove(&key);
            let id = metric_id(&key);
            if !is_gauge(&id) {
                let mut retired = key;
                retired.slot = RETIRED_SLOT;
                let sum = self.maps.metrics.get(&retired, 0).unwrap_or(0) + value;
                // Best effort: a full map costs totals, never an upgrade.
                if let Err(e) = self.maps.metrics.insert(retired, sum, 0) {
                    tracing::warn!(
                        "{}: keeping the total of {id}: {e} (the map is full; it is safe to \
                         remove {MAP_METRICS} when no generation runs)",
                        self.maps.dir.display()
                    );
                }
            }
        }
        Ok(())
    }

    /// The one map write of a handover: every new connection now goes to
    /// `slot`. `expected` makes it a compare-and-swap under the lock (used by
    /// rollback, so that it never undoes a newer flip).
    pub fn flip(&mut self, slot: Slot, expected: Option<Option<Slot>>) -> Result<bool> {
        if let Some(expected) = expected
            && self.maps.active_slot()? != expected
        {
            return Ok(false);
        }
        self.maps
            .state
            .set(STATE_ACTIVE_SLOT, slot.0 as u64, 0)
            .map_err(map_err("flipping the active slot"))?;
        Ok(true)
    }

    /// Clears the active slot if it is `slot` (the last generation leaves).
    pub fn clear_active(&mut self, slot: Slot) -> Result<()> {
        if self.maps.active_slot()? == Some(slot) {
            self.maps
                .state
                .set(STATE_ACTIVE_SLOT, NO_SLOT, 0)
                .map_err(map_err("clearing the active slot"))?;
        }
        Ok(())
    }

    /// Claims a free slot for a new generation: a slot never used, stopped,
    /// or whose owner stopped its heartbeat (died). Resets the slot's
    /// counters, so that they count this generation only.
    pub fn claim(
        &mut self,
        mut record: GenRecord,
        now_ns: u64,
        stale_ns: u64,
    ) -> Result<(Slot, GenRecord)> {
        let active = self.maps.active_slot()?;
        let records = self.maps.records()?;
        let free = |r: &GenRecord| {
            r.is_free()
                || r.phase() == Some(Phase::Stopped)
                // Silent for long, and (where we can tell) no process: a
                // slow or stopped generation in our PID namespace keeps it.
                || (now_ns.saturating_sub(r.heartbeat_ns) > stale_ns
                    && (r.pidns != crate::sys::pidns_inode() || !crate::sys::pid_alive(r.pid)))
        };
        // Prefer a slot that is not the active one, then the lowest.
        let slot = records
            .iter()
            .filter(|(s, r)| free(r) && Some(*s) != active)
            .chain(
                records
                    .iter()
                    .filter(|(s, r)| free(r) && Some(*s) == active),
            )
            .map(|(s, _)| *s)
            .next()
            .ok_or(SteeringError::NoFreeSlot)?;
        let seq = self
            .maps
            .state
            .get(&STATE_GEN_SEQ, 0)
            .map_err(map_err("reading the generation sequence"))?
            + 1;
        self.maps
            .state
            .set(STATE_GEN_SEQ, seq, 0)
            .map_err(map_err("writing the generation sequence"))?;
        record.generation = seq;
        let cpus = nr_cpus().map_err(|(_, source)| SteeringError::Io {
            what: "counting possible CPUs".into(),
            source,
        })?;
        for counter in [Counter::Selected(slot.0), Counter::Migrated(slot.0)] {
            let zeros =
                PerCpuValues::try_from(vec![0u64; cpus]).map_err(|source| SteeringError::Io {
                    what: "sizing per-CPU values".into(),
                    source,
                })?;
            self.maps
                .counters
                .set(counter.index(), zeros, 0)
                .map_err(map_err("resetting the slot's counters"))?;
        }
        self.retire_metrics(slot)?;
        self.maps.write_record(slot, &record)?;
        Ok((slot, record))
    }

    /// The stable index of the reuseport group of `key`, allocated on first
    /// use so that all generations register the same address alike.
    pub fn group(&mut self, key: GroupKey) -> Result<Group> {
        if let Ok(idx) = self.maps.groups.get(&key, 0) {
            return Ok(Group(idx));
        }
        let used: Vec<u32> = self
            .maps
            .groups
            .iter()
            .filter_map(|kv| kv.ok().map(|(_, v)| v))
            .collect();
        let idx = (0..MAX_GROUPS)
            .find(|i| !used.contains(i))
            .ok_or(SteeringError::NoFreeGroup)?;
        self.maps
            .groups
            .insert(key, idx, 0)
            .map_err(map_err("allocating a reuseport group"))?;
        Ok(Group(idx))
    }
}

/// Loads the steering program for `group`, creating and pinning the maps on
/// first use (later loads reuse the pinned maps), and attaches it to the
/// reuseport group of `socket`. The attachment belongs to the group and
/// outlives this process; a later generation's attach replaces it.
pub fn attach(dir: &Path, group: Group, socket: &impl AsFd) -> Result<Ebpf> {
    if EBPF_OBJECT.is_empty() {
        return Err(SteeringError::NoObject);
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .override_global(GLOBAL_GROUP, &group.0, true)
        .load(EBPF_OBJECT)?;
    let prog: &mut SkReuseport = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| SteeringError::Program {
            what: format!("finding {PROGRAM}"),
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| SteeringError::Program {
            what: format!("{PROGRAM} is not an sk_reuseport program"),
            source,
        })?;
    prog.load().map_err(|source| SteeringError::Program {
        what: format!("loading {PROGRAM} into the kernel"),
        source,
    })?;
    prog.attach(socket)
        .map_err(|source| SteeringError::Program {
            what: "attaching the program to the reuseport group".into(),
            source,
        })?;
    Ok(ebpf)
}

/// Creates the pin folder and the maps (by loading the object once, without
/// attaching), so that [`Maps::open`] works. Idempotent.
pub fn ensure_pinned(dir: &Path) -> Result<()> {
    if EBPF_OBJECT.is_empty() {
        return Err(SteeringError::NoObject);
    }
    fs::create_dir_all(dir).map_err(|source| SteeringError::Io {
        what: format!(
            "creating {} (is bpffs mounted there? `mount -t bpf bpf <dir>`)",
            dir.display()
        ),
        source,
    })?;
    let lock = File::open(dir).map_err(|source| SteeringError::Io {
        what: format!("opening {}", dir.display()),
        source,
    })?;
    lock.lock().map_err(|source| SteeringError::Io {
        what: format!("locking {}", dir.display()),
        source,
    })?;
    let fresh = !dir.join(MAP_STATE).exists();
    if fresh || !ALL_MAPS.iter().all(|m| dir.join(m).exists()) {
        // Loading with the pin folder creates and pins what is missing
        // (all of it for a new instance; new maps after an upgrade).
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(EBPF_OBJECT)?;
        if !fresh {
            return Ok(());
        }
        // A fresh instance has no active slot (0 would name slot 0).
        let mut state: Array<_, u64> = Array::try_from(
            ebpf.map_mut(MAP_STATE)
                .ok_or_else(|| SteeringError::NotFound(dir.to_path_buf()))?,
        )
        .map_err(map_err("opening the state map"))?;
        state
            .set(STATE_ACTIVE_SLOT, NO_SLOT, 0)
            .map_err(map_err("initialising the active slot"))?;
    }
    Ok(())
}
