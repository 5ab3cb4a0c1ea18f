//! End-to-end tests of `idem`: the real binary, a real demo upstream process and real
//! sockets, asserting what a client observes (status, headers, body) and how many calls
//! the upstream executed. One binary, one module per theme; `support` starts processes.

mod admin;
mod architecture;
mod bad_input;
mod broker_tls;
mod brokers;
mod browser_support;
mod consumer;
mod crash;
mod decision;
mod durability;
mod failures;
mod faults;
mod keys;
mod library;
mod lifecycle;
mod log_cli;
mod log_page;
mod odata;
mod openapi;
mod replay;
mod runner;
mod security;
mod shared_stores;
mod store_servers;
mod store_tls;
mod support;
mod tenants;
mod tls;
mod transport;
mod verify;
