#![no_std]
#![deny(unsafe_code)]
//! Cairn wire protocol (placeholder; see protocol/SPEC.md).
