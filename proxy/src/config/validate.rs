//! Checks that span several values (unique names, existing backends, no
//! address bound twice) and the stage keys of each listener.

use std::{collections::HashMap, net::SocketAddr};

use super::{Addr, CheckConfig, CheckKind, Config, Listener, Mode};

impl Config {
    /// Cross-field checks that deserialization cannot express. Returns the
    /// first problem found as (key path, message).
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        let g = &self.global;
        check_name("global.name", &g.name)?;
        if g.hard_stop_after.is_zero() {
            return Err((
                "global.hard_stop_after".into(),
                "must be greater than zero, e.g. \"30s\": old generations need time to finish \
                 their connections"
                    .into(),
            ));
        }
        if let Some(spread) = g.close_spread_time
            && spread >= g.hard_stop_after
        {
            return Err((
                "global.close_spread_time".into(),
                format!(
                    "{} must be shorter than global.hard_stop_after ({}): the closes are spread \
                     over the end of the drain, before its deadline; \"0s\" closes all tunnels at \
                     once",
                    humantime::format_duration(spread),
                    humantime::format_duration(g.hard_stop_after)
                ),
            ));
        }
        let c = &g.canary;
        if c.window < std::time::Duration::from_secs(1) {
            return Err((
                "global.canary.window".into(),
                "must be at least 1s, e.g. \"30s\": error rates need a few samples".into(),
            ));
        }
        if !c.max_error_ratio.is_finite() || c.max_error_ratio < 1.0 {
            return Err((
                "global.canary.max_error_ratio".into(),
                format!(
                    "{} is out of range: expected a number of at least 1.0 (how many times the \
                     active generation's error rate the canary may reach), e.g. 2.0",
                    c.max_error_ratio
                ),
            ));
        }
        if !(0.0..=1.0).contains(&c.min_error_rate) {
            return Err((
                "global.canary.min_error_rate".into(),
                format!(
                    "{} is out of range: expected a fraction from 0.0 to 1.0, e.g. 0.01 for 1%",
                    c.min_error_rate
                ),
            ));
        }
        if c.promote_after.is_some_and(|p| p < c.window) {
            return Err((
                "global.canary.promote_after".into(),
                "must be at least global.canary.window: a canary is promoted only after it was \
                 judged healthy over a whole window"
                    .into(),
            ));
        }
        if g.pidfile.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err((
                "global.pidfile".into(),
                "empty path: expected a file path such as \"/run/proxy.pid\", or leave the key out"
                    .into(),
            ));
        }
        if !g.bpffs.is_absolute() {
            return Err((
                "global.bpffs".into(),
                format!(
                    "invalid path {:?}: expected an absolute path such as \"/sys/fs/bpf\"",
                    g.bpffs.display().to_string()
                ),
            ));
        }

        let mut backend_index: HashMap<&str, usize> = HashMap::new();
        for (i, b) in self.backends.iter().enumerate() {
            unique_name("backend", i, &b.name, &mut backend_index)?;
            if b.servers.is_empty() {
                return Err((
                    format!("backend[{i}].servers"),
                    "empty list: expected at least one server such as \"127.0.0.1:9000\"".into(),
                ));
            }
            for (key, value, example) in [
                ("connect_timeout", b.connect_timeout, "2s"),
                ("server_timeout", b.server_timeout, "60s"),
            ] {
                positive(&format!("backend[{i}].{key}"), value, example)?;
            }
            if let Some(check) = &b.check {
                validate_check(&format!("backend[{i}].check"), check)?;
            }
        }

        if self.listeners.is_empty() {
            return Err((
                "listener".into(),
                "no listeners defined: expected at least one [[listener]] table".into(),
            ));
        }
        let mut listener_index: HashMap<&str, usize> = HashMap::new();
        // Two sockets bound to the same address would both be accepted by the
        // kernel under SO_REUSEPORT and silently split traffic between
        // listeners, so exact duplicates must be caught here.
        let mut bound: HashMap<&Addr, (usize, usize)> = HashMap::new();
        for (i, l) in self.listeners.iter().enumerate() {
            unique_name("listener", i, &l.name, &mut listener_index)?;
            if l.bind.is_empty() {
                return Err((
                    format!("listener[{i}].bind"),
                    "empty list: expected at least one address such as \"0.0.0.0:8080\" or \
                     \"unix:/run/proxy.sock\""
                        .into(),
                ));
            }
            for (j, addr) in l.bind.iter().enumerate() {
                // Port 0 would bind a random port that no client knows
                // about, and a new generation could not bind the same one.
                if let Addr::Tcp(sa) = addr
                    && sa.port() == 0
                {
                    return Err((
                        format!("listener[{i}].bind[{j}]"),
                        format!(
                            "invalid address \"{sa}\": port 0 is not allowed for a bind \
                             address, expected a fixed port such as \"0.0.0.0:8080\""
                        ),
                    ));
                }
                if let Some((fi, fj)) = bound.insert(addr, (i, j)) {
                    return Err((
                        format!("listener[{i}].bind[{j}]"),
                        format!(
                            "address {addr} is already bound by listener {:?} \
                             (listener[{fi}].bind[{fj}]): each address may appear only once",
                            self.listeners[fi].name
                        ),
                    ));
                }
            }
            for (key, value, example) in [
                ("http_request_timeout", l.http_request_timeout, "30s"),
                ("tunnel_timeout", l.tunnel_timeout, "1h"),
                ("client_timeout", l.client_timeout, "60s"),
            ] {
                positive(&format!("listener[{i}].{key}"), value, example)?;
            }
            validate_stage(i, l)?;
            if !backend_index.contains_key(l.backend.as_str()) {
                let defined = if self.backends.is_empty() {
                    "no [[backend]] tables are defined".to_owned()
                } else {
                    let names: Vec<String> = self
                        .backends
                        .iter()
                        .map(|b| format!("{:?}", b.name))
                        .collect();
                    format!("defined backends: {}", names.join(", "))
                };
                return Err((
                    format!("listener[{i}].backend"),
                    format!("unknown backend {:?} ({defined})", l.backend),
                ));
            }
        }
        // Stats listeners share the address space of the data listeners: two
        // sockets on one address would silently split its connections.
        let stats_binds = self
            .stats
            .iter()
            .map(|st| ("stats.bind".to_string(), st.bind))
            .chain(self.listeners.iter().enumerate().filter_map(|(i, l)| {
                l.stats
                    .as_ref()
                    .map(|st| (format!("listener[{i}].stats.bind"), st.bind))
            }));
        let stats_timeouts = self.stats.iter().map(|st| ("stats".to_string(), st)).chain(
            self.listeners.iter().enumerate().filter_map(|(i, l)| {
                l.stats
                    .as_ref()
                    .map(|st| (format!("listener[{i}].stats"), st))
            }),
        );
        for (key, st) in stats_timeouts {
            let key = format!("{key}.http_request_timeout");
            positive(&key, st.http_request_timeout, "10s")?;
        }
        let mut stats_seen: HashMap<SocketAddr, String> = HashMap::new();
        for (key, addr) in stats_binds {
            if bound.contains_key(&Addr::Tcp(addr)) {
                return Err((
                    key,
                    format!("address {addr} is already a listener's bind address"),
                ));
            }
            if let Some(first) = stats_seen.insert(addr, key.clone()) {
                return Err((
                    key,
                    format!(
                        "address {addr} is already used by {first} (stats listeners default \
                         to 127.0.0.1:8404: give each its own bind)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks of `[backend.check]` (at `key`).
fn validate_check(key: &str, c: &CheckConfig) -> Result<(), (String, String)> {
    if c.interval < std::time::Duration::from_millis(10) {
        return Err((
            format!("{key}.interval"),
            "must be at least 10ms, e.g. \"2s\"".into(),
        ));
    }
    if let Some(t) = c.timeout {
        positive(&format!("{key}.timeout"), t, "1s")?;
    }
    if c.kind == CheckKind::Tcp {
        for (name, set) in [
            ("method", c.method.is_some()),
            ("path", c.path.is_some()),
            ("host", c.host.is_some()),
            ("expect_status", c.expect_status.is_some()),
        ] {
            if set {
                return Err((
                    format!("{key}.{name}"),
                    "only for HTTP checks: add type = \"http\" (a tcp check only connects)".into(),
                ));
            }
        }
        return Ok(());
    }
    let method = c.method();
    // RFC 9110 token characters.
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if method.is_empty() || method.len() > 32 || !method.bytes().all(tchar) {
        return Err((
            format!("{key}.method"),
            format!("invalid method {method:?}: expected a token such as \"GET\" or \"HEAD\""),
        ));
    }
    let path = c.path();
    if !path.starts_with('/')
        || path.len() > 2048
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err((
            format!("{key}.path"),
            format!(
                "invalid path {path:?}: expected an absolute path without spaces, such as \
                 \"/health\""
            ),
        ));
    }
    if let Some(host) = &c.host
        && (host.is_empty()
            || host.len() > 255
            || host
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control()))
    {
        return Err((
            format!("{key}.host"),
            format!("invalid host {host:?}: expected a host name such as \"app.example\""),
        ));
    }
    Ok(())
}

/// CPUs this process may run on, for checking `cpus`.
pub(super) fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Checks of the stage keys of listener `i` (TLS, compression, CPUs, mode).
pub(super) fn validate_stage(i: usize, l: &Listener) -> Result<(), (String, String)> {
    if let Some(cpus) = &l.cpus {
        if cpus.is_empty() {
            return Err((
                format!("listener[{i}].cpus"),
                "empty list: expected CPU numbers such as [1], or leave the key out".into(),
            ));
        }
        let usable = usable_cpus();
        for (j, cpu) in cpus.iter().enumerate() {
            if *cpu >= usable {
                return Err((
                    format!("listener[{i}].cpus[{j}]"),
                    format!("CPU {cpu} does not exist here: expected 0..={}", usable - 1),
                ));
            }
        }
    }
    if let Some(tls) = &l.tls
        && tls.certs.is_empty()
        && tls.pairs.is_empty()
    {
        return Err((
            format!("listener[{i}].tls.certs"),
            "no certificate: expected at least one PEM file with certificate chain and key, \
             or a [[listener.tls.pair]] with cert and key files"
                .into(),
        ));
    }
    if let Some(c) = &l.compression {
        if l.mode != Mode::Http {
            return Err((
                format!("listener[{i}].compression"),
                "compression needs mode = \"http\" on this listener".into(),
            ));
        }
        if c.algo != "gzip" {
            return Err((
                format!("listener[{i}].compression.algo"),
                format!("unsupported algorithm {:?}: expected \"gzip\"", c.algo),
            ));
        }
        if !(1..=9).contains(&c.level) {
            return Err((
                format!("listener[{i}].compression.level"),
                format!("{} is out of range: expected 1..=9", c.level),
            ));
        }
        if c.types.is_empty() {
            return Err((
                format!("listener[{i}].compression.types"),
                "empty list: expected media types such as \"text/html\"".into(),
            ));
        }
    }
    Ok(())
}

/// Names are used in file paths (pinned maps, sockets) and log lines, so
/// they are limited to a safe character set, and `.`/`..` are refused
/// because they would escape the intended directory.
pub(super) fn check_name(key: &str, name: &str) -> Result<(), (String, String)> {
    let charset_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if charset_ok && (1..=64).contains(&name.len()) && name != "." && name != ".." {
        return Ok(());
    }
    Err((
        key.to_owned(),
        format!(
            "invalid name {name:?}: expected 1 to 64 characters from A-Z a-z 0-9 _ . - \
             (and not \".\" or \"..\")"
        ),
    ))
}

/// Every timeout is finite and greater than zero: nothing waits for ever,
/// and a zero would cut every connection at once.
pub(super) fn positive(
    key: &str,
    value: std::time::Duration,
    example: &str,
) -> Result<(), (String, String)> {
    if value.is_zero() {
        return Err((
            key.to_string(),
            format!("must be greater than zero, e.g. \"{example}\""),
        ));
    }
    Ok(())
}

/// A valid name that no earlier `section` entry uses.
fn unique_name<'a>(
    section: &str,
    i: usize,
    name: &'a str,
    seen: &mut HashMap<&'a str, usize>,
) -> Result<(), (String, String)> {
    let key = format!("{section}[{i}].name");
    check_name(&key, name)?;
    if let Some(first) = seen.insert(name, i) {
        return Err((
            key,
            format!("duplicate {section} name {name:?}: already used by {section}[{first}]"),
        ));
    }
    Ok(())
}
