//! What the orders service publishes.

use keel_sdk::Event;
use serde::{Deserialize, Serialize};

use crate::domain::{CustomerId, Money, OrderId, Status};

/// An order was placed, confirmed or rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OrderChanged {
    pub order: OrderId,
    pub customer: CustomerId,
    pub status: Status,
    pub total: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event for OrderChanged {
    const TYPE: &'static str = "keel.orders.order-changed.v1";
    fn key(&self) -> String {
        self.order.to_string()
    }
}
