//! placeholder
pub mod dht;
