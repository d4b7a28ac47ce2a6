#![no_std]
//! Cairn device client (placeholder).
