//! One test's (or one benchmark run's) private world: a network namespace
//! of its own, a private bpffs mount, a temporary folder, and a guard that
//! kills every process started in it and unmounts, also on a panic.

use std::{
    ffi::CString,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::runtime::Runtime;

use crate::{
    config::ProxyConfig,
    process::run_ok,
    procfs,
    proxy::proxy_bin,
    signals::{Signal, signal},
};

/// Sandboxes of one process are used one at a time even without
/// `--test-threads=1`: each drives several processes and thousands of
/// connections per second, and two at once on two cores would make timings
/// (and so the failure counts) depend on the neighbour.
static SERIAL: Mutex<()> = Mutex::new(());

/// Distinguishes the instances of several sandboxes of one process.
static SANDBOX_SEQ: AtomicU64 = AtomicU64::new(0);

/// One test's private world. Drop it last (declare it first).
pub struct Sandbox {
    /// The temporary folder (configs, logs, the bpffs mount point).
    pub dir: PathBuf,
    /// The private bpffs mount.
    pub bpffs: PathBuf,
    /// The proxy instance name (`global.name`), unique per sandbox.
    pub name: String,
    /// The proxy binary every process of this sandbox runs.
    pub bin: PathBuf,
    /// Every process the test started; killed and reaped on drop.
    children: Mutex<Vec<Arc<Mutex<Child>>>>,
    /// Whether `bpffs` is still mounted (unmounted once, on drop).
    mounted: bool,
    /// Removed on drop unless `PROXY_IT_KEEP` is set.
    tempdir: Option<tempfile::TempDir>,
    /// Held for the sandbox's lifetime: see [`SERIAL`].
    _serial: MutexGuard<'static, ()>,
}

impl Sandbox {
    /// A sandbox running `$PROXY_BIN` (see [`proxy_bin`]), for test `test`.
    pub fn new(test: &str) -> Sandbox {
        Sandbox::with_proxy(test, proxy_bin())
    }

    /// Moves the calling thread into a new network namespace and prepares a
    /// private bpffs; the proxy processes will run `bin`. Build the tokio
    /// runtime *after* this, from the same thread, so that its threads are
    /// in the namespace too.
    pub fn with_proxy(test: &str, bin: PathBuf) -> Sandbox {
        require_root();
        assert!(
            bin.is_file(),
            "proxy binary not found at {} (set PROXY_BIN, or build it with `cargo xtask build`)",
            bin.display()
        );
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());

        enter_private_netns();
        // Thousands of short connections per second: widen the ephemeral
        // port range and reuse TIME_WAIT ports, so that the client never runs
        // out of ports during a long run. These sysctls are per namespace;
        // /proc/sys/net resolves to the namespace of the writing thread.
        write_sysctl("net/ipv4/ip_local_port_range", "1024 65000");
        write_sysctl("net/ipv4/tcp_tw_reuse", "1");

        let tempdir = tempfile::Builder::new()
            .prefix(&format!("proxy-it-{test}-"))
            .tempdir()
            .expect("creating a temporary folder");
        let dir = tempdir.path().to_path_buf();
        let bpffs = dir.join("bpf");
        fs::create_dir(&bpffs).expect("creating the bpffs mount point");
        mount_bpffs(&bpffs);

        let seq = SANDBOX_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{test}-{}-{seq}", std::process::id());
        Sandbox {
            dir,
            bpffs,
            name,
            bin,
            children: Mutex::new(Vec::new()),
            mounted: true,
            tempdir: Some(tempdir),
            _serial: serial,
        }
    }

    /// A sandbox for `test` and its [`Sandbox::runtime`]. Bind them in this
    /// order, `let (sb, rt) = ...`, so that the runtime is dropped first.
    pub fn with_runtime(test: &str) -> (Sandbox, Runtime) {
        let sb = Sandbox::new(test);
        let rt = sb.runtime();
        (sb, rt)
    }

    /// A multi-thread tokio runtime whose threads live in this sandbox's
    /// network namespace (they are created now, from the test thread).
    pub fn runtime(&self) -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the tokio runtime")
    }

    /// Writes a config for this sandbox's instance and returns its path.
    pub fn write_config(&self, file: &str, cfg: &ProxyConfig) -> PathBuf {
        self.write_file(file, &cfg.render(self))
    }

    /// Writes any file (e.g. a broken config) into the sandbox folder.
    pub fn write_file(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.join(file);
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Hands `child` to the guard, which kills it on drop if still running.
    pub fn adopt(&self, child: Child) -> Arc<Mutex<Child>> {
        let child = Arc::new(Mutex::new(child));
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.clone());
        child
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Kill by PID only processes we started and have not reaped yet (an
        // unreaped child's PID cannot have been reused).
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        for child in children {
            let mut child = child.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok(None) = child.try_wait() {
                // Frozen first: an nginx master would start a new worker
                // for each one killed here, and that one would outlive it.
                // Its children stay its own (unreaped) until it dies.
                let _ = signal(child.id(), Signal::Stop);
                // A `unshare --fork` wrapper: its child dies with it
                // (--kill-child), but kill the grandchildren explicitly too.
                for pid in procfs::children(child.id()) {
                    let _ = signal(pid, Signal::Kill);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if self.mounted {
            unmount(&self.bpffs);
            self.mounted = false;
        }
        if let Some(dir) = self.tempdir.take()
            && std::env::var_os("PROXY_IT_KEEP").is_some()
        {
            eprintln!("PROXY_IT_KEEP: keeping {}", dir.keep().display());
        }
    }
}

/// Appends a line to `<sandbox>/summary.txt` and prints it (visible with
/// `--nocapture`), so that the measured figures survive in the sandbox too.
pub fn report(sb: &Sandbox, line: &str) {
    eprintln!("{line}");
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sb.dir.join("summary.txt"))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Panics unless we are root: the tests load eBPF programs, mount bpffs and
/// create network namespaces. A skipped test would look like a passed one.
pub fn require_root() {
    // Safety: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the integration tests must run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): \
         run them with `sudo` or `cargo xtask test` as root"
    );
}

/// Moves the calling thread into a new network namespace with loopback up.
/// Network namespaces are per thread: this thread, and every process and
/// thread it creates from now on, see only the new namespace.
fn enter_private_netns() {
    // Safety: unshare has no memory effects.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) failed: {}",
        io::Error::last_os_error()
    );
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
}

/// Sets a per-namespace sysctl of this thread's network namespace, and
/// checks from a child process (which inherits the namespace) that it took.
pub fn write_sysctl(key: &str, value: &str) {
    let path = Path::new("/proc/sys").join(key);
    fs::write(&path, value).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let normalize = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    if normalize(&read_sysctl_in_child(key)) != normalize(value) {
        // The write went elsewhere (it should not: /proc/sys/net follows
        // the writing thread's namespace); let sysctl(8) do it from a child.
        let dotted = key.replace('/', ".");
        run_ok(
            Command::new("sysctl")
                .arg("-w")
                .arg(format!("{dotted}={value}")),
        );
        assert_eq!(
            normalize(&read_sysctl_in_child(key)),
            normalize(value),
            "could not set {dotted} in the test's network namespace"
        );
    }
}

/// Reads a sysctl from a subprocess, which sees the namespace of this thread.
pub fn read_sysctl_in_child(key: &str) -> String {
    let out = Command::new("cat")
        .arg(Path::new("/proc/sys").join(key))
        .output()
        .expect("running cat");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL")
}

/// Mounts a fresh bpffs on `target`.
pub fn mount_bpffs(target: &Path) {
    let bpf = CString::new("bpf").expect("no NUL");
    let target_c = c_path(target);
    // Safety: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target_c.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount -t bpf bpf {}: {}",
        target.display(),
        io::Error::last_os_error()
    );
}

/// Detaches the mount on `target` (lazily: never blocks on a busy mount).
pub fn unmount(target: &Path) {
    let c = c_path(target);
    // Safety: a valid C string; MNT_DETACH never blocks.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}
