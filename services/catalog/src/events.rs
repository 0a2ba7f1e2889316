//! The events the catalog publishes.

use keel_sdk::Event;
use serde::{Deserialize, Serialize};

use crate::domain::{Money, Product, ProductName, Sku};

/// A product was created or changed (its price, its name, whether it is for sale).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProductChanged {
    pub sku: Sku,
    pub name: ProductName,
    pub price: Money,
    pub active: bool,
    /// 1 for the product's first write, one more for each write after: a consumer that
    /// hears changes out of order keeps the highest.
    pub version: i64,
}

impl Event for ProductChanged {
    const TYPE: &'static str = "keel.catalog.product-changed.v1";
    fn key(&self) -> String {
        self.sku.to_string()
    }
}

impl ProductChanged {
    /// `product` as written, at `version`.
    pub fn new(product: &Product, version: i64) -> Self {
        Self {
            sku: product.sku.clone(),
            name: product.name.clone(),
            price: product.price,
            active: product.active,
            version,
        }
    }
}
