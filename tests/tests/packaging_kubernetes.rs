//! Checks of `packaging/kubernetes/`: `yamllint`, `kubernetes-validate
//! --strict` of both manifests, the handover fields read with PyYAML, the
//! canary DaemonSet against the stable one, `proxy check` of the
//! ConfigMap's config, `shellcheck` of its scripts, the entrypoint's
//! semantics with stand-in children, the entrypoint and readiness probe
//! around real generations in separate PID namespaces (a handover; a
//! canary promoted, aborted and refused), generations under the pod's
//! capabilities.
//!
//! The tests that run generations need root, like the other integration
//! tests. A missing tool fails its test and names the package to install;
//! nothing is skipped. Debian: jq shellcheck yamllint python3-yaml
//! util-linux; PyPI: kubernetes-validate.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use proxy_harness::{
    Proxy, Sandbox, Signal,
    packaging::{
        Out, cap_name, duration, handover_config, handover_within_capabilities, packaging,
        proxy_check, read, require_tool, run, run_ok, shellcheck, toml_string,
    },
    procfs::{children, first_child},
    proxy::proxy_bin,
    signals::signal,
};
use serde_json::Value;

fn daemonset_path() -> PathBuf {
    packaging("kubernetes/daemonset.yaml")
}

fn canary_daemonset_path() -> PathBuf {
    packaging("kubernetes/canary-daemonset.yaml")
}

/// Both manifests.
fn manifests() -> [PathBuf; 2] {
    [daemonset_path(), canary_daemonset_path()]
}

/// A Python with PyYAML: Debian's python3-yaml, or the PyPI one.
fn python_with_yaml() -> PathBuf {
    for candidate in ["python3", "/usr/bin/python3"] {
        if Command::new(candidate)
            .args(["-c", "import yaml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return PathBuf::from(candidate);
        }
    }
    panic!("no python3 with PyYAML: apt-get install python3-yaml");
}

/// The documents of a manifest, parsed by PyYAML.
fn manifest_docs(path: &Path) -> Vec<Value> {
    let out = run_ok(
        Command::new(python_with_yaml())
            .args([
                "-c",
                "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
            ])
            .arg(path),
        &format!("parsing {} with PyYAML", path.display()),
    );
    let docs: Vec<Value> = serde_json::from_str(&out.stdout).expect("PyYAML's JSON");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The documents of daemonset.yaml.
fn daemonset_docs() -> Vec<Value> {
    manifest_docs(&daemonset_path())
}

fn doc(docs: &[Value], kind: &str) -> Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in daemonset.yaml"))
        .clone()
}

fn configmap_file(key: &str) -> String {
    doc(&daemonset_docs(), "ConfigMap")["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no data.{key} in the ConfigMap"))
        .to_string()
}

#[test]
fn manifests_pass_yamllint() {
    let yamllint = require_tool("yamllint", "apt-get install yamllint");
    for path in manifests() {
        run_ok(
            Command::new(&yamllint)
                .args([
                    "--strict",
                    "-d",
                    "{extends: default, rules: {line-length: {max: 120}}}",
                ])
                .arg(&path),
            &format!("yamllint {}", path.display()),
        );
    }
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    let validate = require_tool(
        "kubernetes-validate",
        "pip install kubernetes-validate (kubeconform and kubeval are not Debian or PyPI packages)",
    );
    // 1.30: the oldest with securityContext.appArmorProfile; and the newest.
    for path in manifests() {
        for version in [Some("1.30.0"), None] {
            let mut cmd = Command::new(&validate);
            cmd.args(["--strict", "--quiet"]);
            if let Some(v) = version {
                cmd.args(["-k", v]);
            }
            run_ok(
                cmd.arg(&path),
                &format!(
                    "kubernetes-validate --strict {} (Kubernetes {})",
                    path.display(),
                    version.unwrap_or("latest")
                ),
            );
        }
    }
}

/// The canary DaemonSet is the stable one's pod with a canary start, on
/// the nodes an operator labels: the same host network, bpffs, ConfigMap
/// (so the same instance name), entrypoint, probe, capabilities and
/// resources; `--canary P` added; pods neither DaemonSet selects from the
/// other; never two canaries on a node.
#[test]
fn canary_daemonset_is_the_stable_pod_with_a_canary_start() {
    let docs = manifest_docs(&canary_daemonset_path());
    assert_eq!(
        docs.iter().map(|d| d["kind"].clone()).collect::<Vec<_>>(),
        ["DaemonSet"],
        "only the DaemonSet: a ConfigMap here would overwrite the stable one's on apply"
    );
    let canary = &docs[0];
    let stable = doc(&daemonset_docs(), "DaemonSet");
    assert_ne!(canary["metadata"]["name"], stable["metadata"]["name"]);

    // Selectors: neither DaemonSet may claim the other's pods.
    let selects = |ds: &Value, pod_of: &Value| {
        let labels = &pod_of["spec"]["template"]["metadata"]["labels"];
        ds["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("matchLabels")
            .iter()
            .all(|(k, v)| labels[k] == *v)
    };
    assert!(selects(canary, canary) && selects(&stable, &stable));
    assert!(
        !selects(&stable, canary) && !selects(canary, &stable),
        "the selectors overlap: the stable DaemonSet would count canary pods as its own"
    );

    // One canary per node: a new canary pod only once the old one is gone.
    let rolling = &canary["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(canary["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        rolling["maxSurge"], 0,
        "a surge canary beside the old one would be refused"
    );
    assert_eq!(rolling["maxUnavailable"], 1);

    // The pod: the stable one's but for the node selector and the
    // container's image and args.
    let mut canary_pod = canary["spec"]["template"]["spec"].clone();
    let mut stable_pod = stable["spec"]["template"]["spec"].clone();
    let stable_nodes = stable_pod
        .as_object_mut()
        .unwrap()
        .remove("nodeSelector")
        .expect("the stable nodeSelector");
    let canary_nodes = canary_pod
        .as_object_mut()
        .unwrap()
        .remove("nodeSelector")
        .expect("a canary nodeSelector");
    for (k, v) in stable_nodes.as_object().unwrap() {
        assert_eq!(
            canary_nodes[k], *v,
            "the canary runs where the stable pod runs"
        );
    }
    assert!(
        canary_nodes.as_object().unwrap().len() > stable_nodes.as_object().unwrap().len(),
        "a node label chooses the canary's nodes: {canary_nodes}"
    );
    let take = |pod: &mut Value, key: &str| -> Value {
        pod["containers"][0]
            .as_object_mut()
            .expect("a container")
            .remove(key)
            .unwrap_or_else(|| panic!("no container {key}"))
    };
    let (stable_args, canary_args) = (take(&mut stable_pod, "args"), take(&mut canary_pod, "args"));
    take(&mut stable_pod, "image");
    take(&mut canary_pod, "image");
    assert_eq!(
        canary_pod, stable_pod,
        "the canary pod must be the stable pod (host network, bpffs, ConfigMap, entrypoint, \
         probe, security context) but for nodeSelector, image and args"
    );
    let stable_args: Vec<&str> = stable_args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let canary_args: Vec<&str> = canary_args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        canary_args[..stable_args.len()],
        stable_args[..],
        "the canary runs the stable command line ..."
    );
    let extra = &canary_args[stable_args.len()..];
    assert_eq!(extra.len(), 2, "... plus --canary PERCENT: {canary_args:?}");
    assert_eq!(extra[0], "--canary");
    let share: f64 = extra[1].parse().expect("a share in percent");
    assert!(share > 0.0 && share < 100.0, "share {share}");

    // Spelled out: the same bpffs and the same instance (config).
    let volume = |pod: &Value, name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    assert_eq!(
        volume(&canary_pod, "bpffs")["hostPath"]["path"],
        "/sys/fs/bpf"
    );
    assert_eq!(
        volume(&canary_pod, "config")["configMap"]["name"],
        doc(&daemonset_docs(), "ConfigMap")["metadata"]["name"]
    );
}

#[test]
fn daemonset_fields_make_the_rollout_a_handover() {
    let docs = daemonset_docs();
    let ds = doc(&docs, "DaemonSet");
    let spec = &ds["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        spec["updateStrategy"]["rollingUpdate"]["maxSurge"], 1,
        "the new pod starts beside the old one"
    );
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(
        spec["selector"]["matchLabels"]["app.kubernetes.io/name"],
        spec["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    );
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");

    let toml = configmap_file("proxy.toml");
    let hard = duration(&toml_string(&toml, "hard_stop_after").expect("hard_stop_after"));
    let grace =
        toml_string(&toml, "handover_grace").map_or(Duration::from_millis(200), |g| duration(&g));
    let period = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(period) > hard + grace,
        "terminationGracePeriodSeconds ({period}) must exceed hard_stop_after + handover_grace"
    );

    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert!(
        c.get("ports").is_none(),
        "no ports: with hostNetwork they are host ports and keep the surge pod off the node"
    );
    assert!(
        c.get("livenessProbe").is_none(),
        "a liveness restart would bring back a replaced generation"
    );
    let sc = &c["securityContext"];
    let caps: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for cap in [
        "BPF",
        "PERFMON",
        "NET_ADMIN",
        "SYS_ADMIN",
        "NET_BIND_SERVICE",
    ] {
        assert!(caps.contains(cap), "capabilities.add lacks {cap}: {caps:?}");
    }
    assert_eq!(sc["runAsUser"], 0);

    // bpffs: the host's, at /sys/fs/bpf.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    let bpffs_mount = mounts
        .iter()
        .find(|m| m["mountPath"] == "/sys/fs/bpf")
        .expect("a volume mounted at /sys/fs/bpf");
    let bpffs = volume(bpffs_mount["name"].as_str().unwrap());
    assert_eq!(bpffs["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(bpffs["hostPath"]["type"], "Directory");
    assert!(
        bpffs_mount.get("mountPropagation").is_none()
            || bpffs_mount["mountPropagation"] == "HostToContainer",
        "bpffs must not propagate back to the host"
    );

    // The scripts and the pidfile live where the command, the probe and
    // the env say.
    let mount_of = |path: &str| {
        mounts
            .iter()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("nothing mounted over {path}"))
    };
    let config_items = |path: &str| -> String {
        let m = mount_of(path);
        let rel = path
            .strip_prefix(m["mountPath"].as_str().unwrap())
            .unwrap()
            .trim_start_matches('/');
        let v = volume(m["name"].as_str().unwrap());
        assert_eq!(
            v["configMap"]["name"], "proxy",
            "{path} must come from the ConfigMap"
        );
        let item = v["configMap"]["items"]
            .as_array()
            .expect("configMap items")
            .iter()
            .find(|i| i["path"] == rel)
            .unwrap_or_else(|| panic!("no ConfigMap item at {rel}"));
        item["key"].as_str().unwrap().to_string()
    };
    let command: Vec<&str> = c["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command[0], "/bin/sh");
    assert_eq!(config_items(command[1]), "entrypoint.sh");
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&args[..2], ["proxy", "run"]);
    let config = args[args.iter().position(|a| *a == "-c").expect("-c") + 1];
    assert_eq!(config_items(config), "proxy.toml");
    let probe: Vec<&str> = c["readinessProbe"]["exec"]["command"]
        .as_array()
        .expect("an exec readiness probe")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(config_items(probe[1]), "ready.sh");
    let env = |name: &str| {
        c["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no env {name}"))
            .to_string()
    };
    assert_eq!(env("PROXY_CONFIG"), config);
    let pidfile = env("PROXY_PIDFILE");
    let run_mount = mount_of(&pidfile);
    assert!(
        volume(run_mount["name"].as_str().unwrap())
            .get("emptyDir")
            .is_some(),
        "the pidfile must be pod-local (emptyDir), not shared between pods"
    );
    assert!(
        toml.contains("pidfile = \"${PROXY_PIDFILE"),
        "the config must write the pidfile the probe reads"
    );
}

#[test]
fn daemonset_config_passes_proxy_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    fs::write(&path, configmap_file("proxy.toml")).unwrap();
    proxy_check(&path);
}

/// The ConfigMap's scripts, written out: (entrypoint.sh, ready.sh).
fn pod_scripts(dir: &Path) -> (PathBuf, PathBuf) {
    let entry = dir.join("entrypoint.sh");
    let ready = dir.join("ready.sh");
    fs::write(&entry, configmap_file("entrypoint.sh")).unwrap();
    fs::write(&ready, configmap_file("ready.sh")).unwrap();
    (entry, ready)
}

#[test]
fn daemonset_scripts_pass_shellcheck() {
    let dir = tempfile::tempdir().unwrap();
    let (entry, ready) = pod_scripts(dir.path());
    shellcheck(&entry, Some("sh"));
    shellcheck(&ready, Some("sh"));
}

/// The entrypoint with stand-in children (no root needed): a failure passes
/// through, a clean exit idles until SIGTERM, SIGTERM becomes SIGUSR1.
#[test]
fn pod_entrypoint_idles_after_handover_and_soft_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (entry, _) = pod_scripts(dir.path());
    let spawn = |child: &str, log: &str| {
        Command::new("/bin/sh")
            .arg(&entry)
            .args(["/bin/sh", "-c", child])
            .env("PROXY_PIDFILE", dir.path().join("proxy.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join(log)).unwrap())
            .spawn()
            .expect("starting the entrypoint")
    };
    let wait = |child: &mut std::process::Child, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let wait_file = |path: &Path| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The child is ours, unreaped.
    let term = |child: &std::process::Child| {
        signal(child.id(), Signal::Term).expect("signalling the entrypoint");
    };

    // A failing generation: its status, so the kubelet restarts it.
    let mut c = spawn("exit 3", "fail.log");
    let status = wait(&mut c, Duration::from_secs(5)).expect("entrypoint exits");
    assert_eq!(
        status.code(),
        Some(3),
        "the entrypoint must pass a failure on"
    );

    // Handed over (exit 0, unasked): idle, until SIGTERM.
    let mut c = spawn("exit 0", "idle.log");
    let log = dir.path().join("idle.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !read(&log).contains("idling") {
        assert!(
            Instant::now() < deadline,
            "no idle message; log:\n{}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        wait(&mut c, Duration::from_millis(500)).is_none(),
        "the entrypoint must not exit after a handover (the kubelet would restart the old version)"
    );
    term(&c);
    let status = wait(&mut c, Duration::from_secs(5)).expect("exit at SIGTERM");
    assert!(status.success(), "idle entrypoint at SIGTERM: {status}");

    // Serving: SIGTERM becomes SIGUSR1 for the generation.
    let started = dir.path().join("started");
    let got_usr1 = dir.path().join("usr1");
    let child = format!(
        "trap 'touch {usr1}; exit 0' USR1; trap 'exit 9' TERM; sleep 0.3; touch {started}; \
         while :; do sleep 0.05; done",
        usr1 = got_usr1.display(),
        started = started.display()
    );
    let mut c = spawn(&child, "soft.log");
    wait_file(&started);
    term(&c);
    let status = wait(&mut c, Duration::from_secs(5)).expect("exit after the soft-stop");
    assert!(
        got_usr1.exists() && status.success(),
        "SIGTERM must reach the generation as SIGUSR1 and the entrypoint exit with its status \
         ({status}); log:\n{}",
        read(&dir.path().join("soft.log"))
    );
}

/// The entrypoint of a canary pod (`--canary` among its arguments) with
/// stand-in children: a failed canary is not restarted (the kubelet would
/// put its share back on the failing version): the entrypoint idles until
/// SIGTERM; so does an ended one (aborted).
#[test]
fn pod_entrypoint_keeps_a_failed_canary_down() {
    let dir = tempfile::tempdir().unwrap();
    let (entry, _) = pod_scripts(dir.path());
    for (child, canary_arg, says) in [
        (
            "exit 3",
            "--canary",
            "the canary generation failed (exit status 3)",
        ),
        ("exit 0", "--canary=2.5", "the canary generation ended"),
    ] {
        let log = dir.path().join("canary.log");
        // `sh -c CHILD --canary 10`: the stand-in ignores its $0 and $1.
        let mut c = Command::new("/bin/sh")
            .arg(&entry)
            .args(["/bin/sh", "-c", child, canary_arg, "10"])
            .env("PROXY_PIDFILE", dir.path().join("proxy.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the entrypoint");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !read(&log).contains("idling until this pod is deleted") {
            assert!(
                c.try_wait().unwrap().is_none(),
                "the entrypoint of a canary that ended ({child}) must not exit; log:\n{}",
                read(&log)
            );
            assert!(
                Instant::now() < deadline,
                "no idle message; log:\n{}",
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(read(&log).contains(says), "log:\n{}", read(&log));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            c.try_wait().unwrap().is_none(),
            "the canary entrypoint exited ({child}); log:\n{}",
            read(&log)
        );
        // The child is ours, unreaped.
        signal(c.id(), Signal::Term).expect("signalling the entrypoint");
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = c.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "no exit at SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            status.success(),
            "idle canary entrypoint at SIGTERM: {status}"
        );
    }
}

/// The readiness probe of the pod whose PID 1 is `init`, run as the kubelet
/// would: inside the pod's PID namespace.
fn probe(ready: &Path, config: &Path, init: u32, pidfile: &Path) -> Out {
    run(
        Command::new("nsenter")
            .args(["--target", &init.to_string(), "--pid", "--", "/bin/sh"])
            .arg(ready)
            .env("PROXY_PIDFILE", pidfile)
            .env("PROXY_CONFIG", config)
            .env("PROXY_BIN", proxy_bin())
            .env("NO_COLOR", "1"),
        Duration::from_secs(10),
    )
}

/// Waits (bounded) until the probe of `init` says `want`.
fn wait_ready(
    sb: &Sandbox,
    (ready, config): (&Path, &Path),
    init: u32,
    pidfile: &Path,
    want: bool,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = probe(ready, config, init, pidfile);
        if out.status.success() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the readiness probe still says {}; last run:\n{}\nstatus: {:#?}",
            if want { "not ready" } else { "ready" },
            out.text(),
            sb.try_status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pod of canary-daemonset.yaml: the ConfigMap's entrypoint as PID 1 of
/// its own PID namespace, running `proxy run -c CONFIG --canary PERCENT`
/// with a pod-local pidfile. Killed (by PID, our child) on drop.
struct CanaryPod {
    child: std::process::Child,
    log: PathBuf,
    pidfile: PathBuf,
}

impl CanaryPod {
    fn start(sb: &Sandbox, entry: &Path, config: &Path, name: &str, percent: &str) -> Self {
        let run = sb.dir.join(name);
        fs::create_dir(&run).unwrap();
        let pidfile = run.join("proxy.pid");
        let log = sb.dir.join(format!("{name}.log"));
        let child = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "/bin/sh"])
            .arg(entry)
            .arg(&sb.bin)
            .args(["run", "-c"])
            .arg(config)
            .args(["--canary", percent])
            .env("PROXY_PIDFILE", &pidfile)
            .env("NO_COLOR", "1")
            .env("PROXY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting a canary pod");
        CanaryPod {
            child,
            log,
            pidfile,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pod's PID 1 (the entrypoint's shell).
    fn init(&self) -> u32 {
        first_child(self.child.id(), Duration::from_secs(5))
    }

    /// Waits (bounded) until the log says `what`; the pod must not exit.
    fn wait_log(&mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(what) {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the canary pod exited; log:\n{}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "no `{what}` in the canary pod's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pod deletion: SIGTERM to PID 1; its exit status.
    fn delete(&mut self) -> std::process::ExitStatus {
        // init is our sandbox's process, inside our unreaped child.
        signal(self.init(), Signal::Term).expect("signalling the canary pod");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the canary pod did not exit at SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for CanaryPod {
    fn drop(&mut self) {
        // Our child, unreaped: its PID is still ours.
        if let Ok(None) = self.child.try_wait() {
            for pid in children(self.child.id()) {
                let _ = signal(pid, Signal::Kill);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The canary procedure of packaging/kubernetes/README.md with real
/// generations, each "pod" in its own PID namespace on one network
/// namespace and bpffs: a canary pod beside the stable pod (both ready), a
/// share change, `proxy promote` (the stable pod idles, not ready; the
/// canary is ready as the active generation), the stable DaemonSet's surge
/// pod taking over from the promoted canary (which idles), pod deletions;
/// then a canary aborted (it idles, not ready) and a second canary refused
/// (its pod idles instead of crash-looping).
#[test]
fn pod_scripts_follow_a_canary_promotion_and_abort() {
    let sb = Sandbox::new("pkg-pod-canary");
    require_tool("jq", "apt-get install jq");
    require_tool("nsenter", "apt-get install util-linux");
    require_tool("unshare", "apt-get install util-linux");
    let (entry, ready) = pod_scripts(&sb.dir);
    let config = sb.write_file(
        "proxy.toml",
        &handover_config(&sb, "pidfile = \"${PROXY_PIDFILE}\"\n"),
    );
    let scripts = (ready.as_path(), config.as_path());
    let entry_str = entry.to_str().unwrap().to_string();
    let stable_pod = |name: &str| -> (Proxy, PathBuf) {
        let run = sb.dir.join(name);
        fs::create_dir(&run).unwrap();
        let pidfile = run.join("proxy.pid");
        let p = Proxy::start_wrapped(
            &sb,
            &[
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "/bin/sh",
                &entry_str,
            ],
            &config,
            &[("PROXY_PIDFILE", pidfile.to_str().unwrap())],
        );
        (p, pidfile)
    };
    // `kubectl exec POD -- proxy COMMAND --name edge ...`: any process that
    // sees the host's bpffs.
    let admin = |args: &[&str]| {
        let bpffs = sb.bpffs.to_str().unwrap();
        let mut all = vec![args[0], "--name", &sb.name, "--bpffs", bpffs];
        all.extend_from_slice(&args[1..]);
        let out = sb.run_proxy_cmd(&all, Duration::from_secs(10));
        assert!(
            out.status.success(),
            "proxy {all:?}: {}{}",
            out.stdout,
            out.stderr
        );
    };
    let wait_canary = |what: &str, want: &dyn Fn(&proxy_harness::Status) -> bool| {
        sb.wait_status(what, Duration::from_secs(10), want);
    };

    // The stable pod serves.
    let (mut a, a_pidfile) = stable_pod("pod-a");
    let a_gen = a.wait_active(&sb, Duration::from_secs(10)).generation;
    let a_init = pod_init(&a);
    wait_ready(
        &sb,
        scripts,
        a_init,
        &a_pidfile,
        true,
        "stable pod A serving",
    );

    // A canary pod beside it: both ready.
    let mut c = CanaryPod::start(&sb, &entry, &config, "pod-c", "10");
    wait_canary("pod C to be the canary", &|st| {
        st.canary.as_ref().is_some_and(|k| {
            k.alive
                && k.generation > a_gen
                && k.weight_percent == 10.0
                && st
                    .generation(k.generation)
                    .is_some_and(|g| g.state == "canary")
        })
    });
    let c_gen = sb.status().canary.expect("the canary").generation;
    let c_init = c.init();
    wait_ready(&sb, scripts, c_init, &c.pidfile, true, "canary pod C");
    wait_ready(
        &sb,
        scripts,
        a_init,
        &a_pidfile,
        true,
        "pod A beside the canary",
    );
    assert!(sb.status().is_serving(a_gen));

    // A new share, from any pod.
    admin(&["canary", "--weight", "30"]);
    wait_canary("the canary's share to be 30%", &|st| {
        st.canary
            .as_ref()
            .is_some_and(|k| k.generation == c_gen && k.weight_percent == 30.0)
    });

    // Promote: C is the active generation; A's generation hands over and
    // drains, and its container idles (not ready) instead of exiting.
    admin(&["promote"]);
    wait_ready(&sb, scripts, c_init, &c.pidfile, true, "promoted canary C");
    wait_ready(
        &sb,
        scripts,
        a_init,
        &a_pidfile,
        false,
        "pod A after the promotion",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.log().contains("idling until this pod is deleted") {
        assert!(
            a.try_exit().is_none(),
            "pod A's entrypoint exited after the promotion (the kubelet would restart the old \
             version); log:\n{}",
            a.log()
        );
        assert!(
            Instant::now() < deadline,
            "pod A's generation did not hand over to the promoted canary; log:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        a.log().contains("soft-stop (replaced)"),
        "log:\n{}",
        a.log()
    );
    let st = sb.status();
    assert!(st.is_serving(c_gen) && st.canary.is_none(), "{st:#?}");

    // The stable DaemonSet rolled to the canary's image: its surge pod B
    // takes over from C as in any handover; C's container idles.
    let (mut b, b_pidfile) = stable_pod("pod-b");
    let b_gen = b.wait_active(&sb, Duration::from_secs(10)).generation;
    let b_init = pod_init(&b);
    wait_ready(&sb, scripts, b_init, &b_pidfile, true, "stable pod B");
    wait_ready(
        &sb,
        scripts,
        c_init,
        &c.pidfile,
        false,
        "pod C replaced by B",
    );
    c.wait_log("the canary generation ended");
    assert!(
        c.log().contains("soft-stop (replaced)"),
        "log:\n{}",
        c.log()
    );

    // Old pods deleted (the stable one by the rollout, the canary DaemonSet
    // by the operator): both exit 0 at SIGTERM.
    signal(a_init, Signal::Term).expect("signalling pod A");
    let status = a.expect_exit(Duration::from_secs(5));
    assert!(status.success(), "idle pod A at SIGTERM: {status}");
    let status = c.delete();
    assert!(status.success(), "idle canary pod C at SIGTERM: {status}");
    assert!(sb.status().is_serving(b_gen));

    // A canary aborted: it leaves the split and drains; its pod idles, not
    // ready. A second canary meanwhile is refused, and its pod idles too.
    let mut d = CanaryPod::start(&sb, &entry, &config, "pod-d", "5");
    wait_canary("pod D to be the canary", &|st| {
        st.canary
            .as_ref()
            .is_some_and(|k| k.alive && k.generation > b_gen)
    });
    let d_gen = sb.status().canary.expect("the canary").generation;
    let d_init = d.init();
    wait_ready(&sb, scripts, d_init, &d.pidfile, true, "canary pod D");
    let mut e = CanaryPod::start(&sb, &entry, &config, "pod-e", "5");
    e.wait_log("the canary generation failed (exit status 1)");
    assert!(
        e.log().contains("already the canary of this instance"),
        "log:\n{}",
        e.log()
    );
    assert_eq!(
        sb.status().canary.map(|k| k.generation),
        Some(d_gen),
        "the refused canary must leave the running one alone"
    );
    admin(&["abort"]);
    wait_ready(&sb, scripts, d_init, &d.pidfile, false, "aborted canary D");
    d.wait_log("the canary generation ended");
    assert!(d.log().contains("canary aborted"), "log:\n{}", d.log());
    let st = sb.status();
    assert!(st.is_serving(b_gen) && st.canary.is_none(), "{st:#?}");
    wait_ready(
        &sb,
        scripts,
        b_init,
        &b_pidfile,
        true,
        "pod B after the abort",
    );
    for (pod, name) in [(&mut d, "D"), (&mut e, "E")] {
        let status = pod.delete();
        assert!(
            status.success(),
            "idle canary pod {name} at SIGTERM: {status}"
        );
    }

    signal(b_init, Signal::Term).expect("signalling pod B");
    let status = b.expect_exit(Duration::from_secs(10));
    assert!(
        status.success() && b.log().contains("soft-stop (SIGUSR1)"),
        "SIGTERM must soft-stop pod B's generation ({status}); log:\n{}",
        b.log()
    );
}

/// Two "pods" (the ConfigMap's entrypoint in PID namespaces of their own,
/// as PID 1, with a pod-local pidfile) on one network namespace and bpffs:
/// the readiness probe follows the handover, the old pod idles after its
/// drain instead of exiting, and SIGTERM soft-stops the serving one.
#[test]
fn pod_scripts_follow_a_handover_between_real_generations() {
    let sb = Sandbox::new("pkg-pod");
    require_tool("jq", "apt-get install jq");
    require_tool("nsenter", "apt-get install util-linux");
    let (entry, ready) = pod_scripts(&sb.dir);
    let config = sb.write_file(
        "proxy.toml",
        &handover_config(&sb, "pidfile = \"${PROXY_PIDFILE}\"\n"),
    );
    let entry = entry.to_str().unwrap().to_string();
    let pod = |name: &str| -> (Proxy, PathBuf) {
        let run = sb.dir.join(name);
        fs::create_dir(&run).unwrap();
        let pidfile = run.join("proxy.pid");
        let p = Proxy::start_wrapped(
            &sb,
            &[
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "/bin/sh",
                &entry,
            ],
            &config,
            &[("PROXY_PIDFILE", pidfile.to_str().unwrap())],
        );
        (p, pidfile)
    };
    let scripts = (ready.as_path(), config.as_path());
    let wait_probe = |init: u32, pidfile: &Path, want: bool, what: &str| {
        wait_ready(&sb, scripts, init, pidfile, want, what)
    };

    let (mut a, a_pidfile) = pod("pod-a");
    let a_gen = a.wait_active(&sb, Duration::from_secs(10)).generation;
    let a_init = pod_init(&a);
    wait_probe(a_init, &a_pidfile, true, "pod A serving");

    let (mut b, b_pidfile) = pod("pod-b");
    let b_gen = b.wait_active(&sb, Duration::from_secs(10)).generation;
    let b_init = pod_init(&b);
    let st = sb.status();
    eprintln!(
        "generation PIDs (each in its own namespace): A {:?}, B {:?}",
        st.generation(a_gen).map(|g| g.pid),
        st.generation(b_gen).map(|g| g.pid)
    );
    wait_probe(b_init, &b_pidfile, true, "pod B took over");
    wait_probe(a_init, &a_pidfile, false, "pod A was replaced");

    // A's generation drains and exits 0; A's container stays (idles).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.log().contains("idling until this pod is deleted") {
        assert!(
            a.try_exit().is_none(),
            "pod A's entrypoint exited after the handover (the kubelet would restart the old \
             version); log:\n{}",
            a.log()
        );
        assert!(
            Instant::now() < deadline,
            "pod A's generation did not hand over and drain; log:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        a.log().contains("soft-stop (replaced)"),
        "log:\n{}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(a.try_exit().is_none(), "pod A must idle; log:\n{}", a.log());
    wait_probe(a_init, &a_pidfile, false, "pod A idles");
    assert!(sb.status().is_serving(b_gen));

    // Pod deletion: SIGTERM to each pod's PID 1.
    // a_init and b_init are our sandbox's processes.
    signal(a_init, Signal::Term).expect("signalling pod A");
    let status = a.expect_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "idle pod A at SIGTERM: {status}; log:\n{}",
        a.log()
    );

    signal(b_init, Signal::Term).expect("signalling pod B");
    let status = b.expect_exit(Duration::from_secs(10));
    assert!(
        status.success()
            && b.log().contains("soft-stop (SIGUSR1)")
            && !b.log().contains("hard stop"),
        "SIGTERM must soft-stop pod B's generation ({status}); log:\n{}",
        b.log()
    );
}

fn pod_capabilities() -> BTreeSet<String> {
    let ds = doc(&daemonset_docs(), "DaemonSet");
    let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(
        sc["drop"],
        serde_json::json!(["ALL"]),
        "the pod drops ALL first"
    );
    sc["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| cap_name(c.as_str().unwrap()))
        .collect()
}

#[test]
fn pod_capabilities_suffice_for_privilege_drop_and_handover() {
    handover_within_capabilities("pkg-caps-pod", "daemonset.yaml", &pod_capabilities());
}

/// The pod's PID 1 (the entrypoint's shell) inside `unshare --pid --fork`.
fn pod_init(pod: &Proxy) -> u32 {
    first_child(pod.pid, Duration::from_secs(5))
}
