//! Real network partitions for end-to-end tests: each node in its own Linux network namespace,
//! joined by veth pairs to a bridge that lives in a namespace of its own (so nothing of the
//! host's network or firewall is touched), plus one veth from the test's namespace to that
//! bridge so clients reach every node. A partition is an nftables table inside the victim's
//! namespace that drops packets to and from the chosen peers; healing deletes it. Needs root,
//! `ip` (iproute2) and `nft` (nftables); every namespace is deleted on drop, and namespaces left
//! by a test process that died are removed by the next one.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "meridian-t";
static LABS: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// Whether this machine can run the lab: root, with `ip netns` and `nft`.
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && run(&["ip", "netns", "list"]).is_ok() && run(&["nft", "--version"]).is_ok()
}

/// Deletes namespaces of earlier test processes that are gone (a SIGKILLed test run).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: i32 = rest
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        // SAFETY: kill with signal 0 only checks whether the process exists.
        if pid > 0 && unsafe { libc::kill(pid, 0) } != 0 {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

pub struct Lab {
    /// Namespace names: the switch, then node 1..=n.
    switch: String,
    nodes: Vec<String>,
    subnet: [u8; 3],
    host_if: String,
}

impl Lab {
    /// Creates the switch and `n` node namespaces on a fresh /24 in 10.0.0.0/8.
    pub fn create(n: u64) -> Result<Lab, String> {
        remove_stale();
        let pid = std::process::id();
        let k = LABS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}-{k}");
        // Interface names are at most 15 bytes and must be unique in this namespace for a moment.
        let short = format!("{:05x}", (pid.wrapping_mul(131).wrapping_add(k)) & 0xfffff);
        let subnet = [10, 100 + (pid % 100) as u8, (k % 250) as u8 + 1];
        let mut lab = Lab {
            switch: format!("{PREFIX}{tag}-sw"),
            nodes: Vec::new(),
            subnet,
            host_if: format!("mr{short}h"),
        };
        // Namespaces made so far are deleted by Drop if a later step fails.
        run(&["ip", "netns", "add", &lab.switch])?;
        in_ns(&lab.switch, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(&lab.switch, &["ip", "link", "set", "br0", "up"])?;
        let host_ip = format!("{}/24", lab.ip_of_index(1));
        lab.attach(&lab.host_if.clone(), &format!("mr{short}s"), None, &host_ip)?;
        for id in 1..=n {
            let ns = format!("{PREFIX}{tag}-n{id}");
            run(&["ip", "netns", "add", &ns])?;
            lab.nodes.push(ns.clone());
            in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
            let ip = format!("{}/24", lab.addr(id));
            lab.attach(
                &format!("mr{short}{id}"),
                &format!("mr{short}b{id}"),
                Some(&ns),
                &ip,
            )?;
        }
        Ok(lab)
    }

    /// A veth pair: `inner` gets `ip` (in `ns`, or in this namespace), `outer` joins the bridge.
    fn attach(&self, inner: &str, outer: &str, ns: Option<&str>, ip: &str) -> Result<(), String> {
        run(&[
            "ip", "link", "add", inner, "type", "veth", "peer", "name", outer,
        ])?;
        run(&["ip", "link", "set", outer, "netns", &self.switch])?;
        in_ns(&self.switch, &["ip", "link", "set", outer, "master", "br0"])?;
        in_ns(&self.switch, &["ip", "link", "set", outer, "up"])?;
        match ns {
            Some(ns) => {
                run(&["ip", "link", "set", inner, "netns", ns])?;
                in_ns(ns, &["ip", "addr", "add", ip, "dev", inner])?;
                in_ns(ns, &["ip", "link", "set", inner, "up"])
            }
            None => {
                run(&["ip", "addr", "add", ip, "dev", inner])?;
                run(&["ip", "link", "set", inner, "up"])
            }
        }
    }

    fn ip_of_index(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], i)
    }

    /// Node `id`'s address.
    pub fn addr(&self, id: u64) -> Ipv4Addr {
        self.ip_of_index(10 + id as u8)
    }

    fn ns(&self, id: u64) -> &str {
        &self.nodes[id as usize - 1]
    }

    /// `program` to be run inside node `id`'s namespace.
    pub fn command(&self, id: u64, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(id)]).arg(program);
        c
    }

    /// Drops every packet between node `id` and `peers` (both directions, in `id`'s namespace).
    pub fn cut(&self, id: u64, peers: &[u64]) -> Result<(), String> {
        self.heal(id)?;
        if peers.is_empty() {
            return Ok(());
        }
        let set = peers
            .iter()
            .map(|p| self.addr(*p).to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet meridian_partition {{\n\
             chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n\
             chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n\
             }}\n"
        );
        let path = std::env::temp_dir().join(format!("{}-{id}.nft", self.switch));
        std::fs::write(&path, rules).map_err(|e| e.to_string())?;
        let r = in_ns(
            self.ns(id),
            &["nft", "-f", path.to_str().expect("utf-8 temp path")],
        );
        let _ = std::fs::remove_file(&path);
        r
    }

    /// Removes node `id`'s partition rules, if any.
    pub fn heal(&self, id: u64) -> Result<(), String> {
        let ns = self.ns(id);
        if in_ns(ns, &["nft", "list", "table", "inet", "meridian_partition"]).is_ok() {
            in_ns(
                ns,
                &["nft", "delete", "table", "inet", "meridian_partition"],
            )?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A namespace's deletion takes its interfaces with it, and the host end of the client
        // veth goes with its peer in the switch namespace.
        for ns in self.nodes.iter().chain(std::iter::once(&self.switch)) {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_reach_each_other_until_cut_and_everything_is_removed() {
        if !available() {
            eprintln!("skipped: needs root, ip and nft");
            return;
        }
        let lab = Lab::create(2).unwrap();
        let names = (lab.switch.clone(), lab.nodes.clone());
        // A listener in node 2's namespace, a connect from node 1's.
        let connect = |timeout: &str| {
            let script = format!(
                "import socket,sys; s=socket.socket(); s.settimeout({timeout}); \
                 s.connect(('{}', 9)); sys.exit(0)",
                lab.addr(2)
            );
            let out = Command::new("ip")
                .args(["netns", "exec", lab.ns(1), "python3", "-c", &script])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stderr).to_string()
        };
        // Nothing listens on port 9: reachable means refused, cut means timed out.
        assert!(
            connect("2").contains("refused"),
            "not reachable before the cut"
        );
        lab.cut(1, &[2]).unwrap();
        assert!(
            connect("1").contains("timed out"),
            "still reachable after the cut"
        );
        lab.heal(1).unwrap();
        assert!(
            connect("2").contains("refused"),
            "not reachable after healing"
        );
        drop(lab);
        let list = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        assert!(!list.contains(&names.0), "switch namespace left behind");
        for n in names.1 {
            assert!(!list.contains(&n), "{n} left behind");
        }
    }
}
