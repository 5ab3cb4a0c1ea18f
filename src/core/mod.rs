//! The pure core: the record model, keys, fingerprints and the decision table.
//!
//! Nothing in this module does IO or reads a clock: every function takes `now` as an
//! argument, so the gateway, the runner, the consumer and every store share one
//! decision table (SPEC §2) and tests can drive time by hand.

pub mod decision;
pub mod fingerprint;
pub mod key;
pub mod record;
pub mod units;

pub use decision::{
    ClaimPolicy, Decision, ExecuteReason, Lookup, NotResolvable, OnChange, OnUnknown, Plan, Replays, Resolution,
    Transition, decide, decide_again, is_final_status, plan_claim, resolve, settled_by_lookup,
};
pub use fingerprint::{Fingerprint, FingerprintSpec};
pub use record::{Intent, Lease, LeaseToken, Millis, Outcome, Record, RecordId, Status, StoredResponse};
