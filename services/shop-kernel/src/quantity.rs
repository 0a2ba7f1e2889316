//! Quantities: how many units of a product an order line asks for.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A number of units in one line of an order or a reservation: 1 to [`Quantity::MAX`].
/// Bounded so that a line's total and a stock count can never overflow.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct Quantity(#[schemars(range(min = 1, max = 10_000))] u32);

/// Why a number is not a quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a quantity is 1 to {max} units, not {0}", max = Quantity::MAX)]
pub struct QuantityError(i64);

impl Quantity {
    pub const MAX: u32 = 10_000;

    pub fn new(units: i64) -> Result<Self, QuantityError> {
        u32::try_from(units)
            .ok()
            .filter(|units| (1..=Self::MAX).contains(units))
            .map(Self)
            .ok_or(QuantityError(units))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(i64::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_quantity_is_a_bounded_positive_count() {
        assert_eq!(Quantity::new(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::new(10_000).map(Quantity::get), Ok(10_000));
        for bad in [0, -1, 10_001, i64::MAX, i64::MIN] {
            assert!(Quantity::new(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Quantity>("0").is_err());
        assert!(serde_json::from_str::<Quantity>("1.5").is_err());
        assert!(serde_json::from_str::<Quantity>("\"3\"").is_err());
        assert_eq!(serde_json::from_str::<Quantity>("3").unwrap().get(), 3);
    }

    #[test]
    fn the_schema_states_the_bounds() {
        let schema = serde_json::to_value(schemars::schema_for!(Quantity)).unwrap();
        assert_eq!(
            (schema["minimum"].as_u64(), schema["maximum"].as_u64()),
            (Some(1), Some(10_000))
        );
        let sku = serde_json::to_value(schemars::schema_for!(crate::Sku)).unwrap();
        assert!(sku["pattern"].as_str().unwrap().starts_with("^[A-Z0-9]"));
    }

    proptest! {
        #[test]
        fn any_number_is_a_quantity_only_within_bounds(units in any::<i64>()) {
            prop_assert_eq!(Quantity::new(units).is_ok(), (1..=10_000).contains(&units));
        }
    }
}
