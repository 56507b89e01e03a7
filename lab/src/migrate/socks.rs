//! What the namespace's socket table and TCP counters say about a case's
//! connections while they wait: half-open requests (`NEW_SYN_RECV`, listed
//! as `SYN_RECV`) held before the handover, and counters that
//! `kernel::COUNTERS` does not carry (Fast Open). Read from
//! `/proc/thread-self/net`, the namespace of the thread that entered the
//! sandbox.

use std::{fs, net::Ipv4Addr};

/// `st` of /proc/net/tcp for a request socket (the kernel prints
/// `NEW_SYN_RECV` requests as `TCP_SYN_RECV`).
const SYN_RECV: u8 = 0x03;

/// One line of /proc/net/tcp: who, in which state.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub local: (Ipv4Addr, u16),
    pub remote: (Ipv4Addr, u16),
    pub state: u8,
}

/// `0100007F:1F90` → 127.0.0.1:8080. The address is the raw 32-bit value
/// of a network-order field printed in host order, so its native bytes are
/// the address bytes.
fn addr(field: &str) -> Option<(Ipv4Addr, u16)> {
    let (ip, port) = field.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some((Ipv4Addr::from(ip.to_ne_bytes()), port))
}

/// The entries of a /proc/net/tcp text (the header line skipped).
fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            Some(Entry {
                local: addr(cols.get(1)?)?,
                remote: addr(cols.get(2)?)?,
                state: u8::from_str_radix(cols.get(3)?, 16).ok()?,
            })
        })
        .collect()
}

/// Requests from `client` to local `port` that wait for their final ACK
/// (or a TCP Fast Open child that does).
pub fn half_open(client: Ipv4Addr, port: u16) -> usize {
    let text = fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
    count_half_open(&parse(&text), client, port)
}

fn count_half_open(entries: &[Entry], client: Ipv4Addr, port: u16) -> usize {
    entries
        .iter()
        .filter(|e| e.state == SYN_RECV && e.local.1 == port && e.remote.0 == client)
        .count()
}

/// `TcpExt: <name>` of the namespace (0 when the kernel has no such
/// counter).
pub fn tcp_ext(name: &str) -> u64 {
    let text = fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
    netstat_field(&text, "TcpExt", name).unwrap_or(0)
}

/// A value of /proc/net/netstat: lines come in pairs, `Table: names...`
/// then `Table: values...`.
fn netstat_field(text: &str, table: &str, name: &str) -> Option<u64> {
    let prefix = format!("{table}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (rows.next(), rows.next()) {
        let at = names.split_whitespace().skip(1).position(|n| n == name);
        if let Some(at) = at {
            return values.split_whitespace().nth(at + 1)?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00001000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0200007F:9C41 03 00000000:00000000 02:00000064 00000000     0        0 0 1 0\n\
   2: 0100007F:1F90 0200007F:9C42 03 00000000:00000000 02:00000064 00000000     0        0 0 1 0\n\
   3: 0100007F:1F90 0100007F:9C43 03 00000000:00000000 02:00000064 00000000     0        0 0 1 0\n\
   4: 0100007F:1F91 0200007F:9C44 03 00000000:00000000 02:00000064 00000000     0        0 0 1 0\n\
   5: 0100007F:1F90 0200007F:9C45 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0\n";

    #[test]
    fn socket_table_parses_and_counts_requests_of_one_client() {
        let entries = parse(TABLE);
        assert_eq!(entries.len(), 6);
        assert_eq!(entries[0].local, (Ipv4Addr::LOCALHOST, 8080));
        assert_eq!(entries[0].state, 0x0A);
        assert_eq!(entries[1].remote, (Ipv4Addr::new(127, 0, 0, 2), 0x9C41));
        // Two requests from 127.0.0.2 to 8080; not the one from 127.0.0.1,
        // not the one to 8081, not the established one.
        assert_eq!(
            count_half_open(&entries, Ipv4Addr::new(127, 0, 0, 2), 8080),
            2
        );
    }

    #[test]
    fn netstat_values_are_found_by_table_and_name() {
        let text = "TcpExt: SyncookiesSent TCPFastOpenPassive TCPMigrateReqSuccess\n\
                    TcpExt: 0 7 3\n\
                    IpExt: InNoRoutes TCPFastOpenPassive\n\
                    IpExt: 1 99\n";
        assert_eq!(netstat_field(text, "TcpExt", "TCPFastOpenPassive"), Some(7));
        assert_eq!(
            netstat_field(text, "TcpExt", "TCPMigrateReqSuccess"),
            Some(3)
        );
        assert_eq!(netstat_field(text, "IpExt", "TCPFastOpenPassive"), Some(99));
        assert_eq!(netstat_field(text, "TcpExt", "Nope"), None);
    }
}
