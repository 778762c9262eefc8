//! The Postgres wire protocol as the proxy needs it: framing, the few
//! messages it decodes, and the ones it writes.

pub mod frame;
pub mod messages;
pub mod rows;

pub use frame::{next_frame, next_startup_packet, Frame, FrameError, Malformed, Reader};
