//! Test support: the real `idem` processes (the demo upstream, the gateway, `idem log`),
//! each in its own temporary directory on ports the OS picks, and a captured answer type
//! whose `Debug` output says everything a failing assertion needs.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use serde_json::Value;
use tempfile::TempDir;

/// The `idem` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_idem");

/// How long a process may take to print its ready line (a loaded CI machine is slow).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long polling for a state (a record status, an exit) may take.
const WAIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Between two polls.
const POLL: Duration = Duration::from_millis(20);

/// Environment variables of `idem` that must not leak from the test's environment into
/// the processes it starts, since they would override what a test configures.
const IDEM_ENV: [&str; 6] =
    ["IDEM_ADMIN_TOKEN", "IDEM_LISTEN", "IDEM_UPSTREAM", "IDEM_STORE", "IDEM_ADMIN_LISTEN", "IDEM_LOG"];

/// An HTTP client with a timeout, so a hung gateway fails a test instead of stalling it.
pub fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(20))
}

/// An HTTP client that gives up after `timeout`.
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().timeout(timeout).build().expect("an HTTP client")
}

/// A plain `Command` for the `idem` binary, with a clean `IDEM_*` environment.
pub fn idem() -> Command {
    let mut command = Command::new(BIN);
    for name in IDEM_ENV {
        command.env_remove(name);
    }
    command.env("IDEM_LOG", "info,idem=debug").stdin(Stdio::null());
    command
}

/// Spawns `command` with stdout and stderr sent to files, and waits (polling) until
/// stdout holds a complete line starting with `prefix`. Returns the child and that line.
pub async fn spawn_until_ready(mut command: Command, stdout: &Path, stderr: &Path, prefix: &str) -> (Child, String) {
    command.stdout(File::create(stdout).expect("a stdout file")).stderr(File::create(stderr).expect("a stderr file"));
    let mut child = command.spawn().expect("idem starts");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(stdout).unwrap_or_default();
        if let Some(line) = text.split_inclusive('\n').find(|l| l.starts_with(prefix) && l.ends_with('\n')) {
            return (child, line.trim_end().to_owned());
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "{command:?} exited ({status}) before it was ready\n--- stdout ---\n{text}\n--- stderr ---\n{}",
                read(stderr)
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} printed no ready line within {READY_TIMEOUT:?}\n--- stdout ---\n{text}\n--- stderr ---\n{}",
                read(stderr)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A file's text, or why it cannot be read.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()))
}

/// Waits (polling) for a child to exit.
pub async fn wait_for_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A URL on which nothing listens: connections to it are refused. The port was just
/// released; the OS hands out ephemeral ports in turn, so it is not soon reused.
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("an address").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// The demo upstream (`idem demo-upstream`), a real process that counts what it executes.
pub struct Upstream {
    child: Child,
    url: String,
    /// Where the test reads the counts: the URL, or under TLS the same port by the name
    /// `localhost` (which every test certificate names).
    stats_base: String,
    _dir: TempDir,
    http: reqwest::Client,
}

impl Upstream {
    /// Starts a demo upstream on a free port.
    pub async fn start() -> Upstream {
        Upstream::spawn(&[], client()).await
    }

    /// Starts a demo upstream serving HTTPS with `certificate` (HTTP/2 or HTTP/1.1 by ALPN),
    /// which must name `localhost`; the test reads its counts by that name, trusting `trusted`.
    pub async fn start_tls(certificate: &Certificate, trusted: &Authority) -> Upstream {
        let tls = ["--tls-cert", certificate.chain_path(), "--tls-key", certificate.key_path()];
        let mut upstream = Upstream::spawn(&tls, trusted.client()).await;
        upstream.stats_base = upstream.url.replace("127.0.0.1", "localhost");
        upstream
    }

    async fn spawn(args: &[&str], http: reqwest::Client) -> Upstream {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut command = idem();
        command.args(["demo-upstream", "--listen", "127.0.0.1:0"]).args(args);
        let prefix = "idem demo upstream listening on ";
        let (child, line) =
            spawn_until_ready(command, &dir.path().join("demo.stdout"), &dir.path().join("demo.stderr"), prefix).await;
        let url = line[prefix.len()..].trim_end_matches('/').to_owned();
        Upstream { child, stats_base: url.clone(), url, _dir: dir, http }
    }

    /// The base URL, `http://127.0.0.1:PORT` (`https://` when it serves TLS).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// `GET /_demo/stats`.
    pub async fn stats(&self) -> Value {
        let reply = send(self.http.get(format!("{}/_demo/stats", self.stats_base))).await;
        assert_eq!(reply.status, 200, "demo stats: {reply:?}");
        reply.json()
    }

    /// How many requests the upstream executed.
    pub async fn calls(&self) -> u64 {
        self.stats().await["calls"].as_u64().expect("calls is a number")
    }

    /// How many requests carrying `key` (as `Idempotency-Key`, else
    /// `Repeatability-Request-ID`, else `X-Request-Id`) the upstream executed.
    pub async fn calls_for(&self, key: &str) -> u64 {
        self.stats().await["by_key"][key].as_u64().unwrap_or(0)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a gateway is started: its config file, upstream and environment.
pub struct GatewayBuilder {
    config: String,
    upstream: String,
    env: Vec<(String, String)>,
    admin_listen: String,
    store: Option<String>,
}

impl GatewayBuilder {
    /// Sets an environment variable of the gateway process.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Overrides `--admin-listen` (default `127.0.0.1:0`).
    pub fn admin_listen(mut self, address: &str) -> Self {
        self.admin_listen = address.to_owned();
        self
    }

    /// Uses this store URL instead of a SQLite file in the gateway's temp dir.
    pub fn store(mut self, url: &str) -> Self {
        self.store = Some(url.to_owned());
        self
    }

    fn prepare(self) -> Gateway {
        let dir = tempfile::tempdir().expect("a temp dir");
        let config_path = dir.path().join("idem.toml");
        std::fs::write(&config_path, &self.config).expect("the config file is written");
        let store = self.store.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("idem.db").display()));
        Gateway {
            store,
            config_path,
            upstream: self.upstream,
            env: self.env,
            admin_listen: self.admin_listen,
            child: None,
            scheme: "http".into(),
            addr: String::new(),
            admin_addr: String::new(),
            starts: 0,
            dir,
        }
    }

    /// Starts the gateway and waits until it is ready.
    pub async fn start(self) -> Gateway {
        let mut gateway = self.prepare();
        gateway.spawn().await;
        gateway
    }

    /// Runs a gateway that is expected to refuse to start: its exit status and stderr.
    pub async fn expect_exit(self) -> (ExitStatus, String) {
        let gateway = self.prepare();
        let (stdout, stderr) = gateway.log_files();
        let mut command = gateway.command();
        command
            .stdout(File::create(&stdout).expect("a stdout file"))
            .stderr(File::create(&stderr).expect("a stderr file"));
        let mut child = command.spawn().expect("idem starts");
        let status = wait_for_exit(&mut child, WAIT_TIMEOUT).await;
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway did not exit\n--- stdout ---\n{}\n--- stderr ---\n{}", read(&stdout), read(&stderr));
        };
        (status, read(&stderr))
    }
}

/// A running `idem gateway` on a SQLite store in its own temp dir. The process is killed
/// when this is dropped; when a test panics, its logs are printed first.
pub struct Gateway {
    dir: TempDir,
    config_path: PathBuf,
    store: String,
    upstream: String,
    env: Vec<(String, String)>,
    admin_listen: String,
    child: Option<Child>,
    /// `http` or `https`, as the ready line says.
    scheme: String,
    addr: String,
    admin_addr: String,
    /// How often the process was started; each start logs to its own files.
    starts: u32,
}

impl Gateway {
    /// A gateway in front of `upstream` with `config` as its TOML file.
    pub fn builder(upstream: &str, config: &str) -> GatewayBuilder {
        GatewayBuilder {
            config: config.to_owned(),
            upstream: upstream.to_owned(),
            env: Vec::new(),
            admin_listen: "127.0.0.1:0".into(),
            store: None,
        }
    }

    /// Starts a gateway in front of `upstream` with `config` as its TOML file.
    pub async fn start(upstream: &str, config: &str) -> Gateway {
        Gateway::builder(upstream, config).start().await
    }

    fn log_files(&self) -> (PathBuf, PathBuf) {
        let n = self.starts;
        (self.dir.path().join(format!("gateway-{n}.stdout")), self.dir.path().join(format!("gateway-{n}.stderr")))
    }

    fn command(&self) -> Command {
        let mut command = idem();
        command
            .arg("gateway")
            .arg("--config")
            .arg(&self.config_path)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", &self.admin_listen, "--store", &self.store])
            .args(["--upstream", &self.upstream]);
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "the gateway is already running");
        self.starts += 1;
        let (stdout, stderr) = self.log_files();
        let prefix = "idem gateway listening on ";
        let (child, line) = spawn_until_ready(self.command(), &stdout, &stderr, prefix).await;
        self.child = Some(child);
        let (scheme, rest) =
            line[prefix.len()..].split_once("://").unwrap_or_else(|| panic!("unexpected line {line:?}"));
        self.scheme = scheme.to_owned();
        let (addr, rest) = rest.split_once(" (admin http://").unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let (admin, _) = rest.split_once(')').unwrap_or_else(|| panic!("unexpected line {line:?}"));
        self.addr = addr.to_owned();
        self.admin_addr = admin.to_owned();
    }

    /// A URL on the client listener.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// A URL on the admin listener.
    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// The store URL, for `idem log`.
    pub fn store_url(&self) -> &str {
        &self.store
    }

    /// Everything the gateway logged, every start.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                format!("--- gateway start {n} ---\n{}", read(&self.dir.path().join(format!("gateway-{n}.stderr"))))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the gateway is running").id()
    }

    /// The client listener's host:port.
    pub fn address(&self) -> &str {
        &self.addr
    }

    /// `kill -9`: the process dies without any chance to finish its work.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the gateway is running");
        child.kill().expect("SIGKILL is delivered");
        child.wait().expect("the killed gateway is reaped");
    }

    /// `kill -TERM` and wait for the process to exit on its own.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the gateway is running");
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
        assert!(sent.success(), "kill -TERM failed");
        match wait_for_exit(&mut child, WAIT_TIMEOUT).await {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the gateway did not exit after SIGTERM\n{}", self.logs());
            }
        }
    }

    /// Starts the gateway again on the same store file (on new ports).
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// Starts the gateway again on the same store file, now in front of `upstream`.
    pub async fn restart_with_upstream(&mut self, upstream: &str) {
        self.upstream = upstream.to_owned();
        self.spawn().await;
    }

    /// The record of `scope`/`key` for the empty tenant, from the admin API.
    pub async fn record(&self, scope: &str, key: &str) -> Option<Value> {
        self.record_of(scope, "", key).await
    }

    /// One record, from the admin API; `None` on 404.
    pub async fn record_of(&self, scope: &str, tenant: &str, key: &str) -> Option<Value> {
        let url = self.admin(&format!("/v1/records/{}/{}?tenant={}", encode(scope), encode(key), encode(tenant)));
        let reply = send(client().get(url)).await;
        match reply.status {
            200 => Some(reply.json()),
            404 => None,
            _ => panic!("admin show failed: {reply:?}"),
        }
    }

    /// Polls the admin API until the record of `scope`/`key` has `status`; returns it.
    pub async fn wait_for_status(&self, scope: &str, key: &str, status: &str) -> Value {
        self.wait_for_record(scope, key, &format!("status {status}"), |r| r["status"] == status).await
    }

    /// Polls the admin API until the record of `scope`/`key` satisfies `test`; returns it.
    pub async fn wait_for_record(&self, scope: &str, key: &str, what: &str, test: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let record = self.record(scope, key).await;
            if let Some(record) = &record {
                if test(record) {
                    return record.clone();
                }
            }
            assert!(Instant::now() < deadline, "record {scope}/{key} never had {what}; last: {record:?}");
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// What `idem log` did.
#[derive(Debug)]
pub struct LogRun {
    /// The exit code.
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl LogRun {
    /// Stdout as JSON, asserting the command succeeded.
    pub fn json(&self) -> Value {
        assert_eq!(self.code, Some(0), "idem log failed: {self:?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Runs `idem log ARGS --store STORE` to completion.
pub fn idem_log(store: &str, args: &[&str]) -> LogRun {
    let output = idem().arg("log").args(args).args(["--store", store]).output().expect("idem log runs");
    LogRun {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// An answer as a client saw it.
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The HTTP version it came in.
    pub version: reqwest::Version,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("a text header"))
    }

    /// True when the answer is a replay from the store.
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("the body is not JSON ({e}): {self:?}"))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut body = self.text();
        if let Some((cut, _)) = body.char_indices().nth(2000) {
            body.truncate(cut);
            body.push('…');
        }
        write!(f, "{} {:?}\n{:#?}\n{body}", self.status, self.version, self.headers)
    }
}

/// Sends a request and reads the whole answer; a transport error fails the test.
pub async fn send(request: reqwest::RequestBuilder) -> Reply {
    try_send(request).await.unwrap_or_else(|e| panic!("the request failed: {e:?}"))
}

/// Sends a request and reads the whole answer.
pub async fn try_send(request: reqwest::RequestBuilder) -> Result<Reply, reqwest::Error> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let version = response.version();
    let headers = response.headers().clone();
    let body = response.bytes().await?.to_vec();
    Ok(Reply { status, version, headers, body })
}

/// Asserts an `application/problem+json` answer with this status and `type`; returns
/// its body.
#[track_caller]
pub fn assert_problem(reply: &Reply, status: u16, kind: &str) -> Value {
    assert_eq!(reply.status, status, "expected {status} {kind}, got {reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/problem+json"), "{reply:?}");
    let body = reply.json();
    assert_eq!(body["type"], kind, "{reply:?}");
    assert_eq!(body["status"], status, "{reply:?}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "a problem has a detail: {reply:?}");
    assert!(!reply.replayed(), "a problem is never a replay: {reply:?}");
    body
}

/// Fires `count` copies of a request at once and collects every answer.
pub async fn fire_together(count: usize, request: impl Fn() -> reqwest::RequestBuilder) -> Vec<Reply> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..count {
        set.spawn(send(request()));
    }
    let mut replies = Vec::with_capacity(count);
    while let Some(reply) = set.join_next().await {
        replies.push(reply.expect("a request task"));
    }
    replies
}

/// A shared store for one test: a fresh PostgreSQL schema or Redis key prefix, removed
/// when the test ends (pass or fail), so test runs leave nothing behind.
pub struct SharedStore {
    /// The store URL the gateways get.
    pub url: String,
    cleanup: Vec<String>,
}

impl Drop for SharedStore {
    fn drop(&mut self) {
        // Best effort: the shell tools come with the servers; without them, nothing is lost
        // but some disk in the test database.
        let _ = Command::new("sh").arg("-c").args(&self.cleanup).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// The PostgreSQL server the tests use (`IDEM_TEST_POSTGRES_URL`), checked to be there.
pub fn postgres_url() -> String {
    let base = std::env::var("IDEM_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into());
    require_service("PostgreSQL", "IDEM_TEST_POSTGRES_URL", &base);
    base
}

/// The PostgreSQL server the tests use (`IDEM_TEST_POSTGRES_URL`), with a fresh schema
/// so tests never see each other's records.
pub fn postgres_store() -> SharedStore {
    let base = std::env::var("IDEM_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into());
    require_service("PostgreSQL", "IDEM_TEST_POSTGRES_URL", &base);
    let separator = if base.contains('?') { '&' } else { '?' };
    let schema = format!("idem_it_{}", unique_suffix());
    SharedStore {
        url: format!("{base}{separator}schema={schema}"),
        cleanup: vec![format!("psql '{base}' -q -c 'DROP SCHEMA IF EXISTS {schema} CASCADE'")],
    }
}

/// The Redis server the tests use (`IDEM_TEST_REDIS_URL`), with a fresh key prefix.
pub fn redis_store() -> SharedStore {
    let base = std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    require_service("Redis", "IDEM_TEST_REDIS_URL", &base);
    let separator = if base.contains('?') { '&' } else { '?' };
    let prefix = format!("idem_it_{}", unique_suffix());
    SharedStore {
        url: format!("{base}{separator}prefix={prefix}"),
        cleanup: vec![format!(
            "redis-cli -u '{base}' --scan --pattern '{prefix}*' | xargs -r -d '\\n' redis-cli -u '{base}' del"
        )],
    }
}

/// A name no other test (or test run) uses.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{}_{}_{}", std::process::id(), nanos, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The host:port of a service URL.
pub fn service_address(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?']).next().unwrap_or(after_scheme);
    authority.rsplit_once('@').map_or(authority, |(_, host)| host).to_owned()
}

/// Fails loudly when a service the test needs is not listening: CI treats a missing
/// service as a failure, never as a skipped test.
/// Fails loudly when a service the test needs is not listening.
pub fn require_service(name: &str, variable: &str, url: &str) {
    let address = service_address(url);
    let reachable = address
        .parse::<std::net::SocketAddr>()
        .ok()
        .or_else(|| std::net::ToSocketAddrs::to_socket_addrs(&address).ok()?.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    assert!(reachable, "{name} is not reachable at {address} ({variable}={url}): start it, or point {variable} at one");
}

/// A TCP relay the test controls, between a gateway and its store: `cut` breaks every
/// connection and refuses new ones (the store is unreachable); `restore` lets them through.
pub struct Relay {
    address: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying to `target` (host:port).
    pub async fn start(target: &str) -> Relay {
        Relay::start_at("127.0.0.1:0", target).await
    }

    /// Starts relaying from `listen` (host:port) to `target`.
    pub async fn start_at(listen: &str, target: &str) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind(listen).await.expect("the relay listens");
        let address = listener.local_addr().expect("an address");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (target, flag, tasks) = (target.to_owned(), cut.clone(), connections.clone());
        let acceptor = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().expect("the relay's task list").push(task);
            }
        });
        Relay { address, cut, connections, acceptor }
    }

    /// The relay's host:port.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// Breaks every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().expect("the relay's task list").drain(..) {
            task.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

/// A certificate authority made for one test: its certificate in a PEM file (what
/// `SSL_CERT_FILE` names), and the leaf certificates it signs.
pub struct Authority {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
    dir: TempDir,
}

/// A leaf certificate and its key, in PEM files.
pub struct Certificate {
    chain: String,
    key: String,
}

impl Authority {
    /// A new CA with a name of its own.
    pub fn new(name: &str) -> Authority {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("idem test CA {name}"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("a CA key");
        let certificate = params.self_signed(&key).expect("a CA certificate");
        let dir = tempfile::tempdir().expect("a temp dir");
        let pem = certificate.pem();
        std::fs::write(dir.path().join("ca.pem"), &pem).expect("the CA file is written");
        Authority { issuer: rcgen::Issuer::new(params, key), pem, dir }
    }

    /// The CA's PEM file.
    pub fn pem_path(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    /// A leaf certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Certificate {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = rcgen::CertificateParams::new(names.clone()).expect("leaf parameters");
        let key = rcgen::KeyPair::generate().expect("a leaf key");
        let leaf = params.signed_by(&key, &self.issuer).expect("a leaf certificate");
        let stem = names.join("+").replace(['.', ':'], "_");
        let chain = self.dir.path().join(format!("{stem}.pem"));
        let key_path = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&chain, leaf.pem()).expect("the certificate is written");
        std::fs::write(&key_path, key.serialize_pem()).expect("the key is written");
        Certificate { chain: chain.display().to_string(), key: key_path.display().to_string() }
    }

    /// An HTTP client that trusts this CA.
    pub fn client(&self) -> reqwest::Client {
        let root = reqwest::Certificate::from_pem(self.pem.as_bytes()).expect("the CA parses");
        reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .add_root_certificate(root)
            .build()
            .expect("a client")
    }
}

impl Certificate {
    /// The certificate's PEM file.
    pub fn chain_path(&self) -> &str {
        &self.chain
    }

    /// The key's PEM file.
    pub fn key_path(&self) -> &str {
        &self.key
    }
}

/// A port nothing listens on right now (see [`closed_port_url`]), for a server the test starts.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("an address").port()
}

/// Waits (polling) until something accepts TCP connections on `127.0.0.1:port`, or `child`
/// exits (the server could not start: its log says why).
pub async fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the server exited ({status}) before it listened on {port}:\n{}", read(log));
        }
        assert!(Instant::now() < deadline, "nothing listens on {port} after {READY_TIMEOUT:?}:\n{}", read(log));
        tokio::time::sleep(POLL).await;
    }
}

/// A private `nats-server` with JetStream that accepts TLS connections only, on a free
/// port, with `certificate`; stopped when dropped.
pub struct NatsTls {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl NatsTls {
    /// Starts it; a machine without `nats-server` fails the test (CI installs it).
    pub async fn start(certificate: &Certificate) -> NatsTls {
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let log = dir.path().join("nats.log");
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "--tls", "--tlscert", certificate.chain_path()])
            .args(["--tlskey", certificate.key_path(), "-js", "-sd"])
            .arg(dir.path().join("jetstream"))
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("a log file"))
            .stderr(Stdio::from(File::options().append(true).open(&log).expect("the log file")))
            .spawn()
            .expect("nats-server must be installed (e.g. /usr/sbin/nats-server) to test NATS over TLS");
        wait_for_port(port, &mut child, &log).await;
        NatsTls { child, port, _dir: dir }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for NatsTls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private RabbitMQ node (its own name, ports, database and logs in a temp dir) that
/// accepts `amqps://` only, with `certificate`; killed with its process group when dropped.
/// It runs beside the machine's own node, sharing only its `epmd`.
pub struct RabbitTls {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl RabbitTls {
    /// Starts it and waits for its TLS listener (a RabbitMQ node takes seconds to boot).
    pub async fn start(certificate: &Certificate) -> RabbitTls {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("a temp dir");
        let (port, dist_port) = (free_port(), free_port());
        let config = format!(
            "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\nssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\nssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
            certificate.chain_path(),
            certificate.key_path()
        );
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("rabbitmq.conf"), config).expect("the node's config is written");
        std::fs::write(path("enabled_plugins"), "[].\n").expect("no plugins");
        let log = path("server.log");
        let mut child = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/bin")
            .env("HOME", dir.path())
            .env("RABBITMQ_NODENAME", format!("idem-it-{}@localhost", unique_suffix()))
            .env("RABBITMQ_NODE_PORT", free_port().to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("a log file"))
            .stderr(Stdio::from(File::options().append(true).open(&log).expect("the log file")))
            .spawn()
            .expect("rabbitmq-server must be installed (/usr/lib/rabbitmq/bin) to test amqps://");
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("rabbitmq-server exited ({status}) before it listened:\n{}", read(&log));
            }
            assert!(Instant::now() < deadline, "rabbitmq-server did not listen on {port}:\n{}", read(&log));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        RabbitTls { child, port, _dir: dir }
    }

    /// Its TLS port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for RabbitTls {
    fn drop(&mut self) {
        // The script starts the Erlang VM as a child: the whole group goes.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// A flow file and a consumer file in `dir`, on a SQLite store there, whose step and
/// delivery go to `endpoint` and whose broker is a closed port: for the checks of what
/// `idem run` and `idem consume` refuse before they reach anything. Returns the store URL
/// and the two files.
pub fn run_and_consume_files(dir: &Path, endpoint: &str) -> (String, PathBuf, PathBuf) {
    let store = format!("sqlite://{}", dir.join("idem.db").display());
    let flow = dir.join("flow.toml");
    let source = "[source]\njsonl = \"-\"\nprimary_key = [\"id\"]\n";
    let step = format!("[[steps]]\nname = \"export\"\nurl = \"{endpoint}\"\n");
    std::fs::write(&flow, format!("flow = \"f\"\nstore = \"{store}\"\n{source}{step}")).expect("the flow is written");
    let consumer = dir.join("consumer.toml");
    let nats = "nats = { url = \"nats://127.0.0.1:9\", stream = \"S\", subject = \"s.>\", durable = \"s\" }";
    let deliver = format!("[deliver]\nmethod = \"POST\"\nurl = \"{endpoint}\"\n");
    let text = format!("subscriber = \"s\"\nstore = \"{store}\"\n[source]\n{nats}\n{deliver}");
    std::fs::write(&consumer, text).expect("the consumer file is written");
    (store, flow, consumer)
}
