//! Holding back the final ACK of the handshake, as the selftest does with
//! an XDP program on `lo`: an nftables rule in the sandbox's namespace
//! drops every packet from the case's client address to the proxy's port
//! that has ACK set and SYN clear. The requests then stay half-open
//! (`NEW_SYN_RECV`, or a Fast Open child in `SYN_RECV`) on the listener
//! their SYN reached, until the rule goes.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use proxy_harness::process::run_bounded;

/// The table the rule lives in (the namespace is the sandbox's own).
const TABLE: &str = "proxy_lab_hold";

/// How long one `nft` run may take.
const NFT_TIMEOUT: Duration = Duration::from_secs(5);

/// The ruleset: ACK without SYN, from `client` to `port`, counted and
/// dropped on input.
fn ruleset(client: Ipv4Addr, port: u16) -> String {
    format!(
        "table ip {TABLE} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tip saddr {client} tcp dport {port} tcp flags & (syn | ack) == ack counter drop\n\
         \t}}\n\
         }}\n"
    )
}

/// `counter packets N` of `nft list table` output.
fn counted(listing: &str) -> Option<u64> {
    let rest = &listing[listing.find("counter packets ")? + "counter packets ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// nft(8), found where Debian puts it.
fn nft() -> Result<PathBuf> {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("nft not found: the final-ACK hold needs the nftables package")
}

fn run_nft(args: &[&str]) -> Result<String> {
    let out = run_bounded(Command::new(nft()?).args(args), NFT_TIMEOUT);
    if !out.status.success() {
        bail!(
            "nft {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An installed hold; released on drop if not before.
pub struct AckHold {
    installed: bool,
}

impl AckHold {
    /// Installs the rule (its file goes into `dir`, the sandbox's folder).
    pub fn install(dir: &Path, client: Ipv4Addr, port: u16) -> Result<AckHold> {
        let file = dir.join("hold-ack.nft");
        std::fs::write(&file, ruleset(client, port))
            .with_context(|| format!("writing {}", file.display()))?;
        run_nft(&["-f", &file.to_string_lossy()])?;
        Ok(AckHold { installed: true })
    }

    /// Packets dropped so far (None once released or unreadable).
    pub fn held(&self) -> Option<u64> {
        if !self.installed {
            return None;
        }
        counted(&run_nft(&["list", "table", "ip", TABLE]).ok()?)
    }

    /// Lets ACKs through again.
    pub fn release(&mut self) -> Result<()> {
        if self.installed {
            run_nft(&["delete", "table", "ip", TABLE])?;
            self.installed = false;
        }
        Ok(())
    }
}

impl Drop for AckHold {
    fn drop(&mut self) {
        // The namespace dies with the sandbox anyway; this keeps a failed
        // case from holding ACKs while it is torn down.
        let _ = self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_drops_acks_without_syn_from_the_client_to_the_port() {
        let r = ruleset(Ipv4Addr::new(127, 0, 0, 2), 8080);
        assert!(r.contains("type filter hook input"), "{r}");
        assert!(
            r.contains(
                "ip saddr 127.0.0.2 tcp dport 8080 tcp flags & (syn | ack) == ack counter drop"
            ),
            "{r}"
        );
        assert_eq!(r.matches('{').count(), r.matches('}').count(), "{r}");
    }

    #[test]
    fn the_counter_is_read_from_the_listing() {
        let listing = "table ip proxy_lab_hold {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\
                       \t\tip saddr 127.0.0.2 tcp dport 8080 tcp flags ack / syn,ack counter packets 12 bytes 624 drop\n\t}\n}\n";
        assert_eq!(counted(listing), Some(12));
        assert_eq!(counted("table ip x {}"), None);
    }
}
