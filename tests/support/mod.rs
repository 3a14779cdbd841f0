//! Shared helpers for the integration tests: a real etcd (and, in
//! `zookeeper`, a real ZooKeeper) on free loopback ports, tiny real
//! backends, an in-process agent, and waiting on conditions with a deadline
//! instead of sleeping.

#![allow(dead_code)] // each test binary uses a different subset

pub mod certs;
pub mod cluster;
pub mod config;
pub mod consul;
pub mod eureka;
pub mod load;
pub mod nacos;
pub mod process;
pub mod zookeeper;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `condition` until it holds, failing the test after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free loopback port: bound, read, released. Never one this process was
/// handed before: the kernel may give a just-released port out again, and a
/// test asking for an admin, a service and a listen port in a row would then
/// get a config with two listeners on one address.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// An etcd member `name` with its data in `data`, serving clients and peers
/// on loopback `client_port` and `peer_port`, logging warnings to stderr
/// (the caller sets where), stdout discarded. The caller adds the cluster.
pub fn etcd_command(name: &str, data: &Path, client_port: u16, peer_port: u16) -> Command {
    etcd_command_scheme(name, data, client_port, peer_port, "http")
}

/// [`etcd_command`] with the client URL's `scheme` (`https`: the caller
/// adds the certificate flags).
pub fn etcd_command_scheme(
    name: &str,
    data: &Path,
    client_port: u16,
    peer_port: u16,
    scheme: &str,
) -> Command {
    let client = format!("{scheme}://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut command = Command::new("etcd");
    command
        .args(["--name", name, "--data-dir"])
        .arg(data)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--logger", "zap", "--log-level", "warn"])
        .stdout(Stdio::null());
    command
}

/// A real etcd server (Debian's `etcd-server`) on free loopback ports with a
/// temporary data directory, killed on drop.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<EtcdTls>,
}

/// An etcd serving clients over TLS only and requiring a client
/// certificate signed by `ca` (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    /// etcd's own certificate, for 127.0.0.1.
    pub server: certs::Pair,
    /// A client certificate `ca` signed, for the test's own client.
    pub client: certs::Pair,
}

impl Etcd {
    pub async fn start() -> Etcd {
        Etcd::try_start_on(free_port())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts etcd with its client URL on `client_port`; an etcd that exits
    /// before it serves is an error at once, with its status and the end of
    /// its log.
    pub async fn try_start_on(client_port: u16) -> Result<Etcd, String> {
        Etcd::try_start_with(client_port, None).await
    }

    /// An etcd that serves clients over TLS with `tls`'s certificates.
    pub async fn start_tls(tls: EtcdTls) -> Etcd {
        Etcd::try_start_with(free_port(), Some(tls))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn try_start_with(client_port: u16, tls: Option<EtcdTls>) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut etcd = Etcd {
            child: None,
            dir,
            client_port,
            peer_port: free_port(),
            tls,
        };
        etcd.spawn().await?;
        Ok(etcd)
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Connect options with `timeout`, and the TLS client settings of a
    /// TLS etcd.
    fn options(&self, timeout: Duration) -> etcd_client::ConnectOptions {
        let options = etcd_client::ConnectOptions::new().with_timeout(timeout);
        match &self.tls {
            None => options,
            Some(tls) => {
                let read = |p: &Path| std::fs::read(p).expect("read a test certificate");
                options.with_tls(
                    etcd_client::TlsOptions::new()
                        .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
                        .identity(etcd_client::Identity::from_pem(
                            read(&tls.client.cert),
                            read(&tls.client.key),
                        )),
                )
            }
        }
    }

    pub async fn client(&self) -> etcd_client::Client {
        let options = self.options(Duration::from_secs(5));
        etcd_client::Client::connect([self.endpoint()], Some(options))
            .await
            .expect("etcd client")
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // already exited is fine
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports and data directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await.unwrap_or_else(|e| panic!("{e}"));
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log file");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut command =
            etcd_command_scheme("test", &data, self.client_port, self.peer_port, scheme);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server.cert)
                .arg("--key-file")
                .arg(&tls.server.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--initial-cluster", &format!("test={peer}")])
            .stderr(log)
            .spawn()
            .expect("cannot start etcd: install it with `apt-get install -y etcd-server`");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let child = self.child.as_mut().expect("etcd was just spawned");
            if let Some(status) = child.try_wait().expect("etcd's exit status") {
                return Err(format!(
                    "etcd exited ({status}) before serving; the end of its log:\n{}",
                    self.log_tail(20)
                ));
            }
            if self.serves().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd did not serve within {DEADLINE:?}; the end of its log:\n{}",
                    self.log_tail(20)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One `get` answered within half a second.
    async fn serves(&self) -> bool {
        let options = self.options(Duration::from_millis(500));
        match etcd_client::Client::connect([self.endpoint()], Some(options)).await {
            Ok(mut c) => c.get("probe", None).await.is_ok(),
            Err(_) => false,
        }
    }

    /// The last `lines` lines of `etcd.log`.
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP backend: greets each connection with `{name}\n`, echoes what it
/// receives, and after the client's EOF says `bye {bytes}\n` and closes. The
/// last line proves a half-close crossed the proxy both ways.
pub struct Backend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_on(name, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// [`Backend::start`] on `addr` (another loopback address, a chosen
    /// port).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let greeting = format!("{name}\n");
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    stream.write_all(greeting.as_bytes()).await?;
                    let mut total = 0;
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = stream.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        total += n;
                        stream.write_all(&buf[..n]).await?;
                    }
                    stream
                        .write_all(format!("bye {total}\n").as_bytes())
                        .await?;
                    stream.shutdown().await
                });
            }
        });
        Backend {
            addr,
            connections,
            task,
        }
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Announces an instance in the embedded registry under `dir` the way
/// another squire would: a record file with a lease that outlives the test.
pub fn announce_local(dir: &std::path::Path, service: &str, id: &str, addr: SocketAddr) {
    announce_local_at(dir, service, id, &addr.ip().to_string(), addr.port());
}

/// [`announce_local`] with any `host` (a name, or an address no squire
/// would announce).
pub fn announce_local_at(dir: &std::path::Path, service: &str, id: &str, host: &str, port: u16) {
    let service_dir = dir.join(service);
    std::fs::create_dir_all(&service_dir).expect("mkdir");
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        + 600_000;
    let record = format!(
        r#"{{"expires_at_ms":{expires},"instance":{{"name":"{service}","id":"{id}","host":{},"port":{port}}}}}"#,
        serde_json::Value::from(host)
    );
    std::fs::write(service_dir.join(format!("{id}.json")), record).expect("write record");
}

/// One client session through a proxy: reads the greeting, echoes `payload`,
/// half-closes, and returns (greeting, echoed, farewell).
pub async fn session(
    addr: SocketAddr,
    payload: &[u8],
) -> std::io::Result<(String, Vec<u8>, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let greeting = read_line(&mut stream).await?;
    stream.write_all(payload).await?;
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).await?;
    stream.shutdown().await?;
    let mut rest = String::new();
    stream.read_to_string(&mut rest).await?;
    Ok((greeting, echoed, rest))
}

/// Reads the backend's greeting line; empty if the proxy closed the
/// connection without reaching a backend.
pub async fn greeting(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    read_line(&mut stream).await
}

async fn read_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await? == 1 {
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// A whole agent running in this process.
pub struct TestAgent {
    pub admin: SocketAddr,
    /// What the admin API's mutating endpoints require.
    pub token: squire::config::Secret,
    pub listens: Vec<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// The agent's own `state_dir` unless the test chose one: agents never
    /// share last known endpoints by accident.
    _state: tempfile::TempDir,
}

impl TestAgent {
    pub async fn start(toml: &config::AgentToml) -> TestAgent {
        let state = tempfile::tempdir().expect("state dir");
        let toml = toml
            .clone()
            .agent_default("state_dir", state.path().display().to_string())
            .to_string();
        let config =
            squire::Config::from_toml(&toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        let agent = squire::Agent::bind(config).await.expect("agent binds");
        let admin = agent.admin_addr();
        let token = agent.admin_token();
        let listens = agent.listen_addrs();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await; // a dropped sender also means stop
        }));
        TestAgent {
            admin,
            token,
            listens,
            stop: Some(stop),
            task,
            _state: state,
        }
    }

    pub fn listen(&self) -> SocketAddr {
        self.listens[0]
    }

    /// Triggers shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits until the agent has returned.
    pub async fn stop(mut self) {
        self.begin_stop();
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("agent stops within the deadline")
            .expect("agent task did not panic");
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    pub async fn json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("admin answers JSON")
    }

    /// The value of one metric line whose name and labels start with `prefix`.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Ids of the endpoints the first upstream would route to now.
    pub async fn routable(&self) -> Vec<String> {
        let services = self.json("/v1/services").await;
        services["upstreams"][0]["endpoints"]
            .as_array()
            .map(|eps| {
                eps.iter()
                    .filter_map(|e| e["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The value of the first line of `admin`'s /metrics that starts with
/// `prefix` (a family name, with as many of its labels as pin one series).
pub async fn metric(admin: SocketAddr, prefix: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics").await;
    body.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A minimal HTTP/1.1 GET: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// A minimal HTTP/1.1 request with an empty body: status code and body.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let answer = http_call(addr, method, path, &[]).await;
    (answer.status, answer.body)
}

/// What [`http_call`] got back.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    /// The status line and headers, as sent.
    pub head: String,
    pub body: String,
}

/// `method path` over HTTP/1.1 with an empty body and `headers`.
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpAnswer {
    let mut stream = TcpStream::connect(addr).await.expect("connect to admin");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {response}"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_owned(), b.to_owned()))
        .unwrap_or_default();
    HttpAnswer { status, head, body }
}

/// `method path` with `Authorization: Bearer {token}`: status and body.
pub async fn http_with_token(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, String) {
    let bearer = format!("Bearer {token}");
    let answer = http_call(addr, method, path, &[("Authorization", &bearer)]).await;
    (answer.status, answer.body)
}

/// An HTTP/1.1 backend (hyper) whose `/health` answers with a status that a
/// test can switch; every other path answers 200 `{name}`. It keeps the
/// headers of the last `/health` request.
pub struct HttpBackend {
    pub addr: SocketAddr,
    pub health: Arc<std::sync::atomic::AtomicU16>,
    pub last_health_headers: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    task: JoinHandle<()>,
}

impl HttpBackend {
    pub async fn start(name: &str) -> HttpBackend {
        use hyper::service::service_fn;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind http backend");
        let addr = listener.local_addr().expect("addr");
        let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let last_health_headers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, l) = (health.clone(), last_health_headers.clone());
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, l, name) = (h.clone(), l.clone(), name.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let (h, l, name) = (h.clone(), l.clone(), name.clone());
                            async move {
                                let (status, body) = if request.uri().path() == "/health" {
                                    *l.lock().expect("headers lock") = request
                                        .headers()
                                        .iter()
                                        .map(|(k, v)| {
                                            (k.to_string(), v.to_str().unwrap_or("").to_owned())
                                        })
                                        .collect();
                                    let status = h.load(Ordering::SeqCst);
                                    (status, format!("health {status}"))
                                } else {
                                    (200, name)
                                };
                                let mut response = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from(body),
                                ));
                                *response.status_mut() =
                                    hyper::StatusCode::from_u16(status).expect("status");
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HttpBackend {
            addr,
            health,
            last_health_headers,
            task,
        }
    }

    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `GET {path}` on an open HTTP/1.1 keep-alive connection and reads one
/// response (Content-Length bodies only): returns the body.
pub async fn http_exchange(stream: &mut TcpStream, path: &str) -> std::io::Result<String> {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: backend\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}
