//! What other services may send the payments service and hear from it. Commands are
//! answered with [`keel_sdk::Reply`] when the sender gives a return address; each is
//! idempotent by its payment id.

use keel_sdk::Event;
use keel_shop_kernel::Money;
use serde::{Deserialize, Serialize};

use crate::domain::{PaymentId, PaymentMethod, Status};

/// Hold `amount` on `method`. Refused when declined, or when the id was used for another
/// amount or method, or was voided before it came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Authorize {
    pub payment: PaymentId,
    pub amount: Money,
    pub method: PaymentMethod,
}

impl Event for Authorize {
    const TYPE: &'static str = "keel.payments.authorize.v1";
    fn key(&self) -> String {
        self.payment.to_string()
    }
}

/// Take the money held. Refused unless the payment is authorized (or captured already),
/// or when `amount` is given and is not the payment's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Capture {
    pub payment: PaymentId,
    /// What the sender believes the payment is for: a check against naming another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Money>,
}

impl Event for Capture {
    const TYPE: &'static str = "keel.payments.capture.v1";
    fn key(&self) -> String {
        self.payment.to_string()
    }
}

/// Undo the payment: give up the hold, or refund what was captured. A void that overtakes
/// its authorization is remembered, and the authorization refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Void {
    pub payment: PaymentId,
    /// What the sender believes the payment is for: refused when it is another's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Money>,
}

impl Event for Void {
    const TYPE: &'static str = "keel.payments.void.v1";
    fn key(&self) -> String {
        self.payment.to_string()
    }
}

/// A payment as the API shows it, and the event published whenever its status changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Payment {
    pub id: PaymentId,
    pub status: Status,
    /// None for a payment voided before it was authorized.
    pub amount: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<PaymentMethod>,
    /// Why it was declined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decline_reason: Option<String>,
}

impl Event for Payment {
    const TYPE: &'static str = "keel.payments.payment-changed.v1";
    fn key(&self) -> String {
        self.id.to_string()
    }
}
