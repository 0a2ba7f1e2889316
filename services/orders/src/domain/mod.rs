//! The orders domain: what a customer asks for, priced; an order's lifecycle; who may see
//! it. No I/O here: prices come in as a map, the saga's outcome as a status.

use std::collections::BTreeMap;
use std::fmt;

use keel_inventory::domain::Lines;
pub use keel_shop_kernel::{Money, MoneyError, Quantity, Reference as OrderId, Sku};
use serde::{Deserialize, Serialize};

/// Who placed an order: the subject of the customer's access token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct CustomerId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a customer id is 1 to 255 characters without control characters")]
pub struct CustomerIdError;

impl CustomerId {
    pub fn new(subject: &str) -> Result<Self, CustomerIdError> {
        let valid = (1..=255).contains(&subject.len()) && !subject.chars().any(char::is_control);
        valid
            .then(|| Self(subject.to_owned()))
            .ok_or(CustomerIdError)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One line of an order, priced when it was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PricedLine {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price: Money,
    pub total: Money,
}

/// Why an order cannot be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("{0} is not for sale")]
    NotForSale(Sku),
    #[error("an order is paid in one currency; {0} is priced in {1}, the rest in {2}")]
    MixedCurrencies(Sku, String, String),
    #[error("the order's total is too large")]
    Overflow,
}

/// A product's price and whether it can be ordered, as the catalog says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub price: Money,
    pub for_sale: bool,
}

/// Prices `lines` from `prices`: every SKU must be for sale, all in one currency. Returns
/// the priced lines (in SKU order) and the total.
pub fn price(
    lines: &Lines,
    prices: &BTreeMap<Sku, Price>,
) -> Result<(Vec<PricedLine>, Money), PricingError> {
    let mut priced = Vec::new();
    let mut total: Option<Money> = None;
    for line in lines.iter() {
        let Some(Price {
            price,
            for_sale: true,
        }) = prices.get(&line.sku).copied()
        else {
            return Err(PricingError::NotForSale(line.sku.clone()));
        };
        let line_total = price
            .times(line.quantity.get())
            .map_err(|_| PricingError::Overflow)?;
        total = Some(match total {
            None => line_total,
            Some(sum) => sum.checked_add(line_total).map_err(|error| match error {
                MoneyError::Mixed(..) => PricingError::MixedCurrencies(
                    line.sku.clone(),
                    price.currency().to_string(),
                    sum.currency().to_string(),
                ),
                _ => PricingError::Overflow,
            })?,
        });
        priced.push(PricedLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price: price,
            total: line_total,
        });
    }
    // Lines are never empty, so neither is the total.
    total
        .map(|total| (priced, total))
        .ok_or(PricingError::Overflow)
}

/// Where an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Being placed: the saga runs.
    Pending,
    /// Stock committed and payment captured.
    Confirmed,
    /// Not placed (out of stock, declined, a step failed or timed out); whatever was done
    /// was undone.
    Rejected,
    /// Confirmed, then called off by its customer: being refunded and restocked.
    Cancelling,
    /// Refunded and restocked.
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    /// A saga is still at work on the order (placing or cancelling it): it will move on
    /// by itself.
    pub fn in_progress(self) -> bool {
        matches!(self, Self::Pending | Self::Cancelling)
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Self::Pending,
            "confirmed" => Self::Confirmed,
            "rejected" => Self::Rejected,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// How an order's saga ended, in the order's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Compensated or failed, with the saga's reason.
    Undone(String),
}

/// The status an order takes when its saga ends, and the reason a customer reads.
/// The saga's reason names the step (`reserve failed: …`); the customer reads it in
/// the shop's words.
pub fn settle(outcome: &Outcome) -> (Status, Option<String>) {
    match outcome {
        Outcome::Completed => (Status::Confirmed, None),
        Outcome::Undone(reason) => {
            let (step, detail) = reason.split_once(' ').unwrap_or((reason, ""));
            let detail = detail.trim_start_matches("failed: ").trim();
            let timed_out = detail.starts_with("timed_out");
            // A command its participant could not handle says nothing about stock or money.
            let unhandled = detail.starts_with("the command was not handled");
            let words = match (step, timed_out) {
                _ if unhandled => "the order could not be completed".to_owned(),
                ("reserve", true) => "the stock could not be checked in time".to_owned(),
                ("reserve", false) => format!("out of stock ({detail})"),
                ("authorize", true) => "the payment could not be made in time".to_owned(),
                ("authorize", false) => format!("payment refused ({detail})"),
                ("commit", true) => "the stock could not be secured in time".to_owned(),
                ("commit", false) => "the reserved stock could not be secured".to_owned(),
                ("capture", true) => "the payment could not be taken in time".to_owned(),
                ("capture", false) => "the payment could not be taken".to_owned(),
                // The saga's own words stay in its history (GET shows it).
                _ => "the order could not be completed".to_owned(),
            };
            (Status::Rejected, Some(words))
        }
    }
}

/// Why an order cannot be cancelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("the order is still being placed: it can be cancelled once it is confirmed")]
    Pending,
    #[error("a rejected order has nothing to cancel")]
    Rejected,
}

/// What asking to cancel an order in `status` does: `Ok(true)` starts the cancellation,
/// `Ok(false)` is done already (cancelling or cancelled: asking again changes nothing).
pub fn cancel(status: Status) -> Result<bool, CancelError> {
    match status {
        Status::Confirmed => Ok(true),
        Status::Cancelling | Status::Cancelled => Ok(false),
        Status::Pending => Err(CancelError::Pending),
        Status::Rejected => Err(CancelError::Rejected),
    }
}

/// Whether `viewer` may see an order of `owner`: their own orders, or any for an admin.
/// Anyone else is told there is no such order.
pub fn may_see(owner: &CustomerId, viewer: &CustomerId, admin: bool) -> bool {
    admin || owner == viewer
}

#[cfg(test)]
mod tests {
    use keel_inventory::domain::Line;
    use proptest::prelude::*;

    use super::*;

    fn sku(text: &str) -> Sku {
        text.parse().unwrap()
    }

    fn money(minor: i64, currency: &str) -> Money {
        Money::new(minor, currency.parse().unwrap()).unwrap()
    }

    fn lines(items: &[(&str, i64)]) -> Lines {
        Lines::new(
            items
                .iter()
                .map(|(s, q)| Line {
                    sku: sku(s),
                    quantity: Quantity::new(*q).unwrap(),
                })
                .collect(),
        )
        .unwrap()
    }

    fn catalog(items: &[(&str, i64, &str, bool)]) -> BTreeMap<Sku, Price> {
        items
            .iter()
            .map(|(s, minor, currency, for_sale)| {
                (
                    sku(s),
                    Price {
                        price: money(*minor, currency),
                        for_sale: *for_sale,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn an_order_is_priced_in_one_currency_from_products_for_sale() {
        let prices = catalog(&[
            ("MUG", 1250, "EUR", true),
            ("TEA", 400, "EUR", true),
            ("OLD", 100, "EUR", false),
            ("USD", 100, "USD", true),
        ]);
        let (priced, total) = price(&lines(&[("TEA", 3), ("MUG", 2)]), &prices).unwrap();
        assert_eq!(total, money(3700, "EUR"));
        assert_eq!(priced[0].sku, sku("MUG"));
        assert_eq!(priced[0].total, money(2500, "EUR"));
        assert_eq!(
            price(&lines(&[("OLD", 1)]), &prices),
            Err(PricingError::NotForSale(sku("OLD")))
        );
        assert_eq!(
            price(&lines(&[("NONE", 1)]), &prices),
            Err(PricingError::NotForSale(sku("NONE")))
        );
        assert!(matches!(
            price(&lines(&[("MUG", 1), ("USD", 1)]), &prices),
            Err(PricingError::MixedCurrencies(..))
        ));
        let dear = catalog(&[("GOLD", i64::MAX / 2, "EUR", true)]);
        assert_eq!(
            price(&lines(&[("GOLD", 3)]), &dear),
            Err(PricingError::Overflow)
        );
    }

    #[test]
    fn a_saga_outcome_becomes_a_status_and_a_reason_in_the_shops_words() {
        assert_eq!(settle(&Outcome::Completed), (Status::Confirmed, None));
        let (status, reason) = settle(&Outcome::Undone(
            "reserve failed: MUG: 3 wanted, 1 available".into(),
        ));
        assert_eq!(status, Status::Rejected);
        assert_eq!(reason.unwrap(), "out of stock (MUG: 3 wanted, 1 available)");
        let (_, reason) = settle(&Outcome::Undone(
            "authorize failed: declined: card declined".into(),
        ));
        assert_eq!(reason.unwrap(), "payment refused (declined: card declined)");
        let (_, reason) = settle(&Outcome::Undone(
            "authorize timed_out: no reply within 5s".into(),
        ));
        assert_eq!(reason.unwrap(), "the payment could not be made in time");
        // Nothing internal reaches the customer.
        for (saga, words) in [
            (
                "commit failed: o-1: the reservation expired",
                "the reserved stock could not be secured",
            ),
            (
                "capture timed_out: no reply within 10s",
                "the payment could not be taken in time",
            ),
            (
                "reserve failed: the command was not handled: bad data",
                "the order could not be completed",
            ),
            (
                "; compensating authorize failed 5 times",
                "the order could not be completed",
            ),
        ] {
            assert_eq!(
                settle(&Outcome::Undone(saga.into())).1.unwrap(),
                words,
                "{saga}"
            );
        }
    }

    #[test]
    fn only_a_confirmed_order_is_cancelled_and_asking_again_changes_nothing() {
        assert_eq!(cancel(Status::Confirmed), Ok(true));
        assert_eq!(cancel(Status::Cancelling), Ok(false));
        assert_eq!(cancel(Status::Cancelled), Ok(false));
        assert_eq!(cancel(Status::Pending), Err(CancelError::Pending));
        assert_eq!(cancel(Status::Rejected), Err(CancelError::Rejected));
        for status in [
            Status::Pending,
            Status::Confirmed,
            Status::Rejected,
            Status::Cancelling,
            Status::Cancelled,
        ] {
            assert_eq!(Status::parse(status.as_str()), Some(status));
            // Only the statuses a saga is still working on move on by themselves.
            let in_progress = matches!(status, Status::Pending | Status::Cancelling);
            assert_eq!(status.in_progress(), in_progress, "{status:?}");
        }
    }

    #[test]
    fn customers_see_their_own_orders_and_admins_all() {
        let ada = CustomerId::new("ada").unwrap();
        let bob = CustomerId::new("bob").unwrap();
        assert!(may_see(&ada, &ada, false));
        assert!(!may_see(&ada, &bob, false));
        assert!(may_see(&ada, &bob, true));
        assert!(CustomerId::new("").is_err());
        assert!(CustomerId::new("a\nb").is_err());
    }

    proptest! {
        #[test]
        fn the_total_is_the_sum_of_the_lines_each_price_times_quantity(
            items in prop::collection::btree_map("[A-Z]{1,4}", (1..1_000_000i64, 1..100i64), 1..10),
        ) {
            let prices: BTreeMap<Sku, Price> = items
                .iter()
                .map(|(s, (minor, _))| (sku(s), Price { price: money(*minor, "EUR"), for_sale: true }))
                .collect();
            let wanted = Lines::new(items.iter().map(|(s, (_, q))| Line { sku: sku(s), quantity: Quantity::new(*q).unwrap() }).collect()).unwrap();
            let (priced, total) = price(&wanted, &prices).unwrap();
            let expected: i64 = items.values().map(|(minor, q)| minor * q).sum();
            prop_assert_eq!(total, money(expected, "EUR"));
            prop_assert_eq!(priced.len(), items.len());
            for line in &priced {
                prop_assert_eq!(line.total.minor(), line.unit_price.minor() * i64::from(line.quantity.get()));
            }
        }
    }
}
