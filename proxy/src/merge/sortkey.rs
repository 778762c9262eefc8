//! STUB
use std::cmp::Ordering;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind { Int8 }
impl KeyKind { pub fn from_oid(oid: u32) -> Option<KeyKind> { (oid == 20).then_some(KeyKind::Int8) } pub fn collatable(self) -> bool { false } }
#[derive(Debug, Clone, Copy)]
pub struct SortSpec { pub kind: KeyKind, pub descending: bool, pub nulls_first: bool }
#[derive(Debug)]
pub struct KeyError(pub String);
pub fn compare(_spec: &SortSpec, _a: Option<&[u8]>, _b: Option<&[u8]>) -> Result<Ordering, KeyError> { Ok(Ordering::Equal) }
pub fn collation_is_bytewise(_c: &str, _d: &str) -> bool { true }
