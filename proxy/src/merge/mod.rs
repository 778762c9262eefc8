//! STUB
pub mod sortkey;
