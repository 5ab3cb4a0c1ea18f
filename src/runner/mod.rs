//! `idem run`: exports, syncs and multi-step workflows from a source into HTTP APIs,
//! each step of each record guarded by a record in the store (SPEC §5).

pub mod flow;
pub mod source;
pub mod template;
