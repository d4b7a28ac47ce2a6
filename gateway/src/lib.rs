#![doc = include_str!("../README.md")]

pub mod backup;
pub mod cli;
pub mod cluster;
pub mod command;
pub mod config;
pub mod daemon;
pub mod db;
pub mod embed;
pub mod error;
pub mod export;
pub mod http;
pub mod ingress;
pub mod metrics;
pub mod raft;
pub mod security;
pub mod version;
