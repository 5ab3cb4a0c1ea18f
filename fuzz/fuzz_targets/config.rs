//! The three config files: the gateway's (`config::parse_toml` + `RawConfig::validate`),
//! the runner's flow (`runner::flow::parse`) and the consumer's (`RawConsumer` + `validate`).
//! Every input is read as all three, so what the fuzzer learns of TOML serves each.
//!
//! Beyond "never panics": validation is deterministic, a refusal names at least one problem,
//! and what validates is usable (names unique, GET and HEAD never claimed, every `{{steps.S.C}}`
//! names an earlier step that captures C, a record claimed now expires at a time an `i64` of
//! milliseconds holds, and for the gateway one it can write as an HTTP date).

#![no_main]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use http::Method;
use idem::config::parse_toml;
use idem::consumer::config::RawConsumer;
use idem::core::units::millis;
use idem::gateway::config::{Overrides, RawConfig};
use idem::runner::flow::{self, Flow, Step};
use idem::template::Placeholder;
use libfuzzer_sys::fuzz_target;

/// 2026-01-01T00:00:00Z, the "now" a validated config is used at.
const NOW_MS: i64 = 1_767_225_600_000;
/// The last instant an HTTP date can name (9999-12-31T23:59:59Z).
const LAST_HTTP_DATE_MS: i64 = 253_402_300_799_000;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    check_gateway(text);
    check_flow(text);
    check_consumer(text);
});

fn check_gateway(text: &str) {
    let validate = || {
        let raw: RawConfig = parse_toml(text).map_err(|e| vec![e])?;
        raw.validate(&Overrides::default(), &|_| None).map_err(|e| e.0)
    };
    let config = validate();
    assert_eq!(format!("{:?}", config.as_ref().err()), format!("{:?}", validate().err()), "deterministic");
    let config = match config {
        Ok(config) => config,
        Err(problems) => return refused(&problems),
    };
    assert!(!config.routes.is_empty(), "a config protects at least the default route");
    let mut names = HashSet::new();
    for route in &config.routes {
        assert!(names.insert(route.name.clone()), "route name {:?} twice", route.name);
        assert!((1..=128).contains(&route.name.len()) && route.name.bytes().all(|b| b.is_ascii_graphic()));
        assert!(!route.methods.iter().any(|m| *m == Method::GET || *m == Method::HEAD), "GET/HEAD claimed");
        assert!(route.lease >= Duration::from_millis(100));
        // `Idempotency-Expires` is written as an HTTP date on every protected answer
        // (known finding 1: a ttl past 9999 validates, and every answer then panics).
        let expires = fits_millis(route.ttl, &format!("route {:?} ttl", route.name));
        let writable = expires <= LAST_HTTP_DATE_MS;
        if !writable && idem_fuzz::known_findings_skipped() {
            return;
        }
        assert!(writable, "route {:?} ttl {:?} expires after 9999", route.name, route.ttl);
        fits_millis(route.lease, &format!("route {:?} lease", route.name));
    }
}

fn check_flow(text: &str) {
    let parsed = flow::parse(text);
    assert_eq!(format!("{:?}", parsed.as_ref().err()), format!("{:?}", flow::parse(text).err()), "deterministic");
    match parsed {
        Ok(flow) => usable_flow(&flow),
        Err(e) => refused(&e.0),
    }
}

fn check_consumer(text: &str) {
    let validate = || {
        let mut raw: RawConsumer = parse_toml(text).map_err(|e| vec![e])?;
        // `deliver.flow` names a file: only ever the one this target writes, never a path the
        // fuzzer made up (`/dev/zero` would never finish reading).
        if let Some(flow) = raw.deliver.as_mut().and_then(|d| d.flow.as_mut()) {
            *flow = "flow.toml".into();
        }
        raw.validate(flow_dir(), &|_| None).map_err(|e| e.0)
    };
    let consumer = validate();
    assert_eq!(format!("{:?}", consumer.as_ref().err()), format!("{:?}", validate().err()), "deterministic");
    match consumer {
        Ok(consumer) => {
            assert!(!consumer.steps.is_empty(), "a consumer delivers somewhere");
            fits_millis(consumer.retention, "consumer retention");
            usable_steps(&consumer.steps);
        }
        Err(problems) => refused(&problems),
    }
}

fn refused(problems: &[String]) {
    assert!(!problems.is_empty(), "a refusal names its problems");
    assert!(problems.iter().all(|p| !p.trim().is_empty()), "an empty problem in {problems:?}");
}

fn usable_flow(flow: &Flow) {
    assert!(!flow.steps.is_empty() && flow.concurrency >= 1 && flow.max_attempts >= 1);
    fits_millis(flow.retention, "flow retention");
    usable_steps(&flow.steps);
}

/// Unique names, and every `{{steps.S.C}}` names an earlier step S that captures C (its own
/// captures only in `when_known`).
fn usable_steps(steps: &[Step]) {
    let mut earlier: Vec<&Step> = Vec::new();
    for step in steps {
        assert!(earlier.iter().all(|e| e.name != step.name), "step {:?} twice", step.name);
        let captures = |s: &Step, c: &str| s.capture.iter().any(|(name, _)| name == c);
        let known = |p: &Placeholder, own: bool| match p {
            Placeholder::Step { step: s, capture } => {
                earlier.iter().any(|e| e.name == *s && captures(e, capture))
                    || (own && step.name == *s && captures(step, capture))
            }
            _ => true,
        };
        let mut sent: Vec<&Placeholder> = step.url.placeholders().collect();
        sent.extend(step.headers.iter().flat_map(|(_, t)| t.placeholders()));
        sent.extend(step.body.iter().flat_map(|b| b.placeholders().into_iter().map(|(_, p)| p)));
        assert!(sent.iter().all(|p| known(p, false)), "step {:?} names an unknown capture", step.name);
        if let Some(w) = &step.when_known {
            assert!(!step.capture.is_empty(), "when_known without capture");
            let mut update: Vec<&Placeholder> = w.url.placeholders().collect();
            update.extend(w.body.iter().flat_map(|b| b.placeholders().into_iter().map(|(_, p)| p)));
            assert!(update.iter().all(|p| known(p, true)), "step {:?} when_known names an unknown capture", step.name);
        }
        earlier.push(step);
    }
}

/// A record claimed now with this lifetime expires at a time the stores can hold: an `i64`
/// of milliseconds (`core::transition` adds the two without a check).
/// (Known finding 2: nothing bounds a ttl, lease or retention; skipped, it counts as the
/// latest time.)
fn fits_millis(ttl: Duration, what: &str) -> i64 {
    match NOW_MS.checked_add(millis(ttl)) {
        Some(expires) => expires,
        None if idem_fuzz::known_findings_skipped() => i64::MAX,
        None => panic!("{what} {ttl:?} validates but overflows a record time"),
    }
}

/// A directory holding `flow.toml`, the example flow, for `deliver.flow`.
fn flow_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("idem-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        std::fs::write(dir.join("flow.toml"), include_str!("../../examples/orders-to-accounting.toml"))
            .expect("the example flow is written");
        dir
    })
}
