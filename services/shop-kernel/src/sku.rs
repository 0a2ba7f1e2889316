//! Stock-keeping units: the key every service of the shop shares for a product.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A stock-keeping unit: 1 to 32 uppercase letters, digits and inner dashes (`MUG-01`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Sku(#[schemars(pattern(r"^[A-Z0-9](?:[A-Z0-9-]{0,30}[A-Z0-9])?$"))] String);

/// Why text is not a SKU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a SKU is 1 to 32 uppercase letters, digits and inner dashes, not {0:?}")]
pub struct SkuError(String);

impl FromStr for Sku {
    type Err = SkuError;

    fn from_str(text: &str) -> Result<Self, SkuError> {
        let bytes = text.as_bytes();
        let valid = (1..=32).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-');
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(SkuError(text.chars().take(40).collect()))
        }
    }
}

impl Sku {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sku {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_short_uppercase_codes() {
        for good in ["MUG-01", "A", "X9", &"Z".repeat(32)] {
            assert!(good.parse::<Sku>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "mug-01",
            "-MUG",
            "MUG-",
            "MUG 01",
            "MÜG",
            &"Z".repeat(33),
        ] {
            assert!(bad.parse::<Sku>().is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_text_is_a_sku_only_if_it_follows_the_rules(text in "\\PC{0,40}") {
            let valid = (1..=32).contains(&text.len())
                && text.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
                && !text.starts_with('-')
                && !text.ends_with('-');
            prop_assert_eq!(text.parse::<Sku>().is_ok(), valid);
        }

        #[test]
        fn a_valid_sku_round_trips(text in "[A-Z0-9]([A-Z0-9-]{0,30}[A-Z0-9])?") {
            let sku: Sku = text.parse().unwrap();
            prop_assert_eq!(sku.to_string(), text.clone());
            let json = serde_json::to_string(&sku).unwrap();
            prop_assert_eq!(serde_json::from_str::<Sku>(&json).unwrap(), sku);
        }
    }
}
