//! A real Nacos server for the tests: r-nacos (`cargo install rnacos
//! --locked`, see the README's test command) on free loopback ports with a
//! temporary data directory, killed on drop, and a small Open API client
//! to read back what squire wrote and to write what other registrants
//! would.
//!
//! The server runs with short naming timeouts (an instance without a beat
//! is unhealthy [`HEALTH_TIMEOUT`] and removed [`INSTANCE_TIMEOUT`] after
//! its last beat; r-nacos adds 3 s to each), its console off, its
//! HTTP and gRPC ports on 127.0.0.1, and its working directory in the
//! temporary directory (so no `.env` of the checkout is read).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::time::Instant;

use super::{free_port, DEADLINE};

/// `RNACOS_NAMING_HEALTH_TIMEOUT_SECOND`: r-nacos marks an instance
/// unhealthy this long (plus 3 s) after its last beat.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// `RNACOS_NAMING_INSTANCE_TIMEOUT_SECOND`: and removes it this long (plus
/// 3 s) after its last beat.
pub const INSTANCE_TIMEOUT: Duration = Duration::from_secs(4);

pub struct Nacos {
    child: Option<Child>,
    dir: tempfile::TempDir,
    http_port: u16,
    grpc_port: u16,
    /// Open API auth on, with this admin.
    auth: Option<(String, String)>,
}

/// The r-nacos binary: `$RNACOS_BIN`, else `rnacos` on `PATH`, else
/// `~/.cargo/bin/rnacos` (where `cargo install` puts it).
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("RNACOS_BIN") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("rnacos"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_default();
        PathBuf::from(home).join(".cargo/bin/rnacos")
    })
}

impl Nacos {
    pub async fn start() -> Nacos {
        Nacos::launch(None).await
    }

    /// With `RNACOS_ENABLE_OPEN_API_AUTH=true` and `user`/`password` as
    /// its admin.
    pub async fn start_with_auth(user: &str, password: &str) -> Nacos {
        Nacos::launch(Some((user.to_owned(), password.to_owned()))).await
    }

    async fn launch(auth: Option<(String, String)>) -> Nacos {
        let mut nacos = Nacos {
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            http_port: free_port(),
            grpc_port: free_port(),
            auth,
        };
        nacos.spawn_retrying().await;
        nacos
    }

    /// [`Nacos::spawn`], one start at a time, up to five times: r-nacos
    /// 0.8.8 sometimes panics at startup in a raft actor that gets a
    /// request before its managers are injected (an `unwrap` in
    /// `raftapply.rs`), seen with auth on while other servers started at
    /// once, and then never serves what needs raft (logins). The panic is
    /// in its log; a fresh start on an empty data directory goes through.
    async fn spawn_retrying(&mut self) {
        static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = STARTING.lock().await;
        let mut attempt = 1;
        loop {
            match self.spawn().await {
                Ok(()) => return,
                Err(e) if attempt < 5 && e.contains("panicked") => {
                    eprintln!("rnacos attempt {attempt} failed, starting it again: {e}");
                    self.kill();
                    // Its half-applied raft state would stop the next start.
                    let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
                    attempt += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// `http://127.0.0.1:{port}`, as `registry.address` takes it.
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Its gRPC port (Nacos 2.x's protocol: the push subscription).
    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    /// SIGKILL, as a crash would: every ephemeral instance is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // already exited is fine
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports and data directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn_retrying().await;
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.log()).expect("rnacos log file");
        let mut command = Command::new(binary());
        command
            .current_dir(self.dir.path())
            .env("RNACOS_HTTP_PORT", self.http_port.to_string())
            .env("RNACOS_GRPC_PORT", self.grpc_port.to_string())
            .env("RNACOS_HTTP_CONSOLE_PORT", "0")
            .env("RNACOS_SDK_HOST", "127.0.0.1")
            .env("RNACOS_CONSOLE_HOST", "127.0.0.1")
            .env(
                "RNACOS_RAFT_NODE_ADDR",
                format!("127.0.0.1:{}", self.grpc_port),
            )
            .env("RNACOS_DATA_DIR", self.dir.path().join("data"))
            .env("RNACOS_ENABLE_METRICS", "false")
            .env("RNACOS_HTTP_WORKERS", "1")
            .env(
                "RNACOS_NAMING_HEALTH_TIMEOUT_SECOND",
                HEALTH_TIMEOUT.as_secs().to_string(),
            )
            .env(
                "RNACOS_NAMING_INSTANCE_TIMEOUT_SECOND",
                INSTANCE_TIMEOUT.as_secs().to_string(),
            )
            // The one info line: when its raft store is ready (see `serves`).
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .stdin(Stdio::null());
        if let Some((user, password)) = &self.auth {
            command
                .env("RNACOS_ENABLE_OPEN_API_AUTH", "true")
                .env("RNACOS_INIT_ADMIN_USERNAME", user)
                .env("RNACOS_INIT_ADMIN_PASSWORD", password);
        }
        let child = command.spawn().map_err(|e| {
            format!(
                "cannot start {}: {e}; install it with `cargo install rnacos --locked`",
                binary().display()
            )
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let child = self.child.as_mut().expect("rnacos was just spawned");
            if let Some(status) = child.try_wait().expect("rnacos's exit status") {
                return Err(format!(
                    "rnacos exited ({status}) before serving; the end of its log:\n{}",
                    self.log_tail(20)
                ));
            }
            if self.serves().await {
                return Ok(());
            }
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            if log.contains("panicked") || log.contains("stack backtrace") {
                return Err(format!(
                    "rnacos panicked before serving; the end of its log:\n{}",
                    self.log_tail(20)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "rnacos did not serve within {DEADLINE:?}; the end of its log:\n{}",
                    self.log_tail(20)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An instance list answered (with a token under auth) within half a
    /// second.
    async fn serves(&self) -> bool {
        let ask = self.request_within(
            "GET",
            "/nacos/v1/ns/instance/list",
            &[("serviceName", "probe")],
            Duration::from_millis(500),
        );
        matches!(ask.await, Ok((200, _)))
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("rnacos.log")
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `method path?params` (with a fresh token under auth): status and
    /// body; panics when the server does not answer.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
    ) -> (u16, String) {
        self.request_within(method, path, params, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn request_within(
        &self,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<(u16, String), String> {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, value) in params {
            query.append_pair(key, value);
        }
        if let Some(token) = self.login(timeout).await? {
            query.append_pair("accessToken", &token);
        }
        let uri = format!("{}{path}?{}", self.address(), query.finish());
        self.send(method, uri, None, timeout).await
    }

    /// The admin's access token under auth.
    async fn login(&self, timeout: Duration) -> Result<Option<String>, String> {
        let Some((user, password)) = &self.auth else {
            return Ok(None);
        };
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("username", user)
            .append_pair("password", password)
            .finish();
        let uri = format!("{}/nacos/v1/auth/login", self.address());
        let (status, body) = self.send("POST", uri, Some(body), timeout).await?;
        if status != 200 {
            return Err(format!("login: {status} {body}"));
        }
        let value: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        Ok(value["accessToken"].as_str().map(str::to_owned))
    }

    async fn send(
        &self,
        method: &str,
        uri: String,
        form: Option<String>,
        timeout: Duration,
    ) -> Result<(u16, String), String> {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut request = hyper::Request::builder().method(method).uri(uri);
        if form.is_some() {
            request = request.header("content-type", "application/x-www-form-urlencoded");
        }
        let request = request
            .body(Full::new(Bytes::from(form.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = client.request(request).await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    /// Every instance Nacos lists for `service` in `DEFAULT_GROUP`
    /// (enabled ones only, as Nacos lists), healthy or not.
    pub async fn hosts(&self, service: &str) -> Vec<Value> {
        self.hosts_in(service, "DEFAULT_GROUP").await
    }

    pub async fn hosts_in(&self, service: &str, group: &str) -> Vec<Value> {
        let (status, body) = self
            .request(
                "GET",
                "/nacos/v1/ns/instance/list",
                &[
                    ("serviceName", service),
                    ("groupName", group),
                    ("healthyOnly", "false"),
                ],
            )
            .await;
        assert_eq!(status, 200, "instance list: {body}");
        let value: Value = serde_json::from_str(&body).expect("list JSON");
        value["hosts"].as_array().cloned().unwrap_or_default()
    }

    /// One instance of `service` in `DEFAULT_GROUP`, read through
    /// `GET /nacos/v1/ns/instance` (disabled ones too); `None` when Nacos
    /// does not have it.
    pub async fn instance(&self, service: &str, ip: &str, port: u16) -> Option<Value> {
        let port = port.to_string();
        let (status, body) = self
            .request(
                "GET",
                "/nacos/v1/ns/instance",
                &[
                    ("serviceName", service),
                    ("groupName", "DEFAULT_GROUP"),
                    ("ip", ip),
                    ("port", &port),
                ],
            )
            .await;
        (status == 200).then(|| serde_json::from_str(&body).expect("instance JSON"))
    }

    /// Registers an ephemeral instance and never beats for it: the
    /// server's own expiry marks it unhealthy and then removes it, which a
    /// test watches to know that expiry has run.
    pub async fn register_unbeaten(&self, service: &str, ip: &str, port: u16) {
        let port = port.to_string();
        let (status, body) = self
            .request(
                "POST",
                "/nacos/v1/ns/instance",
                &[
                    ("serviceName", service),
                    ("ip", ip),
                    ("port", &port),
                    ("ephemeral", "true"),
                ],
            )
            .await;
        assert_eq!(status, 200, "register: {body}");
    }

    /// Registers a persistent instance (`ephemeral=false`, so it stays
    /// without beats) as any Nacos client could, with `metadata` as written
    /// (a JSON object text).
    pub async fn register(&self, service: &str, ip: &str, port: u16, metadata: &str) {
        let port = port.to_string();
        let (status, body) = self
            .request(
                "POST",
                "/nacos/v1/ns/instance",
                &[
                    ("serviceName", service),
                    ("ip", ip),
                    ("port", &port),
                    ("ephemeral", "false"),
                    ("metadata", metadata),
                ],
            )
            .await;
        assert_eq!(status, 200, "register: {body}");
    }
}

impl Drop for Nacos {
    fn drop(&mut self) {
        self.kill();
    }
}
