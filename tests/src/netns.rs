//! A private network for a test cluster: one Linux network namespace per node, joined by veth
//! pairs to a bridge in a hub namespace, cut with iptables.
//!
//! ```text
//!   ns <tag>-n1 (10.77.64.11) ─veth─┐
//!   ns <tag>-n2 (10.77.64.12) ─veth─┼─ br0 in ns <tag>-hub (10.77.64.1: the test's clients)
//!   ns <tag>-n3 (10.77.64.13) ─veth─┘
//! ```
//!
//! Every address lives inside namespaces this module creates, so nothing touches the host's
//! interfaces and two tests (or two sessions) never collide. Needs root.
//!
//! - Nodes start inside their namespace through [`Net::command`] (`setns(2)` in the child
//!   before `exec`, the same thing `ip netns exec` does, minus its extra mount namespace, so
//!   a tmpfs mounted by the test is visible to the node).
//! - The test's own HTTP clients run in the hub: [`Net::enter_hub`] moves the *calling
//!   thread* there (network namespaces are per thread); threads it spawns start there too.
//! - Faults: [`Net::partition`] installs `DROP` rules between groups of hosts (both
//!   directions, in each host's `CAIRN_PART` chain); [`Net::set_loss`] drops a share of
//!   packets between hosts with the `statistic` match (`CAIRN_LOSS` chain; traffic from the
//!   hub's clients is exempt, so client histories stay informative). [`Net::heal`] flushes
//!   both.
//! - Dropping the [`Net`] deletes the namespaces, which removes their veths and rules.
//!   Namespaces left by a test process that was itself killed are removed by the next
//!   [`Net::new`].

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The /24 every private network uses (inside its own namespaces only).
const SUBNET: [u8; 3] = [10, 77, 64];
/// Name prefix of every namespace this module creates.
const PREFIX: &str = "cairnf";

/// One namespace with an address on the private network.
pub struct Host {
    pub id: u64,
    pub ns: String,
    pub ip: Ipv4Addr,
    fd: File,
}

/// The private network. See the module docs.
pub struct Net {
    tag: String,
    hub: String,
    hub_fd: File,
    hosts: Vec<Host>,
}

/// Returned by [`Net::enter_hub`]: puts the thread back into its old namespace on drop.
pub struct NsGuard {
    old: File,
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        // Best effort: the thread usually ends right after.
        let _ = setns(&self.old);
    }
}

fn setns(f: &File) -> io::Result<()> {
    // SAFETY: setns(2) on a namespace fd we hold open; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn ip(args: &[&str]) -> io::Result<()> {
    run(Command::new("ip").args(args))
}

fn ns_fd(ns: &str) -> io::Result<File> {
    File::open(Path::new("/run/netns").join(ns))
}

/// True when this process may create namespaces and iptables rules (root with `ip` and
/// `iptables` on PATH). Tests that need it skip with a message otherwise.
pub fn available() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("iptables")
            .arg("-V")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Deletes namespaces named `cairnf<pid>-...` whose creating process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Net {
    /// Creates the hub namespace with its bridge and the clients' address.
    pub fn new() -> io::Result<Net> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let tag = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{tag}-hub");
        ip(&["netns", "add", &hub])?;
        let hub_fd = ns_fd(&hub)?;
        let net = Net {
            tag,
            hub,
            hub_fd,
            hosts: Vec::new(),
        };
        let h = net.hub.as_str();
        ip(&["-n", h, "link", "set", "lo", "up"])?;
        ip(&["-n", h, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("{}/24", net.client_ip()),
            "dev",
            "br0",
        ])?;
        ip(&["-n", h, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// The hub's address: where the test's clients come from.
    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 1)
    }

    /// The address host `id` gets (`id` in 1..=200).
    pub fn ip_of(id: u64) -> Ipv4Addr {
        assert!((1..=200).contains(&id), "host id {id} out of range");
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 10 + id as u8)
    }

    /// Creates namespace `<tag>-n<id>` with `eth0` on the bridge and the iptables chains.
    pub fn add_host(&mut self, id: u64) -> io::Result<&Host> {
        let ns = format!("{}-n{id}", self.tag);
        let addr = Self::ip_of(id);
        ip(&["netns", "add", &ns])?;
        let fd = ns_fd(&ns)?;
        let peer = format!("v{id}");
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer, "netns",
            &self.hub,
        ])?;
        ip(&["-n", &self.hub, "link", "set", &peer, "master", "br0"])?;
        ip(&["-n", &self.hub, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        let host = Host {
            id,
            ns,
            ip: addr,
            fd,
        };
        for chain in ["CAIRN_PART", "CAIRN_LOSS"] {
            iptables(&host.ns, &["-N", chain])?;
        }
        iptables(&host.ns, &["-A", "INPUT", "-j", "CAIRN_PART"])?;
        iptables(&host.ns, &["-A", "OUTPUT", "-j", "CAIRN_PART"])?;
        iptables(&host.ns, &["-A", "INPUT", "-j", "CAIRN_LOSS"])?;
        self.hosts.push(host);
        Ok(self.hosts.last().expect("just pushed"))
    }

    pub fn host(&self, id: u64) -> Option<&Host> {
        self.hosts.iter().find(|h| h.id == id)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// A command that runs `program` inside host `id`'s namespace.
    pub fn command(&self, id: u64, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let host = self.host(id).expect("unknown host");
        let mut cmd = Command::new(program);
        in_namespace(&mut cmd, &host.fd).expect("dup namespace fd");
        cmd
    }

    /// Makes `cmd` start inside host `id`'s namespace.
    pub fn enter(&self, id: u64, cmd: &mut Command) -> io::Result<()> {
        let host = self
            .host(id)
            .ok_or_else(|| io::Error::other(format!("no host {id}")))?;
        in_namespace(cmd, &host.fd)
    }

    /// Moves the calling thread into the hub namespace until the guard drops.
    pub fn enter_hub(&self) -> io::Result<NsGuard> {
        let old = File::open("/proc/thread-self/ns/net")?;
        setns(&self.hub_fd)?;
        Ok(NsGuard { old })
    }

    /// Cuts every pair of hosts that sit in different `groups` (host ids); hosts in no group
    /// keep talking to everyone. Replaces any earlier partition.
    pub fn partition(&self, groups: &[Vec<u64>]) -> io::Result<()> {
        self.heal_partition()?;
        let group_of = |id: u64| groups.iter().position(|g| g.contains(&id));
        for a in &self.hosts {
            for b in &self.hosts {
                let (Some(ga), Some(gb)) = (group_of(a.id), group_of(b.id)) else {
                    continue;
                };
                if ga != gb {
                    let peer = b.ip.to_string();
                    iptables(&a.ns, &["-A", "CAIRN_PART", "-s", &peer, "-j", "DROP"])?;
                    iptables(&a.ns, &["-A", "CAIRN_PART", "-d", &peer, "-j", "DROP"])?;
                }
            }
        }
        Ok(())
    }

    /// Drops `percent`% of the packets each host receives from other hosts.
    pub fn set_loss(&self, percent: u8) -> io::Result<()> {
        self.clear_loss()?;
        let p = format!("{:.4}", f64::from(percent) / 100.0);
        let client = self.client_ip().to_string();
        for h in &self.hosts {
            iptables(&h.ns, &["-A", "CAIRN_LOSS", "-s", &client, "-j", "RETURN"])?;
            iptables(
                &h.ns,
                &[
                    "-A",
                    "CAIRN_LOSS",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            )?;
        }
        Ok(())
    }

    pub fn heal_partition(&self) -> io::Result<()> {
        for h in &self.hosts {
            iptables(&h.ns, &["-F", "CAIRN_PART"])?;
        }
        Ok(())
    }

    pub fn clear_loss(&self) -> io::Result<()> {
        for h in &self.hosts {
            iptables(&h.ns, &["-F", "CAIRN_LOSS"])?;
        }
        Ok(())
    }

    /// Removes every partition and loss rule.
    pub fn heal(&self) -> io::Result<()> {
        self.heal_partition()?;
        self.clear_loss()
    }

    /// The rules currently installed in host `id` (`iptables -S`), for failure reports.
    pub fn rules(&self, id: u64) -> String {
        let Some(h) = self.host(id) else {
            return String::new();
        };
        Command::new("ip")
            .args(["netns", "exec", &h.ns, "iptables", "-w", "-S"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// Makes `cmd` enter the namespace behind `fd` in the child, before `exec`.
pub fn in_namespace(cmd: &mut Command, fd: &File) -> io::Result<()> {
    let fd = fd.try_clone()?;
    // SAFETY: the closure runs between fork and exec and only calls setns(2), which is
    // async-signal-safe; `fd` is moved in and stays open until then.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn iptables(ns: &str, args: &[&str]) -> io::Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-w"])
        .args(args))
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.hub]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// Starts a one-shot echo in host `id` (a real process: `sh` reading from a socket is
    /// not available, so we use this test binary's own thread in that namespace).
    fn listen_in(net: &Net, id: u64) -> std::thread::JoinHandle<()> {
        let fd = net.host(id).unwrap().fd.try_clone().unwrap();
        let addr = Net::ip_of(id);
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            setns(&fd).unwrap();
            let l = TcpListener::bind((addr, 7000)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let mut b = [0u8; 4];
                        if s.read_exact(&mut b).is_ok() {
                            let _ = s.write_all(&b);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        rx.recv().unwrap();
        h
    }

    /// From host `from`'s namespace, connects to host `to` and echoes 4 bytes.
    fn reaches(net: &Net, from: Option<u64>, to: u64) -> bool {
        let fd = match from {
            Some(id) => net.host(id).unwrap().fd.try_clone().unwrap(),
            None => net.hub_fd.try_clone().unwrap(),
        };
        std::thread::spawn(move || {
            setns(&fd).unwrap();
            let addr = (Net::ip_of(to), 7000).into();
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(700)) else {
                return false;
            };
            s.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
            let mut b = [0u8; 4];
            s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
        })
        .join()
        .unwrap()
    }

    #[test]
    fn test_partition_and_heal() {
        if !available() {
            eprintln!("skipped: needs root, ip and iptables");
            return;
        }
        let mut net = Net::new().unwrap();
        for id in 1..=3 {
            net.add_host(id).unwrap();
        }
        let _l = listen_in(&net, 1);
        assert!(reaches(&net, None, 1), "hub cannot reach host 1");
        assert!(reaches(&net, Some(2), 1), "host 2 cannot reach host 1");
        net.partition(&[vec![1], vec![2, 3]]).unwrap();
        assert!(!reaches(&net, Some(2), 1), "partition did not cut 2 from 1");
        assert!(reaches(&net, None, 1), "the partition cut the clients off");
        assert!(net.rules(1).contains("DROP"));
        net.heal().unwrap();
        assert!(reaches(&net, Some(3), 1), "heal did not restore 3 -> 1");
    }

    #[test]
    fn test_total_loss_cuts_and_clients_are_exempt() {
        if !available() {
            eprintln!("skipped: needs root, ip and iptables");
            return;
        }
        let mut net = Net::new().unwrap();
        for id in 1..=2 {
            net.add_host(id).unwrap();
        }
        let _l = listen_in(&net, 1);
        net.set_loss(100).unwrap();
        assert!(!reaches(&net, Some(2), 1), "100% loss still delivered");
        assert!(reaches(&net, None, 1), "loss applied to client traffic");
        assert!(net.rules(1).contains("statistic"));
        net.clear_loss().unwrap();
        assert!(reaches(&net, Some(2), 1));
    }

    #[test]
    fn test_namespaces_removed_on_drop() {
        if !available() {
            eprintln!("skipped: needs root, ip and iptables");
            return;
        }
        let mut net = Net::new().unwrap();
        net.add_host(1).unwrap();
        let names = [net.hub.clone(), net.host(1).unwrap().ns.clone()];
        drop(net);
        for n in names {
            assert!(
                !Path::new("/run/netns").join(&n).exists(),
                "{n} left behind"
            );
        }
    }

    #[test]
    fn test_command_runs_inside_the_namespace() {
        if !available() {
            eprintln!("skipped: needs root, ip and iptables");
            return;
        }
        let mut net = Net::new().unwrap();
        net.add_host(4).unwrap();
        let out = net.command(4, "ip").args(["-br", "addr"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("10.77.64.14"), "not inside host 4: {text}");
    }
}
