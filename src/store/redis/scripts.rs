//! The Lua scripts: each is one atomic step on one record and its index entries. They
//! check versions, lease tokens and deadlines and keep the indexes in step; every decision
//! of SPEC §2 is made in Rust by `core::plan_claim` before a script runs.

use std::sync::LazyLock;

use redis::Script;

/// Defines a script as `common.lua` followed by its own file.
macro_rules! script {
    ($name:ident, $file:literal, $doc:literal) => {
        #[doc = $doc]
        pub static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(concat!(include_str!("common.lua"), include_str!($file))));
    };
}

script!(CLAIM, "claim.lua", "Inserts a new record if the key is absent, else returns the record there.");
script!(WRITE, "write.lua", "Compare-and-set of a whole record on its version.");
script!(FENCED, "fenced.lua", "Renew and finish: changes fields only under the caller's lease token.");
script!(DELETE, "delete.lua", "Forgets a record and its index entries.");
script!(PURGE, "purge.lua", "Removes due index entries (and records Redis still holds).");
script!(UNINDEX, "unindex.lua", "Removes index entries whose record is gone or re-created.");
script!(TOUCH, "touch.lua", "Adds buffered replay counts.");

/// Every script, to load them all at start-up.
pub fn all() -> [&'static Script; 7] {
    [&CLAIM, &WRITE, &FENCED, &DELETE, &PURGE, &UNINDEX, &TOUCH]
}
