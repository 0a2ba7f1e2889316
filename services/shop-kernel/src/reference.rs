//! References: the business keys that name an order, and the reservation and payment made
//! for it. Commands carry them, and every participant is idempotent by them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A business key: 1 to 64 ASCII letters, digits, `-`, `_`, `.` or `:` (a UUID, an
/// `Idempotency-Key`, `order:42`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Reference(#[schemars(pattern(r"^[A-Za-z0-9._:-]{1,64}$"))] String);

/// Why text is not a reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a reference is 1 to 64 ASCII letters, digits, '-', '_', '.' or ':'")]
pub struct ReferenceError;

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<Self, ReferenceError> {
        let valid = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        valid.then(|| Self(text.to_owned())).ok_or(ReferenceError)
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Reference {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_short_plain_keys() {
        for good in [
            "0192f4c1-7c3a-7d2e-9f1b-3c4d5e6f7a8b",
            "order:42",
            "a",
            &"x".repeat(64),
        ] {
            assert!(good.parse::<Reference>().is_ok(), "{good:?}");
        }
        for bad in ["", "a b", "ä", &"x".repeat(65), "a/b", "a\nb"] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<Reference>("\"a b\"").is_err());
    }
}
