//! The `sk_reuseport` program: loaded from the object embedded at build
//! time, attached to a reuseport group, and the maps pinned on first use.

use std::{
    fs::{self, File},
    os::fd::AsFd,
    path::Path,
};

use aya::{Ebpf, EbpfLoader, maps::Array, programs::SkReuseport};
use proxy_common::{ALL_MAPS, GLOBAL_GROUP, MAP_STATE, NO_SLOT, PROGRAM, STATE_ACTIVE_SLOT};
use tracing::debug;

use super::{Group, Result, SteeringError, map_err};

/// The eBPF object, embedded at build time by `cargo xtask build` (see
/// build.rs). Empty when the proxy was built without it.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// aya-log's ring buffer, one per loaded program (each listener's group).
const LOG_MAP: &str = "AYA_LOGS";
/// Its size: aya-log-ebpf asks for 128 KiB, which the kernel maps into the
/// reader twice over, resident from the start (about 260 KiB of RSS per
/// listener). Our program logs one debug line, on a path that means a
/// socket is missing; 16 KiB holds a burst of them.
const LOG_BYTES: u32 = 16 * 1024;

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
        .map_max_entries(LOG_MAP, LOG_BYTES)
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
            .map_max_entries(LOG_MAP, LOG_BYTES)
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

/// Forwards the steering program's aya-log events to our log (debug level).
pub fn forward_log(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => match crate::sys::async_fd(logger) {
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
