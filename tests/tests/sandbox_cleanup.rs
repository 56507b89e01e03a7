//! The sandbox's guard leaves no process behind: an nginx master it
//! adopted is gone with all its workers, including one the master started
//! to replace a worker killed just before it (the bench's peers left such a
//! worker running, its log file already deleted).

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use proxy_harness::{
    Sandbox, procfs,
    signals::{Signal, signal},
    wait_until,
};

/// Sandboxes made and dropped one after the other: the replacement worker
/// came from a race, so it is given several chances.
const ROUNDS: usize = 5;
/// nginx workers per master.
const WORKERS: usize = 4;
/// Every wait.
const BOUND: Duration = Duration::from_secs(10);

/// Processes with a file open inside `dir` (nginx opens its error log in
/// every process).
fn holders_of(dir: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .any(|target| target.starts_with(dir))
        {
            found.push(pid);
        }
    }
    found
}

#[test]
fn an_adopted_nginx_master_leaves_no_worker_behind() {
    for round in 0..ROUNDS {
        let sb = Sandbox::new("sandbox-cleanup");
        let dir = sb.dir.join("nginx");
        fs::create_dir_all(&dir).expect("creating the nginx folder");
        let conf = format!(
            "worker_processes {WORKERS};\n\
             pid {pid};\n\
             error_log {log};\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; server {{ listen 127.0.0.1:8080; return 204; }} }}\n",
            pid = dir.join("nginx.pid").display(),
            log = dir.join("error.log").display(),
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).expect("writing nginx.conf");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off; master_process on;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx (apt-get install nginx)");
        let master = child.id();
        sb.adopt(child);
        wait_until(
            BOUND,
            || procfs::children(master).len() == WORKERS,
            || format!("nginx {master} did not start {WORKERS} workers"),
        );
        assert!(holders_of(&dir).contains(&master), "the scan sees nginx");

        drop(sb);
        // Killed processes are reaped by init a moment later.
        let start = Instant::now();
        loop {
            let left = holders_of(&dir);
            if left.is_empty() {
                break;
            }
            if start.elapsed() > BOUND {
                // Ours (they hold our files): not left running.
                for pid in &left {
                    let _ = signal(*pid, Signal::Kill);
                }
                panic!("round {round}: processes of nginx {master} outlived the sandbox: {left:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
