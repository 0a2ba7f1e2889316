//! The catalog's domain: values that cannot hold an invalid state, and the rules for
//! changing a product. No I/O here. SKUs and money come from the shop's shared kernel.

mod product;

pub use keel_shop_kernel::{Currency, Money, MoneyError, Sku, SkuError};
pub use product::{Product, ProductChange, ProductError, ProductName};
