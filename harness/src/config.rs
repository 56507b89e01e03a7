//! Proxy configs for a sandbox: the fixed addresses inside its namespace,
//! the standard layer-4 config with the knobs the tests turn, and pieces
//! (the `[global]` table, extra keys) for the tests that write their own.

use crate::sandbox::Sandbox;

/// The address the proxy listens on inside each test's network namespace.
pub const PROXY_ADDR: &str = "127.0.0.1:8080";
/// The address of the in-process backend inside each test's namespace.
pub const BACKEND_ADDR: &str = "127.0.0.1:9000";
/// The default `[stats] bind`.
pub const STATS_ADDR: &str = "127.0.0.1:8404";

/// The knobs the tests turn; rendered as TOML for the sandbox's instance.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub hard_stop_after: &'static str,
    pub handover_grace: &'static str,
    pub maxconn: Option<u32>,
    pub backlog: u32,
    pub connect_timeout: &'static str,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            hard_stop_after: "30s",
            handover_grace: "200ms",
            maxconn: None,
            // Above the default (1024): a generation that is stopped in a
            // test keeps its queue for a second; no SYN must be dropped.
            backlog: 4096,
            connect_timeout: "2s",
        }
    }
}

impl ProxyConfig {
    /// The default config with `hard_stop_after` as the drain bound.
    pub fn draining(hard_stop_after: &'static str) -> ProxyConfig {
        ProxyConfig {
            hard_stop_after,
            ..ProxyConfig::default()
        }
    }

    pub fn render(&self, sb: &Sandbox) -> String {
        let maxconn = self
            .maxconn
            .map(|n| format!("maxconn = {n}\n"))
            .unwrap_or_default();
        format!(
            r#"[global]
name = "{name}"
bpffs = "{bpffs}"
hard_stop_after = "{hard}"
handover_grace = "{grace}"
# eBPF steering or nothing: a silent fallback must fail the tests.
steering = "ebpf"

[[listener]]
name = "front"
bind = ["{proxy}"]
backend = "app"
backlog = {backlog}
{maxconn}
[[backend]]
name = "app"
servers = ["{backend}"]
connect_timeout = "{ct}"
"#,
            name = sb.name,
            bpffs = sb.bpffs.display(),
            hard = self.hard_stop_after,
            grace = self.handover_grace,
            proxy = PROXY_ADDR,
            backlog = self.backlog,
            backend = BACKEND_ADDR,
            ct = self.connect_timeout,
        )
    }
}

/// The standard config of [`ProxyConfig::render`] with `global_extra`
/// (TOML lines) added to `[global]` and `tail` (more tables) appended.
pub fn config_text(sb: &Sandbox, cfg: &ProxyConfig, global_extra: &str, tail: &str) -> String {
    let base = cfg.render(sb);
    let mut extra = global_extra.trim_end().to_string();
    if !extra.is_empty() {
        extra.push('\n');
    }
    let text = base.replacen("[global]\n", &format!("[global]\n{extra}"), 1);
    assert!(
        text.starts_with("[global]\n"),
        "the rendered config starts with [global]"
    );
    format!("{text}\n{tail}")
}

/// The stage configs' `[global]` table for this sandbox.
pub fn global_toml(sb: &Sandbox, hard_stop_after: &str) -> String {
    format!(
        "[global]\nname = \"{}\"\nbpffs = \"{}\"\nsteering = \"ebpf\"\nhard_stop_after = \"{hard_stop_after}\"\n\n",
        sb.name,
        sb.bpffs.display()
    )
}

/// The application frontend of the stage chains: listener `app` (in
/// `app_mode`, decoding PROXY v2) on `<sandbox>/app0.sock` and `app1.sock`,
/// forwarding to backend `servers`, and the backends `app0` and `app1`
/// that reach it with a PROXY v2 header. Add the `servers` backend.
pub fn unix_app_toml(sb: &Sandbox, app_mode: &str) -> String {
    let app0 = sb.dir.join("app0.sock");
    let app1 = sb.dir.join("app1.sock");
    format!(
        r#"[[listener]]
name = "app"
bind = ["unix:{app0}", "unix:{app1}"]
mode = "{app_mode}"
accept_proxy = true
backend = "servers"

[[backend]]
name = "app0"
servers = ["unix:{app0}"]
send_proxy_v2 = true

[[backend]]
name = "app1"
servers = ["unix:{app1}"]
send_proxy_v2 = true
"#,
        app0 = app0.display(),
        app1 = app1.display(),
    )
}

/// A TOML basic string. JSON's escapes are a subset of TOML's, so a JSON
/// string literal is a valid TOML one.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}
