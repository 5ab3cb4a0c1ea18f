//! `idem run` (SPEC §5): the real binary runs flows against the real demo upstream process,
//! with a SQLite store in a temporary directory; the tests count what the upstream executed
//! and read what the store and `--report` say.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::support::{Upstream, closed_port_url, idem, idem_log, postgres_url, unique_suffix};

/// A flow's directory: the flow file, its data, its store and its report.
struct Dir {
    dir: TempDir,
}

/// What one `idem run` did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The count a summary line gives, e.g. `calls sent`.
    fn count(&self, name: &str) -> u64 {
        let prefix = format!("{name}: ");
        let line =
            self.stdout.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {name}: {self:?}"));
        line[prefix.len()..].parse().expect("a count")
    }
}

impl Dir {
    fn new() -> Dir {
        Dir { dir: tempfile::tempdir().expect("a temp dir") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn store(&self) -> String {
        format!("sqlite://{}", self.path("idem.db").display())
    }

    /// Writes `flow.toml`: a header naming the store and `data.jsonl`, then `steps`.
    fn flow(&self, header: &str, steps: &str) {
        let text = format!(
            "flow = \"f\"\nstore = \"{}\"\n{header}\n[source]\njsonl = \"data.jsonl\"\nprimary_key = [\"id\"]\n\n{steps}",
            self.store()
        );
        std::fs::write(self.path("flow.toml"), text).expect("flow written");
    }

    fn data(&self, lines: &[&str]) {
        std::fs::write(self.path("data.jsonl"), lines.join("\n") + "\n").expect("data written");
    }

    fn run(&self, args: &[&str]) -> Run {
        let output = idem()
            .arg("run")
            .arg(self.path("flow.toml"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("idem run runs");
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `--report` lines, by primary key.
    fn report(&self, name: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(self.path(name)).expect("a report");
        text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    }

    fn record(&self, scope: &str, key: &str) -> Value {
        idem_log(&self.store(), &["show", "--scope", scope, "--key", key, "--json"]).json()
    }
}

/// Starts `idem run` and kills it (SIGKILL) once the upstream has counted `calls` calls.
async fn kill_after_calls(dir: &Dir, upstream: &Upstream, calls: u64) {
    let mut child = idem()
        .arg("run")
        .arg(dir.path("flow.toml"))
        .current_dir(dir.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("idem run starts");
    let deadline = Instant::now() + Duration::from_secs(15);
    while upstream.calls().await < calls {
        assert!(Instant::now() < deadline, "the run made no progress");
        assert!(child.try_wait().expect("try_wait").is_none(), "the run ended before it was killed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
}

fn line_for<'a>(report: &'a [Value], key: &str) -> &'a Value {
    report.iter().find(|l| l["key"] == key).unwrap_or_else(|| panic!("no line for {key}: {report:?}"))
}

fn results(line: &Value) -> Vec<&str> {
    line["steps"].as_array().expect("steps").iter().map(|s| s["result"].as_str().expect("a result")).collect()
}

/// SPEC §5's example: customer upsert (PUT), invoice (POST, hashed key), email (guard).
fn seed_steps(upstream: &str) -> String {
    format!(
        r#"
[[steps]]
name = "customer"
method = "PUT"
url = "{upstream}/customers/{{{{record.customer_id}}}}"
body = {{ name = "{{{{record.name}}}}", email = "{{{{record.email}}}}" }}
capture = {{ ref = "/id" }}

[[steps]]
name = "invoice"
method = "POST"
url = "{upstream}/invoices"
body = {{ order = "{{{{record.id}}}}", amount = "{{{{record.amount}}}}", customer = "{{{{steps.customer.ref}}}}" }}
key_strategy = "primary_key_hash"
resend_on_change = true
capture = {{ invoice_id = "/id" }}
when_known = {{ method = "PATCH", url = "{upstream}/invoices/{{{{steps.invoice.invoice_id}}}}" }}

[[steps]]
name = "email"
method = "POST"
url = "{upstream}/emails"
body = {{ to = "{{{{record.email}}}}", invoice = "{{{{steps.invoice.invoice_id}}}}" }}
guard = true
"#
    )
}

const ORDERS: [&str; 3] = [
    r#"{"id": "o-1", "customer_id": "c-1", "name": "Ada", "email": "ada@example.com", "amount": 120.5}"#,
    r#"{"id": "o-2", "customer_id": "c-2", "name": "Alan", "email": "alan@example.com", "amount": 80}"#,
    r#"{"id": "o-3", "customer_id": "c-1", "name": "Ada", "email": "ada@example.com", "amount": 42}"#,
];

#[tokio::test]
async fn the_seed_flow_sends_each_step_once_and_a_rerun_sends_nothing() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    dir.flow("rate_limit = \"500/s\"\nconcurrency = 2", &seed_steps(&upstream.url()));
    dir.data(&ORDERS);

    let first = dir.run(&["--report", "report.json"]);
    assert_eq!(first.code, Some(0), "{first:?}");
    assert_eq!((first.count("records"), first.count("calls sent")), (3, 9), "{first:?}");
    let stats = upstream.stats().await;
    assert_eq!(stats["by_path"]["/customers/c-1"], 2, "{stats}");
    assert_eq!(stats["by_path"]["/customers/c-2"], 1, "{stats}");
    assert_eq!(stats["by_path"]["/invoices"], 3, "{stats}");
    assert_eq!(stats["by_path"]["/emails"], 3, "{stats}");
    assert_eq!(stats["by_key"]["f:email:o-2"], 1, "the idempotency header carries flow:step:key: {stats}");
    let report = dir.report("report.json");
    assert_eq!(report.len(), 3, "a line per record: {report:?}");
    let o2 = line_for(&report, "o-2");
    assert_eq!(o2["line"], 2);
    assert_eq!(results(o2), ["sent", "sent", "sent"], "{o2}");
    let invoice_id = o2["steps"][1]["captures"]["invoice_id"].as_str().expect("a captured invoice id").to_owned();

    // The ledger: the captured external id is in the store, where `idem log` shows it.
    let record = dir.record("f:invoice", "o-2");
    assert_eq!(record["status"], "completed", "{record}");
    let body: Value = serde_json::from_str(record["response"]["body"].as_str().expect("a body")).expect("JSON");
    assert_eq!(body["captures"]["invoice_id"], invoice_id.as_str(), "{record}");

    let ledger = idem_log(&dir.store(), &["list", "--scope", "f:invoice", "--json"]).json();
    let bodies: Vec<&str> =
        ledger["records"].as_array().expect("records").iter().filter_map(|r| r["response"]["body"].as_str()).collect();
    assert_eq!(bodies.len(), 3, "{ledger}");
    assert!(bodies.iter().all(|b| b.contains("\"invoice_id\"")), "the ledger lists external ids: {ledger}");
    let email = dir.record("f:email", "o-2");
    assert!(email["expires_at"].as_str().is_some_and(|at| at.starts_with("21")), "a guard is never forgotten: {email}");

    let again = dir.run(&[]);
    assert_eq!(again.code, Some(0), "{again:?}");
    assert_eq!((again.count("calls sent"), again.count("skipped (already sent)")), (0, 9), "{again:?}");
    assert_eq!(upstream.calls().await, 9, "a re-run sends nothing");

    // `idem log rm` forgets one step of one record: the next run sends it again, and
    // only it (the email is a guard step, sent once ever).
    let removed = idem_log(&dir.store(), &["rm", "--scope", "f:invoice", "--key", "o-2"]);
    assert_eq!(removed.code, Some(0), "{removed:?}");
    let forced = dir.run(&[]);
    assert_eq!(forced.code, Some(0), "{forced:?}");
    assert_eq!(forced.count("calls sent"), 1, "{forced:?}");
    assert_eq!(upstream.stats().await["by_path"]["/invoices"], 4);
}

#[tokio::test]
async fn a_dry_run_shows_what_would_be_sent_and_sends_and_writes_nothing() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    dir.flow("", &seed_steps(&upstream.url()));
    dir.data(&ORDERS);
    let dry = dir.run(&["--dry-run"]);
    assert_eq!(dry.code, Some(0), "{dry:?}");
    assert!(dry.stdout.contains(&format!("would send PUT {}/customers/c-1", upstream.url())), "{dry:?}");
    assert!(
        dry.stdout.contains(r#"[idempotency-key: f:customer:o-1] {"email":"ada@example.com","name":"Ada"}"#),
        "{dry:?}"
    );
    assert_eq!(dry.count("would send (dry run)"), 9, "{dry:?}");
    assert_eq!(upstream.calls().await, 0, "a dry run sends nothing");
    assert!(!dir.path("idem.db").exists(), "a dry run writes nothing");

    assert_eq!(dir.run(&[]).code, Some(0));
    let dry = dir.run(&["--dry-run"]);
    assert_eq!((dry.count("would send (dry run)"), dry.count("skipped (already sent)")), (0, 9), "{dry:?}");
    assert_eq!(upstream.calls().await, 9, "only the real run sent");
}

#[tokio::test]
async fn a_run_killed_mid_way_resumes_without_duplicates() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    let steps = format!(
        r#"
[[steps]]
name = "invoice"
method = "POST"
url = "{}/invoices"
headers = {{ X-Demo-Delay = "150ms" }}
"#,
        upstream.url()
    );
    dir.flow("concurrency = 2\ntimeout = \"1s\"", &steps);
    let lines: Vec<String> = (1..=16).map(|i| format!(r#"{{"id": "o-{i}", "amount": {i}}}"#)).collect();
    dir.data(&lines.iter().map(String::as_str).collect::<Vec<_>>());

    kill_after_calls(&dir, &upstream, 5).await;
    let sent_before = upstream.calls().await;
    assert!(sent_before < 16, "killed mid-way: {sent_before}");
    let listed = idem_log(&dir.store(), &["list", "--status", "in_progress", "--json"]).json();
    let cut_off: Vec<String> = listed["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| format!("f:invoice:{}", r["key"].as_str().expect("a key")))
        .collect();

    let resumed = dir.run(&[]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    let stats = upstream.stats().await;
    let by_key = stats["by_key"].as_object().expect("by_key");
    assert_eq!(by_key.len(), 16, "every record sent: {stats}");
    for (key, count) in by_key {
        // A call cut off by the kill was sent and never answered: it is sent once more,
        // under the same Idempotency-Key (so the destination can tell). Nothing else is.
        let allowed = if cut_off.contains(key) { 2 } else { 1 };
        assert!(count.as_u64() <= Some(allowed), "{key} sent {count} times; cut off: {cut_off:?}; {stats}");
    }
    assert!(cut_off.len() <= 2, "at most `concurrency` calls in flight: {cut_off:?}");
    let again = dir.run(&[]);
    assert_eq!((again.code, again.count("calls sent")), (Some(0), 0), "{again:?}");
}

#[tokio::test]
async fn a_stopped_run_finishes_the_calls_in_flight_and_resumes_without_duplicates() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    // A POST without an idempotency header: a call cut off could never be re-sent.
    let steps = format!(
        "[[steps]]\nname = \"bare\"\nurl = \"{}/bare\"\nidempotency_header = \"\"\n\
         headers = {{ X-Demo-Delay = \"150ms\" }}\n",
        upstream.url()
    );
    dir.flow("concurrency = 2", &steps);
    let lines: Vec<String> = (1..=12).map(|i| format!(r#"{{"id": "o-{i}"}}"#)).collect();
    dir.data(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    let child = idem()
        .arg("run")
        .arg(dir.path("flow.toml"))
        .current_dir(dir.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("idem run starts");
    let deadline = Instant::now() + Duration::from_secs(15);
    while upstream.calls().await < 3 {
        assert!(Instant::now() < deadline, "the run made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signal = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(signal.expect("kill runs").success());
    let output = child.wait_with_output().expect("idem run ends");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "stopped early: {stdout}");
    assert!(stdout.contains("run again to resume"), "{stdout}");
    let sent = upstream.calls().await;
    assert!(sent < 12, "stopped before the end: {sent}");
    let unsettled = idem_log(&dir.store(), &["list", "--status", "in_progress", "--json"]).json();
    assert_eq!(unsettled["records"], serde_json::json!([]), "the calls in flight were finished");

    let resumed = dir.run(&[]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    assert_eq!(resumed.count("calls sent"), 12 - sent, "{resumed:?}");
    assert_eq!(upstream.stats().await["by_path"]["/bare"], 12, "each record sent once");
}

#[tokio::test]
async fn two_runs_of_one_flow_at_once_send_each_record_once() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    let steps = format!(
        "[[steps]]\nname = \"export\"\nurl = \"{}/export\"\nheaders = {{ X-Demo-Delay = \"100ms\" }}\n",
        upstream.url()
    );
    dir.flow("concurrency = 4", &steps);
    let lines: Vec<String> = (1..=12).map(|i| format!(r#"{{"id": "o-{i}"}}"#)).collect();
    dir.data(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    // The store exists before both start, so both take records from the start.
    assert_eq!(idem_log(&dir.store(), &["stats"]).code, Some(0));
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| dir.run(&[]));
        let b = scope.spawn(|| dir.run(&[]));
        (a.join().expect("run a"), b.join().expect("run b"))
    });
    assert_eq!((a.code, b.code), (Some(0), Some(0)), "{a:?}\n{b:?}");
    // The store's claim is atomic across processes: one run sends, the other finds the
    // record in flight, waits, and then finds it sent.
    assert_eq!(a.count("calls sent") + b.count("calls sent"), 12, "{a:?}\n{b:?}");
    let stats = upstream.stats().await;
    assert!(stats["by_key"].as_object().expect("by_key").values().all(|c| c == 1), "{stats}");
    assert_eq!(stats["calls"], 12, "{stats}");
}

#[tokio::test]
async fn a_changed_record_is_resent_as_an_update_to_its_captured_id() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    let url = upstream.url();
    let steps = format!(
        r#"
[[steps]]
name = "invoice"
url = "{url}/invoices"
body = {{ order = "{{{{record.id}}}}", amount = "{{{{record.amount}}}}" }}
key_strategy = "primary_key_hash"
resend_on_change = true
capture = {{ invoice_id = "/id" }}
when_known = {{ method = "PATCH", url = "{url}/invoices/{{{{steps.invoice.invoice_id}}}}" }}
headers = {{ X-Demo-Fail-First = "{{{{record.fail}}}}" }}

[[steps]]
name = "audit"
url = "{url}/audit"
body = {{ amount = "{{{{record.amount}}}}" }}
key_strategy = "primary_key_hash"
"#
    );
    dir.flow("", &steps);
    dir.data(&[r#"{"id": "o-1", "amount": 10, "fail": 0}"#, r#"{"id": "o-2", "amount": 20, "fail": 0}"#]);
    assert_eq!(dir.run(&[]).code, Some(0));
    let invoice_id = dir.record("f:invoice", "o-1")["response"]["body"].as_str().map(str::to_owned).expect("a ledger");
    let invoice_id = serde_json::from_str::<Value>(&invoice_id).expect("JSON")["captures"]["invoice_id"].clone();

    // The update first meets a 503: it is retried, as an update again.
    dir.data(&[r#"{"id": "o-1", "amount": 11, "fail": 1}"#, r#"{"id": "o-2", "amount": 20, "fail": 0}"#]);
    let changed = dir.run(&["--report", "changed.json"]);
    assert_eq!(changed.code, Some(0), "{changed:?}");
    assert_eq!(changed.count("re-sent on change"), 1, "{changed:?}");
    assert_eq!(changed.count("changed, not re-sent"), 1, "{changed:?}");
    assert_eq!(changed.count("skipped (already sent)"), 2, "{changed:?}");
    let stats = upstream.stats().await;
    let patched = format!("/invoices/{}", invoice_id.as_str().expect("an id"));
    assert_eq!(stats["by_path"][&patched], 2, "the update (503, then 200) goes to the captured id: {stats}");
    assert_eq!(stats["by_path"]["/invoices"], 2, "no second create: {stats}");
    assert_eq!(stats["by_path"]["/audit"], 2, "the audit step does not re-send changes: {stats}");
    let report = dir.report("changed.json");
    assert_eq!(results(line_for(&report, "o-1")), ["resent", "changed_not_resent"]);
    assert_eq!(line_for(&report, "o-1")["steps"][0]["captures"]["invoice_id"], invoice_id, "the id is kept");
    let ledger = dir.record("f:invoice", "o-1")["response"]["body"].as_str().map(str::to_owned).expect("a ledger");
    assert_eq!(serde_json::from_str::<Value>(&ledger).expect("JSON")["captures"]["invoice_id"], invoice_id);
}

#[tokio::test]
async fn an_update_that_failed_in_one_run_is_sent_as_an_update_by_the_next() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    let url = upstream.url();
    let steps = format!(
        r#"
[[steps]]
name = "invoice"
url = "{url}/invoices"
body = {{ order = "{{{{record.id}}}}", amount = "{{{{record.amount}}}}" }}
key_strategy = "primary_key_hash"
resend_on_change = true
capture = {{ invoice_id = "/id" }}
when_known = {{ method = "PATCH", url = "{url}/invoices/{{{{steps.invoice.invoice_id}}}}" }}
headers = {{ X-Demo-Fail-First = "{{{{record.fail}}}}" }}
"#
    );
    dir.flow("max_attempts = 1", &steps);
    dir.data(&[r#"{"id": "o-1", "amount": 10, "fail": 0}"#]);
    assert_eq!(dir.run(&[]).code, Some(0));
    let stats = upstream.stats().await;
    let created = stats["by_path"].as_object().expect("paths").keys().len();
    assert_eq!(created, 1, "{stats}");

    // The changed record's update fails (503, no attempts left): this run ends with it
    // failed, and the ledger must still know the invoice's id.
    dir.data(&[r#"{"id": "o-1", "amount": 11, "fail": 5}"#]);
    let failed = dir.run(&[]);
    assert_eq!(failed.code, Some(1), "{failed:?}");
    let record = dir.record("f:invoice", "o-1");
    assert_eq!(record["status"], "failed_retryable", "{record}");
    let ledger = record["response"]["body"].as_str().map(str::to_owned).expect("the previous answer is kept");
    let invoice_id = serde_json::from_str::<Value>(&ledger).expect("JSON")["captures"]["invoice_id"].clone();
    assert!(invoice_id.is_string(), "{ledger}");

    // The next run sends the update to that id, not a second create.
    dir.data(&[r#"{"id": "o-1", "amount": 11, "fail": 0}"#]);
    let resumed = dir.run(&[]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    let stats = upstream.stats().await;
    let patched = format!("/invoices/{}", invoice_id.as_str().expect("an id"));
    assert_eq!(stats["by_path"]["/invoices"], 1, "no second create: {stats}");
    assert_eq!(stats["by_path"][&patched], 2, "the failed update, then the update that went through: {stats}");
}

#[tokio::test]
async fn a_permanent_error_needs_review_and_the_other_records_complete() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    let steps = format!(
        r#"
[[steps]]
name = "invoice"
url = "{0}/invoices"
headers = {{ X-Demo-Status = "{{{{record.answer}}}}" }}

[[steps]]
name = "email"
url = "{0}/emails"
"#,
        upstream.url()
    );
    dir.flow("", &steps);
    dir.data(&[
        r#"{"id": "o-1", "answer": "201"}"#,
        r#"{"id": "o-2", "answer": "400"}"#,
        r#"{"id": "o-3", "answer": "201"}"#,
    ]);
    let run = dir.run(&["--report", "report.json"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.count("needs review"), 1, "{run:?}");
    assert!(run.stderr.contains("POST /invoices answered 400"), "{run:?}");
    let report = dir.report("report.json");
    let o2 = line_for(&report, "o-2");
    assert_eq!(results(o2), ["needs_review", "skipped_after_failure"], "{o2}");
    assert_eq!(o2["steps"][0]["status"], 400, "{o2}");
    assert_eq!(o2["steps"][0]["error"], "POST /invoices answered 400", "never the body: {o2}");
    assert_eq!(results(line_for(&report, "o-1")), ["sent", "sent"]);
    assert_eq!(upstream.stats().await["by_path"]["/emails"], 2, "later steps of o-2 wait");
    assert_eq!(dir.record("f:invoice", "o-2")["status"], "needs_review");

    let again = dir.run(&[]);
    assert_eq!((again.code, again.count("calls sent")), (Some(1), 0), "needs review until settled: {again:?}");
}

#[tokio::test]
async fn transient_failures_are_retried_up_to_max_attempts() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    let steps = format!(
        r#"
[[steps]]
name = "invoice"
url = "{}/invoices"
headers = {{ X-Demo-Fail-First = "{{{{record.fail}}}}" }}
"#,
        upstream.url()
    );
    dir.flow("max_attempts = 3", &steps);
    dir.data(&[r#"{"id": "o-1", "fail": "2"}"#, r#"{"id": "o-2", "fail": "9"}"#]);
    let run = dir.run(&["--report", "report.json"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!((run.count("calls sent"), run.count("retried")), (6, 4), "{run:?}");
    assert_eq!(upstream.calls_for("f:invoice:o-1").await, 3, "two 503s, then success");
    let report = dir.report("report.json");
    assert_eq!(results(line_for(&report, "o-1")), ["sent"]);
    let o2 = line_for(&report, "o-2");
    assert_eq!(results(o2), ["failed"], "{o2}");
    assert_eq!(o2["steps"][0]["error"], "POST /invoices answered 503", "{o2}");
    assert_eq!(dir.record("f:invoice", "o-1")["status"], "completed");
    assert_eq!(dir.record("f:invoice", "o-2")["status"], "failed_retryable", "the next run tries again");
}

#[tokio::test]
async fn a_destination_that_cannot_be_reached_is_tried_again_by_the_next_run() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    let step = |base: &str| format!("[[steps]]\nname = \"export\"\nurl = \"{base}/export\"\nguard = true\n");
    dir.flow("max_attempts = 2", &step(&closed_port_url()));
    dir.data(&[r#"{"id": "o-1"}"#]);
    let down = dir.run(&[]);
    assert_eq!((down.code, down.count("retried")), (Some(1), 1), "{down:?}");
    assert_eq!(down.count("calls sent"), 0, "a connection that could not be made sent nothing: {down:?}");
    assert!(down.stderr.contains("cannot connect"), "{down:?}");
    // Nothing was sent, so even a guard step may be sent by the next run.
    assert_eq!(dir.record("f:export", "o-1")["status"], "failed_retryable");
    dir.flow("max_attempts = 2", &step(&upstream.url()));
    let up = dir.run(&[]);
    assert_eq!((up.code, up.count("calls sent")), (Some(0), 1), "{up:?}");
    assert_eq!(upstream.calls_for("f:export:o-1").await, 1);
}

#[tokio::test]
async fn a_call_sent_and_never_answered_is_resent_only_when_safe() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    let step = |name: &str, extra: &str| {
        format!(
            "[[steps]]\nname = \"{name}\"\nurl = \"{}/{name}\"\nheaders = {{ X-Demo-Fault = \"drop\" }}\n{extra}\n\n\
             [[steps]]\nname = \"next\"\nurl = \"{}/next\"\n",
            upstream.url(),
            upstream.url()
        )
    };
    dir.data(&[r#"{"id": "o-1"}"#]);

    // With an idempotency header a lost answer is sent again (the destination can tell);
    // still lost after max_attempts, it stays unknown, and the next step waits.
    dir.flow("max_attempts = 2", &step("keyed", ""));
    let run = dir.run(&["--report", "report.json"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(upstream.calls_for("f:keyed:o-1").await, 2);
    assert_eq!(results(line_for(&dir.report("report.json"), "o-1")), ["unknown", "skipped_after_failure"]);
    assert_eq!(dir.record("f:keyed", "o-1")["status"], "outcome_unknown");

    // A POST without a key is never re-sent once it may have been sent, in this run or the next.
    dir.flow("max_attempts = 2", &step("bare", "idempotency_header = \"\""));
    let bare = dir.run(&[]);
    assert_eq!(bare.code, Some(1), "{bare:?}");
    assert_eq!(upstream.stats().await["by_path"]["/bare"], 1, "sent once");
    let again = dir.run(&[]);
    assert_eq!(again.code, Some(1), "{again:?}");
    assert_eq!(upstream.stats().await["by_path"]["/bare"], 1, "a re-run does not re-send it either");
    assert_eq!(dir.record("f:bare", "o-1")["status"], "outcome_unknown");
    assert_eq!(upstream.stats().await["by_path"]["/next"], Value::Null, "later steps wait");
}

#[tokio::test]
async fn a_put_is_resent_after_a_timeout_and_a_guard_never_is() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    dir.data(&[r#"{"id": "o-1"}"#]);
    // PUT is idempotent by HTTP's definition: a call that timed out is sent again.
    let put = format!(
        "[[steps]]\nname = \"upsert\"\nmethod = \"PUT\"\nurl = \"{}/upsert\"\nidempotency_header = \"\"\n\
         headers = {{ X-Demo-Delay = \"1s\" }}\n",
        upstream.url()
    );
    dir.flow("max_attempts = 2\ntimeout = \"200ms\"", &put);
    let run = dir.run(&[]);
    assert_eq!((run.code, run.count("calls sent")), (Some(1), 2), "{run:?}");
    assert_eq!(dir.record("f:upsert", "o-1")["status"], "outcome_unknown");

    // A guard step answered 503 may have taken effect: never sent again, even by a retry.
    let guard = format!(
        "[[steps]]\nname = \"guarded\"\nurl = \"{}/guarded\"\nguard = true\nheaders = {{ X-Demo-Status = \"503\" }}\n",
        upstream.url()
    );
    dir.flow("max_attempts = 5", &guard);
    let run = dir.run(&[]);
    assert_eq!((run.code, run.count("calls sent")), (Some(1), 1), "{run:?}");
    assert_eq!(dir.record("f:guarded", "o-1")["status"], "needs_review");
    assert_eq!(dir.run(&[]).count("calls sent"), 0);
    assert_eq!(upstream.stats().await["by_path"]["/guarded"], 1);
}

#[tokio::test]
async fn records_older_than_retention_are_purged_and_sent_again() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    dir.flow("retention = \"1s\"", &format!("[[steps]]\nname = \"export\"\nurl = \"{}/export\"\n", upstream.url()));
    dir.data(&[r#"{"id": "o-1"}"#]);
    assert_eq!(dir.run(&[]).code, Some(0));
    // Retention is measured in wall-clock time: there is nothing to await but the clock.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let purged = idem_log(&dir.store(), &["purge", "--json"]).json();
    assert_eq!(purged["purged"], 1, "{purged}");
    let again = dir.run(&[]);
    assert_eq!((again.code, again.count("calls sent")), (Some(0), 1), "{again:?}");
    assert_eq!(upstream.calls_for("f:export:o-1").await, 2);
}

#[tokio::test]
async fn bad_source_lines_are_reported_by_line_and_the_rest_is_sent() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    dir.flow("", &format!("[[steps]]\nname = \"export\"\nurl = \"{}/export\"\n", upstream.url()));
    dir.data(&[r#"{"id": "o-1"}"#, r#"{"id": "o-2", oops"#, r#"{"no_id": 3}"#, r#"{"id": "o-4"}"#]);
    let other = format!("sqlite://{}", dir.path("other.db").display());
    let run = dir.run(&["--report", "report.json", "--store", &other]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!((run.count("records"), run.count("bad source lines")), (2, 2), "{run:?}");
    assert!(dir.path("other.db").exists() && !dir.path("idem.db").exists(), "--store overrides the flow's store");
    assert!(run.stderr.contains("line 2:"), "{run:?}");
    assert!(run.stderr.contains("line 3:"), "{run:?}");
    assert_eq!(upstream.calls().await, 2);
    let report = dir.report("report.json");
    assert_eq!(report.len(), 4, "{report:?}");
    assert!(report.iter().any(|l| l["line"] == 2 && l["error"].is_string()), "{report:?}");
}

#[tokio::test]
async fn bad_input_exits_2_and_names_the_problem() {
    let dir = Dir::new();
    dir.flow("", "[[steps]]\nname = \"export\"\nurl = \"http://127.0.0.1:9/x\"\ncolour = \"red\"\n");
    dir.data(&[r#"{"id": "o-1"}"#]);
    let run = dir.run(&[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("steps[0]") && run.stderr.contains("colour"), "{run:?}");

    dir.flow("", "[[steps]]\nname = \"export\"\nurl = \"http://127.0.0.1:9/x\"\n");
    std::fs::remove_file(dir.path("data.jsonl")).unwrap();
    let run = dir.run(&[]);
    assert_eq!(run.code, Some(2), "a source that cannot be opened: {run:?}");
    assert!(run.stderr.contains("data.jsonl"), "{run:?}");
}

#[tokio::test]
async fn csv_and_standard_input_sources_are_sent_too() {
    let upstream = Upstream::start().await;
    let dir = Dir::new();
    let steps = format!(
        "[[steps]]\nname = \"export\"\nurl = \"{}/export/{{{{record.id}}}}\"\nbody = {{ n = \"{{{{record.n}}}}\" }}\n",
        upstream.url()
    );
    dir.flow("", &steps);
    let flow = std::fs::read_to_string(dir.path("flow.toml")).expect("a flow");
    std::fs::write(dir.path("flow.toml"), flow.replace("jsonl = \"data.jsonl\"", "csv = \"data.csv\"")).unwrap();
    std::fs::write(dir.path("data.csv"), "id,n\na 1,1\nb/2,2\n").unwrap();
    let run = dir.run(&[]);
    assert_eq!((run.code, run.count("calls sent")), (Some(0), 2), "{run:?}");
    let stats = upstream.stats().await;
    assert_eq!(stats["by_path"]["/export/a%201"], 1, "values are escaped in URLs: {stats}");
    assert_eq!(stats["by_path"]["/export/b%2F2"], 1, "{stats}");

    let flow = std::fs::read_to_string(dir.path("flow.toml")).expect("a flow");
    std::fs::write(dir.path("flow.toml"), flow.replace("csv = \"data.csv\"", "jsonl = \"-\"")).unwrap();
    let mut child = idem()
        .arg("run")
        .arg(dir.path("flow.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("idem run starts");
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"{\"id\": \"a 1\", \"n\": 1}\n{\"id\": \"c\", \"n\": 3}\n").unwrap();
    drop(stdin);
    let output = child.wait_with_output().expect("idem run ends");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("calls sent: 1\n") && stdout.contains("skipped (already sent): 1\n"), "{stdout}");
}

#[tokio::test]
async fn a_postgresql_query_is_a_source() {
    let upstream = Upstream::start().await;
    let url = postgres_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("PostgreSQL connects");
    tokio::spawn(connection);
    let table = format!("idem_it_orders_{}", unique_suffix());
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (order_id int PRIMARY KEY, email text, amount float8, paid bool);
             INSERT INTO {table} SELECT i, 'c' || i || '@example.com', i * 1.5, i % 2 = 0 FROM generate_series(1, 20) i;"
        ))
        .await
        .expect("the source table is created");
    let dir = Dir::new();
    let flow = format!(
        r#"flow = "pg"
store = "{store}"
[source]
postgres = {{ url = "{url}", query = "SELECT order_id, email, amount FROM {table} WHERE paid" }}
primary_key = ["order_id"]

[[steps]]
name = "export"
url = "{upstream}/orders/{{{{record.order_id}}}}"
body = {{ to = "{{{{record.email}}}}", amount = "{{{{record.amount}}}}" }}
"#,
        store = dir.store(),
        upstream = upstream.url()
    );
    std::fs::write(dir.path("flow.toml"), flow).expect("flow written");
    let first = dir.run(&["--report", "report.json"]);
    let second = dir.run(&[]);
    client.batch_execute(&format!("DROP TABLE {table}")).await.expect("the table is dropped");
    assert_eq!(first.code, Some(0), "{first:?}");
    assert_eq!(first.count("records"), 10, "{first:?}");
    assert_eq!(upstream.calls().await, 10);
    let stats = upstream.stats().await;
    assert_eq!(stats["by_path"]["/orders/4"], 1, "{stats}");
    let report = dir.report("report.json");
    assert_eq!(line_for(&report, "4")["steps"][0]["result"], "sent");
    assert_eq!(second.count("skipped (already sent)"), 10, "{second:?}");
    assert_eq!(upstream.calls().await, 10, "the re-run sends nothing");
}
