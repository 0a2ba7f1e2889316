//! Stock of one SKU: units on hand, of which some are reserved. `on_hand = available +
//! reserved` by construction (available is derived), and neither count can go negative.

use keel_shop_kernel::{Quantity, Sku};

/// The most units of one SKU a stocktake may count. Units sold and then returned (a
/// cancelled order's restock) may take the count above it: refusing them would leave the
/// cancellation half done, its refund made and its restock retried for ever.
pub const MAX_ON_HAND: u32 = 1_000_000_000;

/// Units of one SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stock {
    sku: Sku,
    on_hand: u32,
    reserved: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StockError {
    #[error("{sku}: {wanted} wanted, {available} available")]
    OutOfStock {
        sku: Sku,
        wanted: u32,
        available: u32,
    },
    #[error("{sku}: {reserved} units are reserved, so at least as many must be on hand")]
    BelowReserved { sku: Sku, reserved: u32 },
    #[error("at most {MAX_ON_HAND} units of one SKU")]
    TooMany,
    /// Counts that break the invariant: only ever from damaged storage or a bug.
    #[error("{sku}: {on_hand} on hand cannot hold {reserved} reserved")]
    Inconsistent {
        sku: Sku,
        on_hand: u32,
        reserved: u32,
    },
}

impl Stock {
    /// None of `sku` yet.
    pub fn empty(sku: Sku) -> Self {
        Self {
            sku,
            on_hand: 0,
            reserved: 0,
        }
    }

    /// Stock as stored; refused when the counts break the invariant.
    pub fn from_counts(sku: Sku, on_hand: u32, reserved: u32) -> Result<Self, StockError> {
        if reserved > on_hand {
            return Err(StockError::Inconsistent {
                sku,
                on_hand,
                reserved,
            });
        }
        Ok(Self {
            sku,
            on_hand,
            reserved,
        })
    }

    pub fn sku(&self) -> &Sku {
        &self.sku
    }

    pub fn on_hand(&self) -> u32 {
        self.on_hand
    }

    pub fn reserved(&self) -> u32 {
        self.reserved
    }

    pub fn available(&self) -> u32 {
        self.on_hand - self.reserved
    }

    /// Sets the count on hand (a stocktake or a delivery); never below what is reserved.
    pub fn set_on_hand(&mut self, on_hand: u32) -> Result<(), StockError> {
        if on_hand > MAX_ON_HAND {
            return Err(StockError::TooMany);
        }
        if on_hand < self.reserved {
            return Err(StockError::BelowReserved {
                sku: self.sku.clone(),
                reserved: self.reserved,
            });
        }
        self.on_hand = on_hand;
        Ok(())
    }

    /// Sets `quantity` units aside; refused when fewer are available.
    pub fn reserve(&mut self, quantity: Quantity) -> Result<(), StockError> {
        let wanted = quantity.get();
        if wanted > self.available() {
            return Err(StockError::OutOfStock {
                sku: self.sku.clone(),
                wanted,
                available: self.available(),
            });
        }
        self.reserved += wanted;
        Ok(())
    }

    /// Applies what a reservation's transition does to this SKU's line of `quantity`.
    pub fn apply(&mut self, effect: Effect, quantity: Quantity) -> Result<(), StockError> {
        let units = quantity.get();
        let (on_hand, reserved) = match effect {
            Effect::Unreserve => (Some(self.on_hand), self.reserved.checked_sub(units)),
            Effect::Deduct => (
                self.on_hand.checked_sub(units),
                self.reserved.checked_sub(units),
            ),
            Effect::Restock => (self.on_hand.checked_add(units), Some(self.reserved)),
        };
        match (on_hand, reserved) {
            (Some(on_hand), Some(reserved)) if reserved <= on_hand => {
                self.on_hand = on_hand;
                self.reserved = reserved;
                Ok(())
            }
            _ => Err(StockError::Inconsistent {
                sku: self.sku.clone(),
                on_hand: self.on_hand,
                reserved: self.reserved,
            }),
        }
    }
}

/// What a reservation's transition does to the stock of each of its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Held units become available again (released or expired).
    Unreserve,
    /// Held units leave: sold (committed).
    Deduct,
    /// Sold units come back on hand (a committed reservation released).
    Restock,
}
