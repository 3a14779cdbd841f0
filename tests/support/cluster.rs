//! A real three-member etcd cluster on free loopback ports, each member with
//! its own temporary data directory, for fault tests: any member can be
//! killed, restarted, frozen (SIGSTOP: the process keeps its sockets, so
//! clients see silence, not a refused connection) and thawed. Every member
//! is thawed and killed on drop.

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use tokio::time::Instant;

use super::{free_port, DEADLINE};

pub const MEMBERS: usize = 3;

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    frozen: bool,
}

pub struct Cluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial: String,
}

impl Cluster {
    /// Starts three members and waits until each serves a linearizable read.
    pub async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let members: Vec<Member> = (0..MEMBERS)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
                frozen: false,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            dir,
            members,
            initial,
        };
        for i in 0..MEMBERS {
            cluster.spawn(i);
        }
        for i in 0..MEMBERS {
            cluster.wait_serving(i).await;
        }
        cluster
    }

    /// `http://127.0.0.1:port` of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..MEMBERS).map(|i| self.endpoint(i)).collect()
    }

    /// A client of member `i` alone, with a short call timeout.
    pub async fn client(&self, i: usize) -> etcd_client::Client {
        let options = etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_secs(2))
            .with_require_leader(true);
        etcd_client::Client::connect([self.endpoint(i)], Some(options))
            .await
            .expect("etcd client")
    }

    /// Whether member `i` answers a linearizable read within 500 ms (so it
    /// is up and part of a quorum with a leader).
    pub async fn serves(&self, i: usize) -> bool {
        let options = etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_millis(500))
            .with_require_leader(true);
        let Ok(mut c) = etcd_client::Client::connect([self.endpoint(i)], Some(options)).await
        else {
            return false;
        };
        tokio::time::timeout(Duration::from_millis(500), c.get("probe", None))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until member `i` serves, failing the test after the deadline.
    pub async fn wait_serving(&self, i: usize) {
        let deadline = Instant::now() + DEADLINE;
        while !self.serves(i).await {
            assert!(
                Instant::now() < deadline,
                "etcd member {i} did not serve within {DEADLINE:?}; the end of its log:\n{}",
                self.log_tail(i, 20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The index of the current leader, as the members that answer say.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..MEMBERS {
            if self.members[i].child.is_none() || self.members[i].frozen {
                continue;
            }
            let mut client = self.client(i).await;
            let Ok(Ok(status)) =
                tokio::time::timeout(Duration::from_secs(1), client.status()).await
            else {
                continue;
            };
            let leader = status.leader();
            for j in 0..MEMBERS {
                if self.member_id(j).await == Some(leader) {
                    return Some(j);
                }
            }
        }
        None
    }

    /// Waits for a leader, failing the test after the deadline.
    pub async fn wait_leader(&self) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(leader) = self.leader().await {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn member_id(&self, i: usize) -> Option<u64> {
        if self.members[i].child.is_none() || self.members[i].frozen {
            return None;
        }
        let mut client = self.client(i).await;
        let status = tokio::time::timeout(Duration::from_secs(1), client.status())
            .await
            .ok()?
            .ok()?;
        status.header().map(|h| h.member_id())
    }

    /// SIGSTOP: the member stops answering but keeps its connections.
    pub fn freeze(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
        self.members[i].frozen = true;
    }

    /// SIGCONT.
    pub fn thaw(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
        self.members[i].frozen = false;
    }

    /// SIGKILL, as a crash would (a frozen member is thawed first so it dies).
    pub fn kill(&mut self, i: usize) {
        if self.members[i].frozen {
            self.thaw(i);
        }
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill(); // already exited is fine
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its ports and data directory, without
    /// waiting for it to serve.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        let child = self.members[i].child.as_ref().expect("member is running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    fn spawn(&mut self, i: usize) {
        let member = &self.members[i];
        let data = self.dir.path().join(&member.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .expect("etcd log file");
        let child = super::etcd_command(&member.name, &data, member.client_port, member.peer_port)
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--initial-cluster-token",
                &format!("squire-{}", self.initial.len()),
            ])
            .stderr(log)
            .spawn()
            .expect("cannot start etcd: install it with `apt-get install -y etcd-server`");
        self.members[i].child = Some(child);
        self.members[i].frozen = false;
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    /// The last `lines` lines of member `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log(i)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..MEMBERS {
            self.kill(i);
        }
    }
}
