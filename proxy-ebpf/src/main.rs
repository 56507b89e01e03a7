//! The `sk_reuseport/migrate` steering program.
//!
//! One copy is loaded per reuseport group (bind address); [`PROXY_GROUP`] is
//! patched at load time. For every new connection, and for every request of a
//! closing listener that the kernel migrates, it selects the socket of the
//! active generation slot. When a canary is set, a new connection whose flow
//! hash falls below the canary's share goes to the canary slot instead
//! (migrating requests always go to the active slot: the generation that
//! stays). When the chosen slot has no socket it tries the other one, and
//! when neither has one it returns `SK_PASS` without a selection, so the
//! kernel falls back to its own hash: it never drops.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{map, sk_reuseport},
    maps::{Array, HashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use aya_log_ebpf::debug;
use proxy_common::{
    COUNTER_ENTRIES, Canary, Counter, GenRecord, GroupKey, HISTORY_LEN, HealthRecord,
    HistorySample, MAX_GROUPS, MAX_HEALTH, MAX_OBJECTS, MAX_SLOTS, METRIC_ENTRIES, MetricKey,
    ObjectName, SPLIT_ENTRIES, STATE_ACTIVE_SLOT, STATE_CANARY, STATE_ENTRIES, Split, sock_index,
};

#[map(name = "PROXY_SOCKS")]
static PROXY_SOCKS: ReusePortSockArray = ReusePortSockArray::pinned(MAX_GROUPS * MAX_SLOTS, 0);

#[map(name = "PROXY_STATE")]
static PROXY_STATE: Array<u64> = Array::pinned(STATE_ENTRIES, 0);

#[map(name = "PROXY_COUNTERS")]
static PROXY_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_ENTRIES, 0);

/// New connections split between the canary and the active slot.
#[map(name = "PROXY_SPLIT")]
static PROXY_SPLIT: PerCpuArray<u64> = PerCpuArray::pinned(SPLIT_ENTRIES, 0);

/// Userspace-only, declared here so that the loader creates and pins it with
/// the others.
#[map(name = "PROXY_GENS")]
static PROXY_GENS: Array<GenRecord> = Array::pinned(MAX_SLOTS, 0);

/// Userspace-only, as above.
#[map(name = "PROXY_GROUPS")]
static PROXY_GROUPS: HashMap<GroupKey, u32> = HashMap::pinned(MAX_GROUPS, 0);

/// Userspace-only: counters of every generation (monotonic totals).
#[map(name = "PROXY_FIGURES")]
static PROXY_FIGURES: HashMap<MetricKey, u64> = HashMap::pinned(METRIC_ENTRIES, 0);

/// Stable numbers of listeners and servers (userspace only).
#[map(name = "PROXY_OBJECTS")]
static PROXY_OBJECTS: HashMap<ObjectName, u32> = HashMap::pinned(MAX_OBJECTS, 0);

/// Userspace-only: new connections per generation over the last minutes.
#[map(name = "PROXY_HISTORY")]
static PROXY_HISTORY: Array<HistorySample> = Array::pinned(HISTORY_LEN, 0);

/// Userspace-only: health-check state of the servers, shared by the
/// generations (the active one checks, all of them read).
#[map(name = "PROXY_HEALTH")]
static PROXY_HEALTH: HashMap<ObjectName, HealthRecord> = HashMap::pinned(MAX_HEALTH, 0);

/// The reuseport group this copy serves; patched by the loader.
#[unsafe(no_mangle)]
static PROXY_GROUP: u32 = 0;

#[sk_reuseport(migrate)]
pub fn proxy_steer(ctx: SkReuseportContext) -> u32 {
    // Keep the userspace-only maps in the object.
    let _ = (
        &PROXY_GENS,
        &PROXY_GROUPS,
        &PROXY_FIGURES,
        &PROXY_OBJECTS,
        &PROXY_HISTORY,
        &PROXY_HEALTH,
    );

    // Safety: a plain read of a read-only global that the loader patched.
    let group = unsafe { core::ptr::read_volatile(&PROXY_GROUP) };
    let migrating = ctx.migrating_sk().is_some();
    let fallback = if migrating {
        Counter::FallbackMigrate
    } else {
        Counter::FallbackNew
    };

    let active = match PROXY_STATE.get(STATE_ACTIVE_SLOT) {
        Some(&slot) if slot < MAX_SLOTS as u64 => slot as u32,
        _ => {
            count(fallback);
            return SK_PASS;
        }
    };
    if group >= MAX_GROUPS {
        count(fallback);
        return SK_PASS;
    }
    let canary = match PROXY_STATE.get(STATE_CANARY) {
        Some(&value) => Canary::decode(value).filter(|c| c.slot != active),
        None => None,
    };
    // The slot to try first, and the other one if it has no socket.
    let (first, second, split) = match canary {
        Some(c) if !migrating && c.takes(ctx.hash()) => (c.slot, Some(active), Some(Split::Canary)),
        Some(c) if !migrating => (active, Some(c.slot), Some(Split::Active)),
        Some(c) => (active, Some(c.slot), None),
        None => (active, None, None),
    };
    let chosen = match PROXY_SOCKS.select_reuseport(&ctx, sock_index(group, first)) {
        Ok(()) => Some(first),
        Err(err) => {
            // Rare (the slot has no listener): worth a debug event.
            debug!(&ctx, "group {} slot {}: no socket ({})", group, first, err);
            match second {
                Some(other)
                    if PROXY_SOCKS
                        .select_reuseport(&ctx, sock_index(group, other))
                        .is_ok() =>
                {
                    Some(other)
                }
                _ => None,
            }
        }
    };
    match chosen {
        Some(slot) => {
            count(if migrating {
                Counter::Migrated(slot)
            } else {
                Counter::Selected(slot)
            });
            if let Some(split) = split {
                let taken = if slot == first { split } else { other(split) };
                count_split(taken);
            }
        }
        None => count(fallback),
    }
    SK_PASS
}

#[inline(always)]
fn other(split: Split) -> Split {
    match split {
        Split::Canary => Split::Active,
        Split::Active => Split::Canary,
    }
}

#[inline(always)]
fn count_split(split: Split) {
    if let Some(value) = PROXY_SPLIT.get_ptr_mut(split as u32) {
        // Safety: this CPU's slot of a per-CPU array, as in `count`.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = PROXY_COUNTERS.get_ptr_mut(counter.index()) {
        // Safety: the pointer is to this CPU's slot of a per-CPU array; no
        // other program instance touches it concurrently.
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
