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
}

impl Event for ProductChanged {
    const TYPE: &'static str = "keel.catalog.product-changed.v1";
    fn key(&self) -> String {
        self.sku.to_string()
    }
}

impl From<&Product> for ProductChanged {
    fn from(product: &Product) -> Self {
        Self {
            sku: product.sku.clone(),
            name: product.name.clone(),
            price: product.price,
            active: product.active,
        }
    }
}
