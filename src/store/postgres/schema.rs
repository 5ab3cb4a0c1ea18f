//! Versioned migrations that idem runs itself, inside its own schema.
//!
//! Every starter takes one transaction-scoped advisory lock (keyed by the schema name)
//! before it looks, so concurrent starters apply each migration exactly once and the
//! last to arrive finds nothing left to do. The version is read before anything is
//! created: a schema written by a newer idem is refused without a single change.
//! The history lives in `idem_migrations` rather than `migrations`, a name other tools
//! use too, in case an operator points idem at a schema it shares with them.

use sha2::{Digest, Sha256};

use super::super::Error;

/// One step of the schema's history. Steps are never edited once released: a change
/// is a new step.
struct Migration {
    version: i64,
    description: &'static str,
    /// Runs with `search_path` set to the store's schema, so names stay unqualified.
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "records, keyed by (scope, tenant, key), indexed by expiry and creation",
    sql: r#"
CREATE TABLE records (
    scope          TEXT COLLATE "C" NOT NULL,
    tenant         TEXT COLLATE "C" NOT NULL,
    key            TEXT COLLATE "C" NOT NULL,
    version        BIGINT  NOT NULL,
    fingerprint    BYTEA   NOT NULL CHECK (octet_length(fingerprint) = 32),
    status         TEXT    NOT NULL
        CHECK (status IN ('in_progress', 'completed', 'failed_retryable', 'outcome_unknown', 'needs_review')),
    lease_token    BIGINT,
    locked_until   BIGINT,
    resp_status    INTEGER,
    resp_headers   TEXT,
    resp_body      BYTEA,
    resp_retained  BOOLEAN,
    created_at     BIGINT  NOT NULL,
    last_seen_at   BIGINT  NOT NULL,
    expires_at     BIGINT  NOT NULL,
    replay_count   BIGINT  NOT NULL,
    attempt_count  BIGINT  NOT NULL,
    correlation_id TEXT,
    error_summary  TEXT,
    PRIMARY KEY (scope, tenant, key)
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
CREATE INDEX records_expires ON records (expires_at);
CREATE INDEX records_created ON records (created_at, scope, tenant, key);
COMMENT ON TABLE records IS 'idem: one row per protected intent; times are milliseconds since the Unix epoch';
"#,
}];

/// The newest schema version this build knows.
pub fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Brings `schema` up to [`latest`], creating it when missing. `describe` turns a
/// driver error into a readable reason.
pub async fn migrate(
    client: &mut deadpool_postgres::Client,
    schema: &str,
    describe: impl Fn(tokio_postgres::Error) -> Error,
) -> Result<(), Error> {
    let quoted = format!("\"{schema}\"");
    let tx = client.transaction().await.map_err(&describe)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(schema)]).await.map_err(&describe)?;
    let current = recorded_version(&tx, schema).await.map_err(&describe)?;
    if current > latest() {
        // Dropping the transaction rolls it back: nothing was changed.
        return Err(Error::TooNew { found: current, supported: latest() });
    }
    if current == latest() {
        return tx.commit().await.map_err(&describe);
    }
    // CREATE SCHEMA needs the CREATE privilege on the database even with IF NOT EXISTS,
    // so an operator may pre-create the schema and grant idem's role only what it uses.
    let exists = tx
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", &[&schema])
        .await
        .map_err(&describe)?;
    if !exists.get::<_, bool>(0) {
        tx.batch_execute(&format!("CREATE SCHEMA {quoted}")).await.map_err(&describe)?;
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {quoted}.idem_migrations (
            version    BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            applied_by TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
         SET LOCAL search_path TO {quoted}"
    ))
    .await
    .map_err(&describe)?;
    let applied_by = format!("idem {}", env!("CARGO_PKG_VERSION"));
    for step in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(step.sql).await.map_err(&describe)?;
        tx.execute(
            "INSERT INTO idem_migrations (version, description, applied_by) VALUES ($1, $2, $3)",
            &[&step.version, &step.description, &applied_by],
        )
        .await
        .map_err(&describe)?;
    }
    tx.commit().await.map_err(&describe)
}

/// The highest version recorded, 0 for a schema (or a database) idem never touched.
async fn recorded_version(tx: &deadpool_postgres::Transaction<'_>, schema: &str) -> Result<i64, tokio_postgres::Error> {
    let table = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'idem_migrations')",
            &[&schema],
        )
        .await?;
    if !table.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = tx.query_one(&format!("SELECT coalesce(max(version), 0) FROM \"{schema}\".idem_migrations"), &[]).await?;
    row.try_get(0)
}

/// The advisory lock that serializes migrations of one schema: a hash of its name, so
/// stores in different schemas of one database never wait for each other.
fn lock_key(schema: &str) -> i64 {
    let digest = Sha256::digest(format!("idem migrations {schema}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}
