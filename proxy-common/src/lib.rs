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
//!   sockets for the same address under the same index.
#![no_std]

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
pub const MAP_METRICS: &str = "PROXY_METRICS";
pub const MAP_HISTORY: &str = "PROXY_HISTORY";
/// Every map an instance pins; a generation creates the missing ones.
pub const ALL_MAPS: [&str; 7] = [
    MAP_SOCKS,
    MAP_STATE,
    MAP_COUNTERS,
    MAP_GENS,
    MAP_GROUPS,
    MAP_METRICS,
    MAP_HISTORY,
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
pub const STATE_ENTRIES: u32 = 4;

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

/// Lifecycle of a generation as stored in [`GenRecord::state`].
pub mod gen_state {
    pub const FREE: u32 = 0;
    pub const STARTING: u32 = 1;
    pub const READY: u32 = 2;
    pub const ACTIVE: u32 = 3;
    pub const STANDBY: u32 = 4;
    pub const DRAINING: u32 = 5;
    pub const STOPPED: u32 = 6;
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
    /// One of [`gen_state`].
    pub state: u32,
    /// Inode of the generation's PID namespace, to tell whether `pid` can
    /// be signalled from here.
    pub pidns: u64,
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
pub const METRIC_ENTRIES: u32 = 8192;
/// The [`MetricKey::slot`] of counters folded in from generations whose slot
/// was reused.
pub const RETIRED_SLOT: u32 = u32::MAX;
/// Bytes of a metric id (`listener/<name>/<counter>`), zero padded.
pub const METRIC_ID_LEN: usize = 200;

/// Key of [`MAP_METRICS`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct MetricKey {
    /// Generation slot that publishes the value, or [`RETIRED_SLOT`].
    pub slot: u32,
    pub id: [u8; METRIC_ID_LEN],
}

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

#[cfg(feature = "user")]
// Safety: plain #[repr(C)] data with no padding holes that matter and no
// pointers; any bit pattern is a valid value.
unsafe impl aya::Pod for GenRecord {}
#[cfg(feature = "user")]
// Safety: as above.
unsafe impl aya::Pod for MetricKey {}
#[cfg(feature = "user")]
// Safety: as above.
unsafe impl aya::Pod for HistorySample {}
#[cfg(feature = "user")]
// Safety: as above.
unsafe impl aya::Pod for GroupKey {}
