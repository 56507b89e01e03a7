//! Proxy configs for a sandbox: the fixed addresses inside its namespace,
//! the standard layer-4 config with the knobs the tests turn, and pieces
//! (the `[global]` table, extra keys, [`Table`]s of listeners and backends
//! gathered by [`ConfigToml`]) for the tests that write their own.

use std::{fmt::Display, path::Path};

use crate::sandbox::Sandbox;

/// The address the proxy listens on inside each test's network namespace.
pub const PROXY_ADDR: &str = "127.0.0.1:8080";
/// The address of the in-process backend inside each test's namespace.
pub const BACKEND_ADDR: &str = "127.0.0.1:9000";
/// The default `[stats] bind`.
pub const STATS_ADDR: &str = "127.0.0.1:8404";

/// The content types the gzip stage tests compress: text and the usual
/// textual application types.
pub const GZIP_TYPES: &[&str] = &[
    "text/html",
    "text/plain",
    "text/css",
    "application/json",
    "application/javascript",
];

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

/// One TOML table of a config (`[[listener]]`, `[[backend]]`, or a
/// sub-table such as `[listener.tls]`), built key by key, so that the tests
/// say only what differs between their listeners and backends.
#[derive(Clone, Debug)]
pub struct Table {
    /// `[[listener]]`, `[listener.tls]`, ...
    header: String,
    /// `key = value` lines, in the order they were set.
    keys: Vec<String>,
    /// Rendered after the keys: TOML puts a table's own keys first.
    subtables: Vec<Table>,
}

impl Table {
    /// An empty table under `header` (the brackets included).
    pub fn new(header: &str) -> Table {
        Table {
            header: header.to_string(),
            keys: Vec::new(),
            subtables: Vec::new(),
        }
    }

    /// `[[listener]]` `name` on `bind` forwarding to backend `backend`, in
    /// the default mode.
    pub fn listener(name: &str, bind: &[&str], backend: &str) -> Table {
        Table::new("[[listener]]")
            .str("name", name)
            .strs("bind", bind)
            .str("backend", backend)
    }

    /// A layer-4 listener (`mode = "tcp"`).
    pub fn tcp(name: &str, bind: &str, backend: &str) -> Table {
        Table::listener(name, &[bind], backend).str("mode", "tcp")
    }

    /// An HTTP listener (`mode = "http"`).
    pub fn http(name: &str, bind: &str, backend: &str) -> Table {
        Table::listener(name, &[bind], backend).str("mode", "http")
    }

    /// `[[backend]]` `name` with `servers`.
    pub fn backend(name: &str, servers: &[&str]) -> Table {
        Table::new("[[backend]]")
            .str("name", name)
            .strs("servers", servers)
    }

    /// A backend on one UNIX socket that sends a PROXY v2 header: how one
    /// stage reaches the next.
    pub fn proxy_v2_backend(name: &str, sock: &Path) -> Table {
        Table::backend(name, &[&unix(sock)]).key("send_proxy_v2", true)
    }

    /// `[listener.tls]` with the certificate bundles `certs` (the first is
    /// the default).
    pub fn tls(certs: &[&Path]) -> Table {
        let certs: Vec<String> = certs.iter().map(|c| c.display().to_string()).collect();
        let certs: Vec<&str> = certs.iter().map(String::as_str).collect();
        Table::new("[listener.tls]").strs("certs", &certs)
    }

    /// [`Table::tls`] that offers ALPN `http/1.1`.
    pub fn tls_http1(certs: &[&Path]) -> Table {
        Table::tls(certs).strs("alpn", &["http/1.1"])
    }

    /// `[listener.compression]`: gzip at level 1 for bodies of `min_size`
    /// bytes or more of the content `types`.
    pub fn gzip(min_size: usize, types: &[&str]) -> Table {
        Table::new("[listener.compression]")
            .str("algo", "gzip")
            .key("level", 1)
            .key("min_size", min_size)
            .strs("types", types)
    }

    /// `key = value` with `value` already TOML (a number, a bool, an array).
    pub fn key(mut self, key: &str, value: impl Display) -> Table {
        self.keys.push(format!("{key} = {value}"));
        self
    }

    /// `key = "value"`.
    pub fn str(self, key: &str, value: &str) -> Table {
        self.key(key, toml_str(value))
    }

    /// `key = ["value", ...]`.
    pub fn strs(self, key: &str, values: &[&str]) -> Table {
        let values: Vec<String> = values.iter().map(|v| toml_str(v)).collect();
        self.key(key, format!("[{}]", values.join(", ")))
    }

    /// Adds a sub-table (`[listener.tls]`, `[listener.compression]`).
    pub fn with(mut self, table: Table) -> Table {
        self.subtables.push(table);
        self
    }

    fn render_into(&self, out: &mut String) {
        out.push_str(&self.header);
        out.push('\n');
        for line in &self.keys {
            out.push_str(line);
            out.push('\n');
        }
        for sub in &self.subtables {
            sub.render_into(out);
        }
    }
}

/// A whole config: its `[global]` text, then [`Table`]s in order.
#[derive(Clone, Debug)]
pub struct ConfigToml {
    text: String,
}

impl ConfigToml {
    /// Starts from `global` (the `[global]` table, e.g. [`global_toml`]).
    pub fn new(global: String) -> ConfigToml {
        ConfigToml { text: global }
    }

    /// The stage tests' start: [`global_toml`] of `sb`.
    pub fn stages(sb: &Sandbox, hard_stop_after: &str) -> ConfigToml {
        ConfigToml::new(global_toml(sb, hard_stop_after))
    }

    /// Appends `table` after a blank line.
    pub fn table(mut self, table: Table) -> ConfigToml {
        if !self.text.is_empty() && !self.text.ends_with("\n\n") {
            self.text.push('\n');
        }
        table.render_into(&mut self.text);
        self
    }

    /// Appends each of `tables`.
    pub fn tables(self, tables: impl IntoIterator<Item = Table>) -> ConfigToml {
        tables.into_iter().fold(self, ConfigToml::table)
    }

    pub fn render(self) -> String {
        self.text
    }
}

/// `unix:<path>`, how a bind or a server names a UNIX socket.
pub fn unix(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// The plainest chain: listener `front` on [`PROXY_ADDR`] forwarding to
/// backend `app` on [`BACKEND_ADDR`].
pub fn front_to_app() -> [Table; 2] {
    [
        Table::listener("front", &[PROXY_ADDR], "app"),
        Table::backend("app", &[BACKEND_ADDR]),
    ]
}

/// The application frontend of the stage chains: listener `app` (in
/// `app_mode`, decoding PROXY v2) on `<sandbox>/app0.sock` and `app1.sock`,
/// forwarding to backend `servers`, and the backends `app0` and `app1`
/// that reach it with a PROXY v2 header. Add the `servers` backend.
pub fn unix_app(sb: &Sandbox, app_mode: &str) -> [Table; 3] {
    let app0 = sb.dir.join("app0.sock");
    let app1 = sb.dir.join("app1.sock");
    [
        Table::listener("app", &[&unix(&app0), &unix(&app1)], "servers")
            .str("mode", app_mode)
            .key("accept_proxy", true),
        Table::proxy_v2_backend("app0", &app0),
        Table::proxy_v2_backend("app1", &app1),
    ]
}

/// A TOML basic string. JSON's escapes are a subset of TOML's, so a JSON
/// string literal is a valid TOML one.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}
