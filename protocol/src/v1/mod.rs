//! Protocol 1 (SPEC.md appendix A): what a gateway needs to serve devices that have not moved
//! to protocol 2 yet, during a migration period the operator opts into. Devices speak only
//! protocol 2; the device side is kept so gateways can be tested against protocol 1.

mod security;
mod session;

pub use security::{
    Direction, MAX_NONCE_COUNTER, SALT_LEN, XNONCE_LEN, nonce, open, salted_nonce, seal,
};
pub use session::{DeviceSession, GatewaySession, Hello, MAX_REPLIES, VERSION};
