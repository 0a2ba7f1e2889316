//! The shop's shared kernel: the few values every service of the reference shop speaks
//! in (a SKU, an amount of money, a quantity, a business key), each unable to hold an invalid value. No
//! I/O; a service's own rules stay in its own crate.

mod money;
mod quantity;
mod reference;
mod sku;

pub use money::{Currency, Money, MoneyError};
pub use quantity::{Quantity, QuantityError};
pub use reference::{Reference, ReferenceError};
pub use sku::{Sku, SkuError};
