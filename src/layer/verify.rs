//! A retry that meets an unknown outcome on a route with a lookup (SPEC §4, "Settling
//! unknown outcomes"): the claim said `Verify`, so this request holds the record's lease; it
//! asks the destination within the route's `upstream_timeout`, records the finding, and
//! claims again, so the retry gets the settled answer (found) or executes (absent). A lookup
//! that fails settles nothing: the retry is answered `409 outcome-unknown`.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::Shared;
use super::problem::Problem;
use super::route::Route;
use crate::core::{Decision, Intent, Outcome};
use crate::store::{Claim, owner};
use crate::template::Context;
use crate::verify::{self, Finding};

impl Shared {
    /// Settles what `claim` found unknown by its route's lookup, then claims `intent`
    /// again; any other claim is returned as it is. `body` is the retry's request body:
    /// its JSON fields are the lookup's `{{record.F}}`.
    pub(super) async fn settle_unknown(
        &self,
        route: &Route,
        body: &[u8],
        mut claim: Claim,
        mut intent: Intent,
    ) -> Result<Claim, Problem> {
        // Twice at most: a lease lost to another verifier mid-lookup can hand this
        // request a second `Verify`; past that it is answered as unknown.
        for _ in 0..2 {
            let (Decision::Verify, Some(token), Some(record), Some(lookup)) =
                (claim.decision, claim.token, &claim.record, &route.verify)
            else {
                return Ok(claim);
            };
            let fields = match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(fields)) => fields,
                _ => Map::new(),
            };
            let steps = HashMap::new();
            let ctx = Context { record: &fields, steps: &steps, key: &record.id.key };
            let ask = async {
                match client() {
                    Ok(client) => lookup.ask(client, &ctx, route.upstream_timeout).await,
                    Err(why) => Finding::Failed(why),
                }
            };
            let concluded = verify::conclude(&self.store, record, token, route.lease, self.clock, ask).await;
            match concluded {
                Ok(Finding::Failed(_)) => return Ok(unknown(claim)),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(route = %route.name, %error, "store unavailable while recording a lookup");
                    return Err(Problem::StoreUnavailable);
                }
            }
            intent.now = self.clock.now();
            claim = self.store.claim(&intent, route.policy()).await.map_err(|error| {
                tracing::warn!(route = %route.name, %error, "store unavailable: request refused, not forwarded");
                Problem::StoreUnavailable
            })?;
        }
        if let (Decision::Verify, Some(token), Some(record)) = (claim.decision, claim.token, &claim.record) {
            let outcome = Outcome::Unknown { error: "outcome unknown; two lookups in a row lost their lease".into() };
            owner::finish(self.store.as_ref(), &record.id, token, outcome, self.clock, |_| {}).await;
            return Ok(unknown(claim));
        }
        Ok(claim)
    }
}

/// The answer to a retry whose lookup settled nothing: the record stays unknown.
fn unknown(claim: Claim) -> Claim {
    Claim { decision: Decision::OutcomeUnknown, token: None, ..claim }
}

/// The lookups' HTTP client, made on first use (the TLS configuration was checked when the
/// gateway started).
fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT.get_or_init(verify::client).as_ref().map_err(Clone::clone)
}
