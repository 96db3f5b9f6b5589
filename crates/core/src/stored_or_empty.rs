//! Serde for an optional checked value (a store path, an SRI hash) kept as its text, or the
//! empty string when absent, as stored state has it:
//! `#[serde(default, with = "nixfarm_core::stored_or_empty")]`. Text that does not check
//! (state an older version stored unchecked) reads as absent, not as an error that would
//! make the whole row unreadable.

use serde::{Deserialize, Deserializer, Serializer};
use std::ops::Deref;

pub fn serialize<S: Serializer, T: Deref<Target = str>>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_deref().unwrap_or(""))
}

pub fn deserialize<'de, D: Deserializer<'de>, T: TryFrom<String>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(T::try_from(String::deserialize(d)?).ok())
}
