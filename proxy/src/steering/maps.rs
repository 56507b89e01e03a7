//! The pinned maps of one instance: opened by path, read by every
//! generation and by `proxy status`, written under the instance lock.

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues, ReusePortSockArray},
    util::nr_cpus,
};
use proxy_common::{
    ALL_MAPS, COUNTER_ENTRIES, Canary, Counter, GenRecord, GroupKey, HISTORY_LEN, HealthRecord,
    HistorySample, MAP_COUNTERS, MAP_GENS, MAP_GROUPS, MAP_HEALTH, MAP_HISTORY, MAP_METRICS,
    MAP_OBJECTS, MAP_SOCKS, MAP_SPLIT, MAP_STATE, MAX_GROUPS, MAX_OBJECTS, MAX_SLOTS, MetricKey,
    NO_SLOT, ObjectName, Published, RETIRED_SLOT, SPLIT_ENTRIES, STATE_ACTIVE_SLOT, STATE_CANARY,
    STATE_GEN_SEQ, STATE_HISTORY_CURSOR, Split, sock_index,
};

use super::{Group, Result, Slot, SteeringError, map_err};

/// The pinned maps of one instance, opened by path.
pub struct Maps {
    dir: PathBuf,
    socks: ReusePortSockArray<MapData>,
    state: Array<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    gens: Array<MapData, GenRecord>,
    groups: HashMap<MapData, GroupKey, u32>,
    metrics: HashMap<MapData, MetricKey, u64>,
    objects: HashMap<MapData, ObjectName, u32>,
    history: Array<MapData, HistorySample>,
    split: PerCpuArray<MapData, u64>,
    health: HealthMap,
    /// Object numbers already looked up or allocated.
    object_ids: StdHashMap<ObjectName, u32>,
}

/// The pinned health-check states ([`MAP_HEALTH`]), on a descriptor of
/// their own: the checks and the per-generation refresh use it without
/// taking the lock of the other maps.
pub struct HealthMap {
    map: HashMap<MapData, ObjectName, HealthRecord>,
}

impl HealthMap {
    pub fn open(dir: &Path) -> Result<Self> {
        let data = MapData::from_pin(dir.join(MAP_HEALTH))
            .map_err(map_err(format!("opening pinned {MAP_HEALTH}")))?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(map_err(format!(
            "pinned {MAP_HEALTH} has an unexpected type or layout"
        )))?;
        Ok(Self { map })
    }

    /// The record of `server`, None when no generation wrote one yet.
    pub fn get(&self, server: &ObjectName) -> Result<Option<HealthRecord>> {
        match self.map.get(server, 0) {
            Ok(r) => Ok(Some(r)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("reading a server's health record")(e)),
        }
    }

    pub fn set(&mut self, server: &ObjectName, record: &HealthRecord) -> Result<()> {
        self.map.insert(server, record, 0).map_err(map_err(format!(
            "writing a server's health record in {MAP_HEALTH}"
        )))
    }

    pub fn all(&self) -> Result<Vec<(ObjectName, HealthRecord)>> {
        self.map
            .iter()
            .map(|e| e.map_err(map_err("reading health records")))
            .collect()
    }
}

/// Per (object, counter): the instance total.
pub type Totals = StdHashMap<(ObjectName, u32), u64>;

/// Counters of the steering program, summed over CPUs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProgramCounters {
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
            objects: HashMap::try_from(Map::HashMap(pin(MAP_OBJECTS)?))
                .map_err(conv(MAP_OBJECTS))?,
            object_ids: StdHashMap::new(),
            history: Array::try_from(Map::Array(pin(MAP_HISTORY)?)).map_err(conv(MAP_HISTORY))?,
            split: PerCpuArray::try_from(Map::PerCpuArray(pin(MAP_SPLIT)?))
                .map_err(conv(MAP_SPLIT))?,
            health: HealthMap::open(dir)?,
        })
    }

    /// Every server's health-check record, by object name.
    pub fn health_records(&self) -> Result<Vec<(ObjectName, HealthRecord)>> {
        self.health.all()
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

    /// The canary slot and its share, if one is set.
    pub fn canary(&self) -> Result<Option<Canary>> {
        let v = self
            .state
            .get(&STATE_CANARY, 0)
            .map_err(map_err("reading the canary"))?;
        Ok(Canary::decode(v))
    }

    /// New connections the program sent to the canary and to the active
    /// slot since the canary started: (canary, active).
    pub fn split(&self) -> Result<(u64, u64)> {
        let sum = |s: Split| -> Result<u64> {
            Ok(self
                .split
                .get(&(s as u32), 0)
                .map_err(map_err("reading the canary split"))?
                .iter()
                .sum())
        };
        Ok((sum(Split::Canary)?, sum(Split::Active)?))
    }

    /// Sums of `counters` (indexes of the listener table) over the
    /// listeners that `slot` publishes.
    pub fn listener_sums(&self, slot: Slot, counters: &[u32]) -> Result<Vec<u64>> {
        let mut listeners = std::collections::HashSet::new();
        for entry in self.objects.iter() {
            let (name, id) = entry.map_err(map_err("reading object names"))?;
            if name.name.starts_with(b"listener/") {
                listeners.insert(id);
            }
        }
        let mut sums = vec![0u64; counters.len()];
        for entry in self.metrics.iter() {
            let (key, value) = entry.map_err(map_err("reading metrics"))?;
            if key.slot != slot.0 || !listeners.contains(&key.object) {
                continue;
            }
            if let Some(i) = counters.iter().position(|&c| c == key.counter) {
                sums[i] += value;
            }
        }
        Ok(sums)
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

    pub fn counters(&self) -> Result<ProgramCounters> {
        let mut sums = vec![0u64; COUNTER_ENTRIES as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            let values = self
                .counters
                .get(&(i as u32), 0)
                .map_err(map_err("reading the counters"))?;
            *sum = values.iter().sum();
        }
        let at = |c: Counter| sums[c.index() as usize];
        Ok(ProgramCounters {
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

impl Maps {
    /// The stable number of `object`, allocated under the instance lock on
    /// first use.
    fn object_id(&mut self, object: &ObjectName) -> Result<u32> {
        if let Some(&id) = self.object_ids.get(object) {
            return Ok(id);
        }
        let id = match self.objects.get(object, 0) {
            Ok(id) => id,
            Err(_) => {
                let mut locked = self.lock()?;
                locked.allocate_object(object)?
            }
        };
        self.object_ids.insert(*object, id);
        Ok(id)
    }

    /// Publishes this generation's counters.
    pub fn publish_metrics(
        &mut self,
        slot: Slot,
        values: impl IntoIterator<Item = Published>,
    ) -> Result<()> {
        let mut first_error = Ok(());
        for (object, counter, gauge, value) in values {
            let key = self.object_id(&object).map(|object| MetricKey {
                slot: slot.0,
                object,
                counter,
                gauge: u32::from(gauge),
            });
            let written = key.and_then(|key| {
                self.metrics
                    .insert(key, value, 0)
                    .map_err(map_err("publishing a counter"))
            });
            if let Err(e) = written
                && first_error.is_ok()
            {
                first_error = Err(e);
            }
        }
        first_error
    }

    /// Per (object, counter): the sum over the retired totals and every
    /// generation (gauges: live generations only). `live` says which slots
    /// are alive.
    pub fn metric_totals(&self, live: &[Slot]) -> Result<Totals> {
        let mut names = StdHashMap::new();
        for entry in self.objects.iter() {
            let (name, id) = entry.map_err(map_err("reading object names"))?;
            names.insert(id, name);
        }
        let mut totals = Totals::new();
        for entry in self.metrics.iter() {
            let (key, value) = entry.map_err(map_err("reading metrics"))?;
            if key.gauge != 0 && !live.contains(&Slot(key.slot)) {
                continue;
            }
            if let Some(name) = names.get(&key.object) {
                *totals.entry((*name, key.counter)).or_insert(0) += value;
            }
        }
        Ok(totals)
    }

    /// Appends a history sample: connections accepted so far by each slot
    /// that a generation holds.
    pub fn record_history(&mut self) -> Result<()> {
        let mut sample = HistorySample {
            unix_ms: crate::sys::unix_ms(),
            ..Default::default()
        };
        for (slot, r) in self.records()? {
            if !r.is_free() {
                sample.accepted[slot.0 as usize] = r.accepted;
                sample.generation[slot.0 as usize] = r.generation;
            }
        }
        self.push_history(&sample)
    }

    fn push_history(&mut self, sample: &HistorySample) -> Result<()> {
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

/// A zero for every possible CPU: how a per-CPU counter is reset.
fn per_cpu_zeros() -> Result<PerCpuValues<u64>> {
    let cpus = nr_cpus().map_err(|(_, source)| SteeringError::Io {
        what: "counting possible CPUs".into(),
        source,
    })?;
    PerCpuValues::try_from(vec![0u64; cpus]).map_err(|source| SteeringError::Io {
        what: "sizing per-CPU values".into(),
        source,
    })
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
            if key.gauge == 0 {
                let retired = MetricKey {
                    slot: RETIRED_SLOT,
                    ..key
                };
                let sum = self.maps.metrics.get(&retired, 0).unwrap_or(0) + value;
                // Best effort: a full map costs totals, never an upgrade.
                if let Err(e) = self.maps.metrics.insert(retired, sum, 0) {
                    tracing::warn!(
                        "{}: keeping the total of object {} counter {}: {e} (the map is full; \
                         it is safe to remove {MAP_METRICS} when no generation runs)",
                        self.maps.dir.display(),
                        key.object,
                        key.counter
                    );
                }
            }
        }
        Ok(())
    }

    /// Numbers `object` (the lowest unused number).
    fn allocate_object(&mut self, object: &ObjectName) -> Result<u32> {
        if let Ok(id) = self.maps.objects.get(object, 0) {
            return Ok(id);
        }
        let used: std::collections::HashSet<u32> = self
            .maps
            .objects
            .iter()
            .filter_map(|kv| kv.ok().map(|(_, v)| v))
            .collect();
        let id = (0..MAX_OBJECTS)
            .find(|i| !used.contains(i))
            .ok_or(SteeringError::NoFreeObject)?;
        self.maps
            .objects
            .insert(object, id, 0)
            .map_err(map_err("numbering a listener or server"))?;
        Ok(id)
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

    /// Sets (or with None clears) the canary: one map write. A new canary
    /// starts the split counters from zero first.
    pub fn set_canary(&mut self, canary: Option<Canary>) -> Result<()> {
        let previous = self.maps.canary()?;
        if let Some(c) = canary
            && previous.map(|p| p.slot) != Some(c.slot)
        {
            self.reset_split()?;
        }
        self.maps
            .state
            .set(STATE_CANARY, canary.map_or(0, Canary::encode), 0)
            .map_err(map_err("writing the canary"))
    }

    fn reset_split(&mut self) -> Result<()> {
        for i in 0..SPLIT_ENTRIES {
            self.maps
                .split
                .set(i, per_cpu_zeros()?, 0)
                .map_err(map_err("resetting the canary split"))?;
        }
        Ok(())
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
    pub fn claim(&mut self, mut record: GenRecord, now_ns: u64) -> Result<(Slot, GenRecord)> {
        let active = self.maps.active_slot()?;
        let records = self.maps.records()?;
        let free = |r: &GenRecord| super::is_reclaimable(r, now_ns);
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
        for counter in [Counter::Selected(slot.0), Counter::Migrated(slot.0)] {
            self.maps
                .counters
                .set(counter.index(), per_cpu_zeros()?, 0)
                .map_err(map_err("resetting the slot's counters"))?;
        }
        self.retire_metrics(slot)?;
        // A canary entry left by the slot's dead owner must not send a share
        // of the traffic to a generation that did not ask for it.
        self.clear_canary_of(slot)?;
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
