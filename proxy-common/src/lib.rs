//! The kernel ABI shared by the eBPF steering program and the userspace proxy.
//!
//! Everything that both sides must agree on lives here and only here: map
//! names, map sizes, how a (reuseport group, generation slot) pair maps to a
//! sockarray index, the counter layout, and the `#[repr(C)]` records stored in
//! the pinned maps.
//!
//! # Layout of the pinned state
//!
//! One folder per instance, `<bpffs>/proxy/<name>/`, holds:
//! - [`MAP_SOCKS`]: `REUSEPORT_SOCKARRAY`, one listening socket per
//!   (group, slot), index [`sock_index`];
//! - [`MAP_STATE`]: `ARRAY<u64>`, [`STATE_ACTIVE_SLOT`] is the slot every new
//!   connection goes to (one map write flips it), [`STATE_GEN_SEQ`] numbers
//!   generations;
//! - [`MAP_COUNTERS`]: `PERCPU_ARRAY<u64>`, what the program did, see
//!   [`Counter`];
//! - [`MAP_GENS`]: `ARRAY<GenRecord>`, one record per slot, written by the
//!   generation that owns the slot;
//! - [`MAP_GROUPS`]: `HASH<GroupKey, u32>`, the stable index of each
//!   reuseport group (bind address), so that every generation registers its
//!   sockets for the same address under the same index;
//! - [`MAP_SPLIT`]: `PERCPU_ARRAY<u64>`, how the program split new
//!   connections between the active slot and a canary, see [`Split`];
//! - [`MAP_HEALTH`]: `HASH<ObjectName, HealthRecord>`, the health-check
//!   state of every checked server, written by the generation that checks
//!   and read by all (userspace only).
//!
//! [`STATE_CANARY`] names a canary slot and its share of new connections in
//! one value ([`Canary`]), so that setting, changing or clearing a canary is
//! one map write.
#![cfg_attr(not(test), no_std)]

/// Generation slots per instance: how many generations can hold listeners
/// at the same time (one active, the others warm or draining).
pub const MAX_SLOTS: u32 = 8;
/// Distinct bind addresses (reuseport groups) per instance.
pub const MAX_GROUPS: u32 = 64;
/// Value of [`STATE_ACTIVE_SLOT`] when no generation is active.
pub const NO_SLOT: u64 = u64::MAX;

/// Map names. The kernel keeps 15 bytes of a map name.
pub const MAP_SOCKS: &str = "PROXY_SOCKS";
pub const MAP_STATE: &str = "PROXY_STATE";
pub const MAP_COUNTERS: &str = "PROXY_COUNTERS";
pub const MAP_GENS: &str = "PROXY_GENS";
pub const MAP_GROUPS: &str = "PROXY_GROUPS";
pub const MAP_METRICS: &str = "PROXY_FIGURES";
pub const MAP_OBJECTS: &str = "PROXY_OBJECTS";
pub const MAP_HISTORY: &str = "PROXY_HISTORY";
pub const MAP_SPLIT: &str = "PROXY_SPLIT";
pub const MAP_HEALTH: &str = "PROXY_HEALTH";
/// Every map an instance pins; a generation creates the missing ones.
pub const ALL_MAPS: [&str; 10] = [
    MAP_SOCKS,
    MAP_STATE,
    MAP_COUNTERS,
    MAP_GENS,
    MAP_GROUPS,
    MAP_METRICS,
    MAP_OBJECTS,
    MAP_HISTORY,
    MAP_SPLIT,
    MAP_HEALTH,
];
/// Name of the `sk_reuseport/migrate` program in the object.
pub const PROGRAM: &str = "proxy_steer";
/// Read-only global patched at load time: the group this program copy serves.
pub const GLOBAL_GROUP: &str = "PROXY_GROUP";

/// Entries of [`MAP_STATE`].
pub const STATE_ACTIVE_SLOT: u32 = 0;
pub const STATE_GEN_SEQ: u32 = 1;
/// Number of history samples written so far (the next goes to
/// `cursor % HISTORY_LEN`).
pub const STATE_HISTORY_CURSOR: u32 = 2;
/// The canary: slot and share in one value, see [`Canary`]; 0 for none.
pub const STATE_CANARY: u32 = 3;
pub const STATE_ENTRIES: u32 = 4;

/// Basis points of a whole: a canary share of 10,000 takes every new
/// connection.
pub const BASIS_POINTS: u32 = 10_000;

/// A canary generation: the slot that takes a share of new connections,
/// and the share in basis points. Stored in [`STATE_CANARY`] as one `u64`
/// (slot + 1 in the high half, so that 0 means no canary; the share in the
/// low half), so that one map write sets, changes or clears it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Canary {
    pub slot: u32,
    pub weight_bp: u32,
}

impl Canary {
    pub const fn encode(self) -> u64 {
        ((self.slot as u64 + 1) << 32) | self.weight_bp as u64
    }

    /// The canary stored as `value`, or None (no canary, or a value no
    /// proxy writes).
    pub const fn decode(value: u64) -> Option<Canary> {
        let slot = (value >> 32) as u32;
        let weight_bp = value as u32;
        if slot == 0 || slot > MAX_SLOTS || weight_bp > BASIS_POINTS {
            return None;
        }
        Some(Canary {
            slot: slot - 1,
            weight_bp,
        })
    }

    /// Whether a new connection whose flow hash is `hash` goes to the
    /// canary: the hash spread over [0, 10,000) below the share. The same
    /// 4-tuple always gets the same answer.
    #[inline(always)]
    pub const fn takes(self, hash: u32) -> bool {
        // Multiply-shift maps the 32-bit hash evenly onto [0, 10,000).
        (((hash as u64) * BASIS_POINTS as u64) >> 32) < self.weight_bp as u64
    }
}

/// Entries of [`MAP_SPLIT`]: new connections decided while a canary was
/// set, reset when a canary starts.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Split {
    /// Sent to the canary slot.
    Canary = 0,
    /// Sent to the active slot (the rest of the split).
    Active = 1,
}

pub const SPLIT_ENTRIES: u32 = 2;

/// Index of the listening socket of `slot` for reuseport group `group`.
#[inline(always)]
pub const fn sock_index(group: u32, slot: u32) -> u32 {
    group * MAX_SLOTS + slot
}

/// Per-CPU counters of the steering program, each indexed as given.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A new connection was steered to the socket of this slot.
    Selected(u32),
    /// A request of a closing listener was migrated to this slot.
    Migrated(u32),
    /// A new connection found no socket in the active slot: kernel hash.
    FallbackNew,
    /// A migrating request found no socket in the active slot: kernel hash.
    FallbackMigrate,
}

impl Counter {
    #[inline(always)]
    pub const fn index(self) -> u32 {
        match self {
            Counter::Selected(slot) => slot,
            Counter::Migrated(slot) => MAX_SLOTS + slot,
            Counter::FallbackNew => 2 * MAX_SLOTS,
            Counter::FallbackMigrate => 2 * MAX_SLOTS + 1,
        }
    }
}

/// Number of entries of [`MAP_COUNTERS`].
pub const COUNTER_ENTRIES: u32 = 2 * MAX_SLOTS + 2;

/// Where a generation is in its life, as stored in [`GenRecord::state`]:
///
/// ```text
/// starting -> ready -> active -> draining -> stopped
///                        ^  \
///          SIGTTIN/back  |   v SIGTTOU
///                       standby
///
/// starting -> ready -> canary -> active (promoted) | draining (aborted)
/// ```
///
/// A record whose state is [`STATE_FREE`] (0) belongs to no generation.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting = 1,
    Ready = 2,
    Active = 3,
    Standby = 4,
    Draining = 5,
    Stopped = 6,
    /// Takes a share of new connections beside the active generation.
    Canary = 7,
}

/// [`GenRecord::state`] of a slot no generation ever used.
pub const STATE_FREE: u32 = 0;

/// A heartbeat older than this marks a generation as not alive (it beats
/// every 50 ms).
pub const STALE_NS: u64 = 1_000_000_000;

impl Phase {
    /// The phase stored as `code`, or None for a free slot or an unknown
    /// code (written by a newer proxy).
    pub const fn from_code(code: u32) -> Option<Phase> {
        Some(match code {
            1 => Phase::Starting,
            2 => Phase::Ready,
            3 => Phase::Active,
            4 => Phase::Standby,
            5 => Phase::Draining,
            6 => Phase::Stopped,
            7 => Phase::Canary,
            _ => return None,
        })
    }

    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The lowercase name operators read in stats and `proxy status`.
    pub const fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Active => "active",
            Phase::Standby => "standby",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
            Phase::Canary => "canary",
        }
    }
}

/// What a generation publishes about itself in its slot of [`MAP_GENS`].
///
/// Written only by the owning generation (and by a successor that reclaims
/// the slot of a dead one); read by every other generation and by
/// `proxy status`, across PID namespaces.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct GenRecord {
    /// Generation number, from [`STATE_GEN_SEQ`]; 0 for a free slot.
    pub generation: u64,
    /// Wall clock start, milliseconds since the Unix epoch (for ages).
    pub started_unix_ms: u64,
    /// CLOCK_BOOTTIME of the last heartbeat, in nanoseconds. BOOTTIME is
    /// shared by all PID namespaces, so liveness is judged without PIDs.
    pub heartbeat_ns: u64,
    /// Connections accepted by this generation.
    pub accepted: u64,
    /// Connections currently open in this generation.
    pub active_conns: u64,
    /// PID as seen in the generation's own PID namespace.
    pub pid: u32,
    /// A [`Phase`] code, or [`STATE_FREE`].
    pub state: u32,
    /// Inode of the generation's PID namespace, to tell whether `pid` can
    /// be signalled from here.
    pub pidns: u64,
}

impl GenRecord {
    /// The phase, or None for a free slot (or an unknown code).
    pub const fn phase(&self) -> Option<Phase> {
        Phase::from_code(self.state)
    }

    /// Whether the slot belongs to no generation, now or before.
    pub const fn is_free(&self) -> bool {
        self.state == STATE_FREE
    }

    /// The one liveness rule: a generation that has not stopped and whose
    /// heartbeat (CLOCK_BOOTTIME, `now_ns`) is at most `stale_ns` old. The
    /// proxy adds one check it can make only in userspace: a PID in its own
    /// namespace that no longer exists.
    pub const fn is_alive(&self, now_ns: u64, stale_ns: u64) -> bool {
        match self.phase() {
            None | Some(Phase::Stopped) => false,
            Some(_) => now_ns.saturating_sub(self.heartbeat_ns) <= stale_ns,
        }
    }
}

/// Key of [`MAP_GROUPS`]: one reuseport group, i.e. one bind address.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct GroupKey {
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Port, host byte order.
    pub port: u16,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
}

/// Entries of [`MAP_METRICS`]: counters of every generation, so that totals
/// stay monotonic across handovers.
pub const METRIC_ENTRIES: u32 = 16384;
/// The [`MetricKey::slot`] of counters folded in from generations whose slot
/// was reused.
pub const RETIRED_SLOT: u32 = u32::MAX;

/// Key of [`MAP_METRICS`]: one counter of one object (a listener or a
/// server), published by one generation slot. Which counter `counter` is,
/// and whether it is a gauge, is the proxy's counter table's business.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricKey {
    /// Generation slot that publishes the value, or [`RETIRED_SLOT`].
    pub slot: u32,
    /// From [`MAP_OBJECTS`], the same for every generation.
    pub object: u32,
    /// Index in the counter table of the object's kind.
    pub counter: u32,
    /// 1 when the value is a level (open connections, up), which counts
    /// for live generations only and is never folded into the retired
    /// totals; 0 for a running total.
    pub gauge: u32,
}

/// Entries of [`MAP_OBJECTS`].
pub const MAX_OBJECTS: u32 = 2048;
/// Bytes of an object name (`listener/<name>`, `server/<backend>/<addr>`).
pub const OBJECT_NAME_LEN: usize = 192;

/// Key of [`MAP_OBJECTS`] (`HASH<ObjectName, u32>`): the stable number of a
/// listener or server, allocated by the first generation that counts it,
/// so that generations with different configs add up the same object.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectName {
    /// The name, zero padded.
    pub name: [u8; OBJECT_NAME_LEN],
}

/// One value a generation publishes into [`MAP_METRICS`]: the object, the
/// counter of its table, whether it is a gauge, and the value.
pub type Published = (ObjectName, u32, bool, u64);

/// Samples kept in [`MAP_HISTORY`] (one every [`HISTORY_INTERVAL_MS`]).
pub const HISTORY_LEN: u32 = 240;
pub const HISTORY_INTERVAL_MS: u64 = 2000;

/// One sample of [`MAP_HISTORY`]: connections accepted so far per slot, and
/// which generation held the slot then.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct HistorySample {
    pub unix_ms: u64,
    pub accepted: [u64; MAX_SLOTS as usize],
    pub generation: [u64; MAX_SLOTS as usize],
}

/// Entries of [`MAP_HEALTH`]: checked servers of an instance, over all the
/// configs its generations ran.
pub const MAX_HEALTH: u32 = 1024;

/// [`HealthRecord::state`]: the server takes new connections.
pub const HEALTH_UP: u32 = 1;
/// [`HealthRecord::state`]: the server failed `fall` checks in a row; the
/// round-robin skips it until it passes `rise` in a row.
pub const HEALTH_DOWN: u32 = 2;

/// What the last check of a server found, as stored in
/// [`HealthRecord::result`]; the names and reasons are HAProxy's.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// Connected (tcp check).
    L4Ok = 1,
    /// No connection within the check timeout.
    L4Timeout = 2,
    /// Connection refused, reset, unreachable...
    L4Con = 3,
    /// The HTTP status was one the check expects.
    L7Ok = 4,
    /// An HTTP status the check does not expect.
    L7Status = 5,
    /// Connected, but no response head within the check timeout.
    L7Timeout = 6,
    /// Connected, but what came back was no HTTP response.
    L7Response = 7,
}

impl CheckResult {
    pub const fn from_code(code: u32) -> Option<CheckResult> {
        Some(match code {
            1 => CheckResult::L4Ok,
            2 => CheckResult::L4Timeout,
            3 => CheckResult::L4Con,
            4 => CheckResult::L7Ok,
            5 => CheckResult::L7Status,
            6 => CheckResult::L7Timeout,
            7 => CheckResult::L7Response,
            _ => return None,
        })
    }

    pub const fn code(self) -> u32 {
        self as u32
    }

    pub const fn passed(self) -> bool {
        matches!(self, CheckResult::L4Ok | CheckResult::L7Ok)
    }

    /// HAProxy's short name (its stats page's `check_status`).
    pub const fn name(self) -> &'static str {
        match self {
            CheckResult::L4Ok => "L4OK",
            CheckResult::L4Timeout => "L4TOUT",
            CheckResult::L4Con => "L4CON",
            CheckResult::L7Ok => "L7OK",
            CheckResult::L7Status => "L7STS",
            CheckResult::L7Timeout => "L7TOUT",
            CheckResult::L7Response => "L7RSP",
        }
    }

    /// HAProxy's reason, as its transition log lines say it.
    pub const fn reason(self) -> &'static str {
        match self {
            CheckResult::L4Ok => "Layer4 check passed",
            CheckResult::L4Timeout => "Layer4 timeout",
            CheckResult::L4Con => "Layer4 connection problem",
            CheckResult::L7Ok => "Layer7 check passed",
            CheckResult::L7Status => "Layer7 wrong status",
            CheckResult::L7Timeout => "Layer7 timeout",
            CheckResult::L7Response => "Layer7 invalid response",
        }
    }
}

/// Value of [`MAP_HEALTH`] (key: the server's [`ObjectName`],
/// `server/<backend>/<addr>`): where a server's checks stand. Written by
/// the generation that runs the checks (the active one), read by every
/// generation when it picks a server, so that a new generation starts with
/// the states known and a draining one follows changes made after it was
/// replaced.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthRecord {
    /// When `state` last changed (or the server was first checked),
    /// milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
    /// When the last check ended, milliseconds since the Unix epoch.
    pub checked_unix_ms: u64,
    /// The generation that wrote this record.
    pub generation: u64,
    /// How long the last check took, microseconds.
    pub duration_us: u32,
    /// [`HEALTH_UP`] or [`HEALTH_DOWN`].
    pub state: u32,
    /// Checks passed in a row (0 after a failure).
    pub successes: u32,
    /// Checks failed in a row (0 after a success).
    pub failures: u32,
    /// A [`CheckResult`] code (0 before the first check).
    pub result: u32,
    /// The HTTP status of the last http check, 0 otherwise.
    pub http_status: u32,
}

impl HealthRecord {
    pub const fn is_up(&self) -> bool {
        self.state != HEALTH_DOWN
    }
}

#[cfg(feature = "user")]
// Safety: plain #[repr(C)] data with no padding holes that matter and no
// pointers; any bit pattern is a valid value.
unsafe impl aya::Pod for GenRecord {}
#[cfg(feature = "user")]
// Safety: as above (3 x u64 then 6 x u32: no padding).
unsafe impl aya::Pod for HealthRecord {}
#[cfg(feature = "user")]
// Safety: as above.
unsafe impl aya::Pod for MetricKey {}
#[cfg(feature = "user")]
// Safety: as above.
unsafe impl aya::Pod for ObjectName {}
#[cfg(feature = "user")]
// Safety: as above.
unsafe impl aya::Pod for HistorySample {}
#[cfg(feature = "user")]
// Safety: as above.
unsafe impl aya::Pod for GroupKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_codes_round_trip_and_free_is_none() {
        for p in [
            Phase::Starting,
            Phase::Ready,
            Phase::Active,
            Phase::Standby,
            Phase::Draining,
            Phase::Stopped,
            Phase::Canary,
        ] {
            assert_eq!(Phase::from_code(p.code()), Some(p));
        }
        assert_eq!(Phase::from_code(STATE_FREE), None);
        assert_eq!(Phase::from_code(99), None);
        assert!(GenRecord::default().is_free());
    }

    #[test]
    fn check_results_round_trip_and_the_record_has_no_padding() {
        for r in [
            CheckResult::L4Ok,
            CheckResult::L4Timeout,
            CheckResult::L4Con,
            CheckResult::L7Ok,
            CheckResult::L7Status,
            CheckResult::L7Timeout,
            CheckResult::L7Response,
        ] {
            assert_eq!(CheckResult::from_code(r.code()), Some(r));
            assert_eq!(
                r.passed(),
                matches!(r, CheckResult::L4Ok | CheckResult::L7Ok)
            );
        }
        assert_eq!(CheckResult::from_code(0), None);
        // 3 x u64 + 6 x u32: every byte is a field (the map's value size).
        assert_eq!(core::mem::size_of::<HealthRecord>(), 48);
        assert!(HealthRecord::default().is_up(), "no state yet counts as UP");
        let down = HealthRecord {
            state: HEALTH_DOWN,
            ..Default::default()
        };
        assert!(!down.is_up());
    }

    #[test]
    fn canary_round_trips_and_zero_is_none() {
        assert_eq!(Canary::decode(0), None);
        for (slot, weight_bp) in [(0, 0), (0, 1000), (7, BASIS_POINTS), (3, 1)] {
            let c = Canary { slot, weight_bp };
            assert_eq!(Canary::decode(c.encode()), Some(c));
        }
        assert_eq!(Canary::decode(((MAX_SLOTS as u64) + 1) << 32), None);
        assert_eq!(Canary::decode((1 << 32) | (BASIS_POINTS as u64 + 1)), None);
    }

    #[test]
    fn canary_share_of_hashes_is_the_weight() {
        let share = |weight_bp| {
            let c = Canary { slot: 1, weight_bp };
            // An even sample of the hash space.
            let n = 100_000u64;
            (0..n)
                .filter(|i| c.takes((i * (u32::MAX as u64 / n)) as u32))
                .count() as f64
                / n as f64
        };
        assert_eq!(share(0), 0.0);
        assert_eq!(share(BASIS_POINTS), 1.0);
        assert!((share(1000) - 0.1).abs() < 0.001, "{}", share(1000));
        assert!((share(5000) - 0.5).abs() < 0.001, "{}", share(5000));
    }

    #[test]
    fn alive_means_not_stopped_and_a_fresh_heartbeat() {
        let rec = |phase: Phase, heartbeat_ns| GenRecord {
            state: phase.code(),
            heartbeat_ns,
            ..Default::default()
        };
        let now = 10 * STALE_NS;
        assert!(rec(Phase::Active, now).is_alive(now, STALE_NS));
        assert!(rec(Phase::Draining, now - STALE_NS).is_alive(now, STALE_NS));
        assert!(!rec(Phase::Active, now - STALE_NS - 1).is_alive(now, STALE_NS));
        assert!(!rec(Phase::Stopped, now).is_alive(now, STALE_NS));
        assert!(!GenRecord::default().is_alive(now, STALE_NS));
        // A heartbeat from the future (clock read before ours) is fresh.
        assert!(rec(Phase::Starting, now + 5).is_alive(now, STALE_NS));
    }
}
