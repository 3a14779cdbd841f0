//! A real ZooKeeper server (Debian's `zookeeper`, 3.8 on Java) on a free
//! loopback port with a temporary data directory, killed on drop; and a
//! client of it for the tests to look at and change what squire wrote.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{free_port, DEADLINE};

/// Where Debian's `libzookeeper-java` puts the server; its manifest names
/// the jars it needs. slf4j-simple (from `libslf4j-java`, which it pulls
/// in) sends the server's warnings to its log.
const CLASSPATH: &str = "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar";

pub struct ZooKeeper {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl ZooKeeper {
    pub async fn start() -> ZooKeeper {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut zk = ZooKeeper {
            child: None,
            dir,
            port: free_port(),
        };
        zk.spawn().await.unwrap_or_else(|e| panic!("{e}"));
        zk
    }

    /// `127.0.0.1:port`, as `servers` takes it.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A session of the test's own (10 s timeout), without credentials.
    pub async fn client(&self) -> zookeeper_client::Client {
        zookeeper_client::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .with_fail_eagerly()
            .connect(&self.server())
            .await
            .expect("zookeeper client")
    }

    /// A session with the digest identity `user:password`.
    pub async fn client_as(&self, user: &str, password: &str) -> zookeeper_client::Client {
        zookeeper_client::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .with_fail_eagerly()
            .with_auth("digest", format!("{user}:{password}").as_bytes())
            .connect(&self.server())
            .await
            .expect("zookeeper client")
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // already exited is fine
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and data directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGSTOP: the server holds its connections but answers nothing,
    /// and its clock of sessions stops with it.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`ZooKeeper::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("zookeeper is running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid, which has not been
        // waited for (so not reused).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    fn config(&self) -> PathBuf {
        let path = self.dir.path().join("zoo.cfg");
        // tickTime 200 ms: sessions are expired within 200 ms of their
        // timeout; squire's ttl (at least 2 s) fits between min and max.
        let text = format!(
            "tickTime=200\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\n\
             minSessionTimeout=1000\nmaxSessionTimeout=60000\n\
             admin.enableServer=false\n4lw.commands.whitelist=srvr\n",
            self.dir.path().join("data").display(),
            self.port
        );
        std::fs::write(&path, text).expect("write zoo.cfg");
        path
    }

    async fn spawn(&mut self) -> Result<(), String> {
        if !Path::new("/usr/share/java/zookeeper.jar").exists() {
            return Err(
                "no /usr/share/java/zookeeper.jar: install it with `apt-get install -y zookeeper`"
                    .to_owned(),
            );
        }
        let config = self.config();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("zookeeper log file");
        let child = Command::new("java")
            .args([
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                "-cp",
                CLASSPATH,
                "org.apache.zookeeper.server.ZooKeeperServerMain",
            ])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("cannot start java: install ZooKeeper with `apt-get install -y zookeeper`");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let child = self.child.as_mut().expect("zookeeper was just spawned");
            if let Some(status) = child.try_wait().expect("zookeeper's exit status") {
                return Err(format!(
                    "zookeeper exited ({status}) before serving; the end of its log:\n{}",
                    self.log_tail(20)
                ));
            }
            if self.serves().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "zookeeper did not serve within {DEADLINE:?}; the end of its log:\n{}",
                    self.log_tail(20)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `srvr` answered within half a second by a serving standalone server.
    async fn serves(&self) -> bool {
        let ask = async {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
            stream.write_all(b"srvr").await.ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.ok()?;
            Some(answer.contains("Mode: standalone"))
        };
        tokio::time::timeout(Duration::from_millis(500), ask)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("zookeeper.log")
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        self.kill();
    }
}
