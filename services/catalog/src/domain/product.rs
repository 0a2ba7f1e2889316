//! Products: a stock-keeping unit, a name, a price, and whether it is for sale.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use keel_shop_kernel::{Money, Sku, SkuError};

/// A product's name: 1 to 200 characters, no control characters, no surrounding spaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct ProductName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProductError {
    #[error(transparent)]
    Sku(#[from] SkuError),
    #[error("a product name is 1 to 200 characters without control characters")]
    Name,
    #[error(
        "a description is at most 2000 characters without control characters (newlines allowed)"
    )]
    Description,
}

impl FromStr for ProductName {
    type Err = ProductError;

    fn from_str(text: &str) -> Result<Self, ProductError> {
        let length = text.chars().count();
        let valid = (1..=200).contains(&length)
            && text.trim() == text
            && !text.chars().any(char::is_control);
        valid
            .then(|| Self(text.to_owned()))
            .ok_or(ProductError::Name)
    }
}

impl ProductName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ProductName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What an administrator sets on a product (all of it: a PUT).
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductChange {
    pub name: ProductName,
    #[serde(default)]
    pub description: String,
    pub price: Money,
    #[serde(default = "for_sale")]
    pub active: bool,
}

fn for_sale() -> bool {
    true
}

/// A product of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Product {
    pub sku: Sku,
    pub name: ProductName,
    pub description: String,
    pub price: Money,
    pub active: bool,
}

impl Product {
    /// The product `sku` as `change` describes it, when the change is valid.
    pub fn from_change(sku: Sku, change: ProductChange) -> Result<Self, ProductError> {
        let description_ok = change.description.chars().count() <= 2000
            && !change
                .description
                .chars()
                .any(|c| c.is_control() && c != '\n');
        if !description_ok {
            return Err(ProductError::Description);
        }
        Ok(Self {
            sku,
            name: change.name,
            description: change.description,
            price: change.price,
            active: change.active,
        })
    }

    /// Whether the product can be ordered.
    pub fn for_sale(&self) -> bool {
        self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_descriptions_are_bounded_and_printable() {
        assert!("Blue mug".parse::<ProductName>().is_ok());
        for bad in ["", " padded", "tab\there", &"n".repeat(201)] {
            assert!(bad.parse::<ProductName>().is_err(), "{bad:?}");
        }
        let change = |description: &str| ProductChange {
            name: "Mug".parse().unwrap(),
            description: description.to_owned(),
            price: serde_json::from_str(r#"{"minor":900,"currency":"EUR"}"#).unwrap(),
            active: true,
        };
        let sku: Sku = "MUG".parse().unwrap();
        assert!(Product::from_change(sku.clone(), change("Holds tea.\nDishwasher safe.")).is_ok());
        assert_eq!(
            Product::from_change(sku.clone(), change("bell\u{7}")),
            Err(ProductError::Description)
        );
        assert_eq!(
            Product::from_change(sku, change(&"d".repeat(2001))),
            Err(ProductError::Description)
        );
    }

    #[test]
    fn a_change_is_read_strictly() {
        let json = r#"{"name":"Mug","price":{"minor":900,"currency":"EUR"}}"#;
        let change: ProductChange = serde_json::from_str(json).unwrap();
        assert!(change.active, "for sale unless said otherwise");
        for bad in [
            r#"{"name":"","price":{"minor":900,"currency":"EUR"}}"#,
            r#"{"name":"Mug","price":{"minor":-1,"currency":"EUR"}}"#,
            r#"{"name":"Mug","price":{"minor":900,"currency":"EUR"},"stock":5}"#,
        ] {
            assert!(serde_json::from_str::<ProductChange>(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn a_product_round_trips_through_json(
            sku in "[A-Z0-9]{1,8}",
            name in "[a-zA-Z0-9 ]{0,20}[a-zA-Z0-9]",
            minor in 0..i64::MAX,
            active in any::<bool>(),
        ) {
            let product = Product {
                sku: sku.parse().unwrap(),
                name: name.trim().parse().unwrap(),
                description: String::new(),
                price: Money::new(minor, "EUR".parse().unwrap()).unwrap(),
                active,
            };
            let json = serde_json::to_string(&product).unwrap();
            prop_assert_eq!(serde_json::from_str::<Product>(&json).unwrap(), product);
        }
    }
}
