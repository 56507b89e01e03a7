//! Optional privilege drop (`global.user` / `global.group`).
//!
//! Capabilities are per thread, so the drop happens in `main` while the
//! process still has one thread, before the runtimes start. What needs root
//! beyond the kept capabilities is done first and handed to the user: the
//! instance's pins are created and chowned (so the user can open and lock
//! them), the folders of UNIX listeners and the pidfile are created and
//! chowned. The process then keeps only CAP_BPF (maps, programs),
//! CAP_PERFMON (the verifier's privileged mode), CAP_NET_ADMIN (networking
//! program types) and CAP_NET_BIND_SERVICE (ports below 1024). Certificates must be readable by the user. A later
//! generation starts as root again and does the same, so upgrades work.

use std::{fs, io, os::unix::fs::chown, path::Path};

use caps::Capability;
use tracing::warn;

use crate::{
    config::{Addr, Config, SteeringMode},
    steering, sys,
};

/// What the process keeps after the drop.
pub const KEPT: [Capability; 4] = [
    Capability::CAP_BPF,
    // The verifier treats a program loaded without it as unprivileged
    // (pointer arithmetic, speculation checks) and refuses ours.
    Capability::CAP_PERFMON,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_BIND_SERVICE,
];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("global.user: {0}")]
    User(io::Error),
    #[error("global.group: {0}")]
    Group(io::Error),
    #[error("preparing {path} for user {user}: {source}")]
    Prepare {
        path: String,
        user: String,
        #[source]
        source: io::Error,
    },
    #[error("dropping privileges to {user}: {source} (the proxy must start as root to drop)")]
    Drop {
        user: String,
        #[source]
        source: io::Error,
    },
}

/// Prepares what the user will need and drops to it, if configured.
pub fn drop_if_configured(cfg: &Config, pidfile: Option<&Path>) -> Result<(), PrivilegeError> {
    let Some(user) = &cfg.global.user else {
        return Ok(());
    };
    let (uid, primary) = sys::lookup_user(user).map_err(PrivilegeError::User)?;
    let gid = match &cfg.global.group {
        Some(g) => sys::lookup_group(g).map_err(PrivilegeError::Group)?,
        None => primary,
    };
    let prepare = |path: &Path, r: io::Result<()>| {
        r.map_err(|source| PrivilegeError::Prepare {
            path: path.display().to_string(),
            user: user.clone(),
            source,
        })
    };
    if cfg.global.steering != SteeringMode::Reuseport {
        let dir = steering::pin_dir(&cfg.global.bpffs, &cfg.global.name);
        match steering::ensure_pinned(&dir) {
            Ok(()) => {
                prepare(&dir, chown(&dir, Some(uid), Some(gid)))?;
                let entries = fs::read_dir(&dir).map_err(|source| PrivilegeError::Prepare {
                    path: dir.display().to_string(),
                    user: user.clone(),
                    source,
                })?;
                for entry in entries.flatten() {
                    prepare(&entry.path(), chown(entry.path(), Some(uid), Some(gid)))?;
                }
            }
            // The generation reports it (and falls back, or stops) itself.
            Err(e) => warn!("before dropping privileges: {e}"),
        }
    }
    for l in &cfg.listeners {
        for addr in &l.bind {
            if let Addr::Unix(path) = addr
                && let Some(parent) = path.parent()
            {
                prepare(parent, fs::create_dir_all(parent))?;
                prepare(parent, chown(parent, Some(uid), Some(gid)))?;
            }
        }
    }
    if let Some(path) = pidfile.or(cfg.global.pidfile.as_deref()) {
        // Create it if missing, but never truncate: it may name the running
        // generation, which the next `-sf $(cat pidfile)` needs.
        prepare(
            path,
            fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map(|_| ()),
        )?;
        prepare(path, chown(path, Some(uid), Some(gid)))?;
    }
    sys::drop_privileges(uid, gid, &KEPT).map_err(|source| PrivilegeError::Drop {
        user: user.clone(),
        source,
    })?;
    tracing::info!(
        uid,
        gid,
        "dropped privileges to user {user}, keeping CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE"
    );
    Ok(())
}
