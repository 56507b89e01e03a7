//! Isolation for one benchmark run: a private network namespace, a private
//! bpffs mount in a temporary folder, the proxy child process, and the guard
//! that undoes all of it however the run ends.

use std::{
    ffi::CString,
    fs::{self, File},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

/// Moves the calling thread into a new network namespace and brings its
/// loopback up.
///
/// Must run before any other thread exists: a namespace change applies to
/// the calling thread only, and every thread and child created afterwards
/// inherits it. Traffic of the run then never leaves this namespace, and the
/// fixed listener ports cannot collide with anything on the host.
pub fn enter_private_netns() -> Result<()> {
    // Safety: unshare(2) has no memory effects.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "unshare(CLONE_NEWNET) failed (root needed): {}",
            std::io::Error::last_os_error()
        );
    }
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]))
}

/// The temporary folder of a run, the bpffs mounted in it and the proxy
/// started from it. Dropping it kills the proxy, unmounts and removes the
/// folder, so an error return or a panic cleans up as well.
pub struct Sandbox {
    /// Configs, certificates, UNIX sockets, the proxy log.
    pub dir: PathBuf,
    /// The private bpffs mount point (`global.bpffs`).
    pub bpffs: PathBuf,
    mounted: bool,
    proxy: Option<Child>,
}

impl Sandbox {
    /// Creates the folder and mounts a private bpffs in it.
    pub fn new() -> Result<Sandbox> {
        // PID and clock together: unique even if an earlier run with the same
        // PID left its folder behind.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("proxy-bench.{}.{nanos:09}", std::process::id()));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on Drop removes the folder.
        let mut sb = Sandbox {
            bpffs: dir.join("bpf"),
            dir,
            mounted: false,
            proxy: None,
        };
        fs::create_dir(&sb.bpffs).context("creating the bpffs mount point")?;
        run_ok(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&sb.bpffs),
        )?;
        sb.mounted = true;
        Ok(sb)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Writes a self-signed ECDSA P-256 certificate for `localhost` and
    /// returns (certificate PEM, certificate+key PEM for the proxy).
    ///
    /// `CA:FALSE` matters: webpki refuses a CA certificate presented as the
    /// server's own, even when it is the trust anchor.
    pub fn make_certificate(&self) -> Result<(PathBuf, PathBuf)> {
        let crt = self.path("server.crt");
        let key = self.path("server.key");
        let bundle = self.path("server.pem");
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec"])
                .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&crt)
                .args(["-days", "30", "-subj", "/CN=localhost"])
                .args(["-addext", "subjectAltName=DNS:localhost"])
                .args(["-addext", "basicConstraints=critical,CA:FALSE"])
                .args(["-addext", "extendedKeyUsage=serverAuth"]),
        )?;
        let mut pem = fs::read(&crt).context("reading the generated certificate")?;
        pem.extend(fs::read(&key).context("reading the generated key")?);
        fs::write(&bundle, pem).context("writing the certificate bundle")?;
        Ok((crt, bundle))
    }

    /// Starts `proxy run -c CONFIG`, its stderr going to `proxy.log` here.
    pub fn start_proxy(&mut self, proxy_bin: &Path, config: &Path) -> Result<()> {
        let log = File::create(self.log_path()).context("creating the proxy log")?;
        let child = Command::new(proxy_bin)
            .arg("run")
            .arg("-c")
            .arg(config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", proxy_bin.display()))?;
        self.proxy = Some(child);
        Ok(())
    }

    /// Waits until `proxy status` shows an active generation of `name`.
    /// Fails early, with the log, if the proxy exits first.
    pub async fn wait_proxy_active(
        &mut self,
        proxy_bin: &Path,
        name: &str,
        timeout: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        // Bounded both ways: by the timeout and by a count of polls.
        for _ in 0..10_000 {
            if start.elapsed() > timeout {
                break;
            }
            self.check_proxy_alive()?;
            let out = tokio::process::Command::new(proxy_bin)
                .args(["status", "--json", "--name", name, "--bpffs"])
                .arg(&self.bpffs)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output();
            match tokio::time::timeout(Duration::from_secs(5), out).await {
                Ok(Ok(out)) if out.status.success() => {
                    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
                        .context("parsing `proxy status --json`")?;
                    let active = json["generations"].as_array().is_some_and(|gens| {
                        gens.iter().any(|g| g["state"].as_str() == Some("active"))
                    });
                    if active {
                        return Ok(());
                    }
                    last = String::from_utf8_lossy(&out.stdout).into_owned();
                }
                // Before the generation pinned its maps, status fails: retry.
                Ok(Ok(out)) => last = String::from_utf8_lossy(&out.stderr).into_owned(),
                Ok(Err(e)) => bail!("running `proxy status`: {e}"),
                Err(_) => last = "`proxy status` did not answer within 5s".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the proxy did not become active within {timeout:?}\nlast status: {}\n--- proxy log ---\n{}",
            last.trim(),
            self.proxy_log_tail()
        )
    }

    /// An error (with the log) if the proxy child has exited.
    pub fn check_proxy_alive(&mut self) -> Result<()> {
        let Some(child) = self.proxy.as_mut() else {
            bail!("the proxy was not started");
        };
        if let Some(status) = child.try_wait().context("polling the proxy")? {
            bail!(
                "the proxy exited ({status})\n--- proxy log ---\n{}",
                self.proxy_log_tail()
            );
        }
        Ok(())
    }

    pub fn log_path(&self) -> PathBuf {
        self.path("proxy.log")
    }

    /// The last lines of the proxy log, for error messages.
    pub fn proxy_log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut child) = self.proxy.take() {
            // By PID, and SIGKILL: nothing of the run needs a graceful stop,
            // and the mount below can only go once the proxy is gone.
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // Safety: kill(2) has no memory effects; the child is not
                // reaped yet, so the PID is still ours.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = child.wait();
        }
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.bpffs)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                // Something still holds it: detach it lazily rather than
                // leave a mount behind on the host.
                if let Ok(c) = CString::new(self.bpffs.as_os_str().as_bytes()) {
                    // Safety: a valid NUL-terminated path.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
            self.mounted = false;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("proxy-bench: removing {}: {e}", self.dir.display());
        }
    }
}

/// Runs a command to completion; an error with its output if it fails.
fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
