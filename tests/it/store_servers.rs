//! Private TLS-only store servers for the store TLS tests: a PostgreSQL cluster made by
//! `initdb` that accepts `hostssl` connections only, and a `redis-server` listening on a
//! TLS port only. Each runs on a free port with a certificate made at test time, and is
//! stopped when dropped (a panicking test included). A missing binary fails the test,
//! saying what to install.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::AsyncBufReadExt;

use crate::support::Certificate;

/// Where Debian's PostgreSQL 15 keeps `initdb` and `pg_ctl`.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A port nothing listens on right now (released at once; ports are handed out in turn,
/// so it is not soon given to someone else).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("an address").port()
}

fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "postgres"]).output().expect("id runs");
        assert!(out.status.success(), "these tests need the postgres user (Debian's postgresql package)");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a numeric id")
    };
    (id("-u"), id("-g"))
}

/// Runs `program` as the postgres user; panics with its output when it fails.
fn as_postgres(program: &str, args: &[&str]) {
    let path = Path::new(PG_BIN).join(program);
    assert!(path.exists(), "{} is missing: these tests need PostgreSQL 15's server binaries", path.display());
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("runuser {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL cluster of its own with `ssl = on` whose `pg_hba.conf` admits TLS
/// connections only (`hostssl`, trust), for the user `postgres` and database `postgres`.
pub struct PgCluster {
    dir: TempDir,
    port: u16,
}

impl PgCluster {
    /// Makes and starts a cluster serving `certificate`.
    pub fn start(certificate: &Certificate) -> PgCluster {
        let (uid, gid) = postgres_ids();
        let dir = tempfile::tempdir().expect("a temp dir");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("the dir is given to postgres");
        let data = dir.path().join("data");
        let data_str = data.display().to_string();
        as_postgres("initdb", &["-D", &data_str, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"]);
        let own = |from: &str, name: &str, mode: u32| {
            let to = data.join(name);
            std::fs::copy(from, &to).expect("a certificate file is copied");
            std::os::unix::fs::chown(&to, Some(uid), Some(gid)).expect("the file is given to postgres");
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).expect("its mode is set");
        };
        own(certificate.chain_path(), "server.crt", 0o644);
        own(certificate.key_path(), "server.key", 0o600);
        // No `host` line: a plaintext TCP connection finds no entry and is refused.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .expect("pg_hba.conf is written");
        let port = free_port();
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nssl = on\n\
             ssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nfsync = off\nshared_buffers = 16MB\n",
            dir.path().display()
        );
        let mut file = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).expect("the conf");
        std::io::Write::write_all(&mut file, conf.as_bytes()).expect("the conf is written");
        let log = dir.path().join("server.log").display().to_string();
        // `-w` returns once the server accepts connections.
        as_postgres("pg_ctl", &["-D", &data_str, "-l", &log, "-w", "-t", "60", "start"]);
        PgCluster { dir, port }
    }

    /// `postgres://postgres:s3cret@HOST:PORT/postgres?PARAMS` (trust ignores the password;
    /// it is there to be redacted).
    pub fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres:s3cret@{host}:{}/postgres?{params}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("pg_ctl"))
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A `redis-server` with no plaintext port and TLS on a free one.
pub struct RedisTls {
    /// Killed when dropped (`kill_on_drop`).
    child: tokio::process::Child,
    port: u16,
    _dir: TempDir,
}

impl RedisTls {
    /// Starts one serving `certificate` (`ca` is what redis wants as its client CA; client
    /// certificates are not asked for) and waits until it accepts connections.
    pub async fn start(certificate: &Certificate, ca: &str) -> RedisTls {
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let mut command = tokio::process::Command::new("redis-server");
        command
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--tls-cert-file", certificate.chain_path(), "--tls-key-file", certificate.key_path()])
            .args(["--tls-ca-cert-file", ca, "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("redis-server (Debian's redis-server): {e}"));
        let stdout = child.stdout.take().expect("a piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.expect("redis-server's output") {
                if line.contains("Ready to accept connections") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready, Ok(true), "redis-server did not become ready");
        // Keep draining its log so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        RedisTls { child, port, _dir: dir }
    }

    /// `rediss://HOST:PORT/0` plus `tail`.
    pub fn url(&self, host: &str, tail: &str) -> String {
        format!("rediss://{host}:{}/0{tail}", self.port)
    }
}

impl Drop for RedisTls {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The CA certificate in `path`, as rustls wants it.
pub fn ca_certificates(path: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    idem::tls::read_certificates(&PathBuf::from(path)).expect("the CA file reads")
}
