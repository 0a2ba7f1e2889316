//! What other services may send the inventory and hear from it: its public interface.
//! Commands are answered with [`keel_sdk::Reply`] when the sender gives a return address
//! (a saga does); every command is idempotent by its reservation id.

use keel_sdk::Event;
use serde::{Deserialize, Serialize};

use crate::domain::{Lines, ReservationId, Sku, Stock};

/// Set units aside for `reservation` until it is committed or released, or until
/// `hold_seconds` pass (15 minutes by default, at most a day). Refused, with the SKU that
/// is short, when any line cannot be had: then nothing is reserved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reserve {
    pub reservation: ReservationId,
    pub lines: Lines,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_seconds: Option<u32>,
}

impl Event for Reserve {
    const TYPE: &'static str = "keel.inventory.reserve.v1";
    fn key(&self) -> String {
        self.reservation.to_string()
    }
}

/// Give back what `reservation` holds, or return its units to stock if it was committed.
/// A release of a reservation not made yet is remembered, and the reservation, should it
/// come later, is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub reservation: ReservationId,
}

impl Event for Release {
    const TYPE: &'static str = "keel.inventory.release.v1";
    fn key(&self) -> String {
        self.reservation.to_string()
    }
}

/// The units `reservation` holds are sold. Refused when it was released or expired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Commit {
    pub reservation: ReservationId,
}

impl Event for Commit {
    const TYPE: &'static str = "keel.inventory.commit.v1";
    fn key(&self) -> String {
        self.reservation.to_string()
    }
}

/// The stock of a SKU: what `GET /stock/{sku}` answers, and the event published whenever
/// it changes (a stocktake, a reservation, a sale, a return).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StockLevel {
    pub sku: Sku,
    pub on_hand: u32,
    pub reserved: u32,
    pub available: u32,
}

impl Event for StockLevel {
    const TYPE: &'static str = "keel.inventory.stock-changed.v1";
    fn key(&self) -> String {
        self.sku.to_string()
    }
}

impl From<&Stock> for StockLevel {
    fn from(stock: &Stock) -> Self {
        Self {
            sku: stock.sku().clone(),
            on_hand: stock.on_hand(),
            reserved: stock.reserved(),
            available: stock.available(),
        }
    }
}
