//! The catalog's domain: values that cannot hold an invalid state, and the rules for
//! changing a product. No I/O here.

mod money;
mod product;

pub use money::{Currency, Money, MoneyError};
pub use product::{Product, ProductChange, ProductError, ProductName, Sku};
