//! The payments domain: payment methods, and what authorize, capture and void do to a
//! payment in each state. No I/O here: the provider is called by the use cases, as the
//! transition says.

use std::fmt;
use std::str::FromStr;

use keel_shop_kernel::Money;
pub use keel_shop_kernel::{Currency, Reference as PaymentId, ReferenceError};
use serde::{Deserialize, Serialize};

/// A payment method, as a provider's token (never a card number): `tok_` and 1 to 60
/// ASCII letters, digits or `_`. The simulated provider knows some by name (see
/// [`crate::provider`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct PaymentMethod(#[schemars(pattern(r"^tok_[A-Za-z0-9_]{1,60}$"))] String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a payment method is a token: tok_ and 1 to 60 letters, digits or '_'")]
pub struct PaymentMethodError;

impl FromStr for PaymentMethod {
    type Err = PaymentMethodError;

    fn from_str(text: &str) -> Result<Self, PaymentMethodError> {
        let valid = text.strip_prefix("tok_").is_some_and(|rest| {
            (1..=60).contains(&rest.len())
                && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
        valid
            .then(|| Self(text.to_owned()))
            .ok_or(PaymentMethodError)
    }
}

impl<'de> Deserialize<'de> for PaymentMethod {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Not `String::deserialize`: its error for a number quotes the number, and a
        // card number sent by mistake must not come back in an error message (or a log).
        let value = serde_json::Value::deserialize(deserializer)?;
        value
            .as_str()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| serde::de::Error::custom(PaymentMethodError))
    }
}

impl PaymentMethod {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PaymentMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a payment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The money is held on the customer's method.
    Authorized,
    /// Taken.
    Captured,
    /// The hold given up (or voided before it was asked for: a tombstone without an
    /// amount, so that the late authorization is refused).
    Voided,
    /// Taken, then given back.
    Refunded,
    /// The provider said no.
    Declined,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorized => "authorized",
            Self::Captured => "captured",
            Self::Voided => "voided",
            Self::Refunded => "refunded",
            Self::Declined => "declined",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "authorized" => Self::Authorized,
            "captured" => Self::Captured,
            "voided" => Self::Voided,
            "refunded" => Self::Refunded,
            "declined" => Self::Declined,
            _ => return None,
        })
    }
}

/// What can be asked of an existing payment besides its authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Capture,
    /// Undo: give up the hold, or give the money back if it was taken.
    Void,
}

/// What the provider must be asked to do for a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Done before: nothing to ask.
    Nothing,
    Capture,
    Void,
    Refund,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the payment is {}: it cannot be captured", .0.as_str())]
    NotAuthorized(Status),
}

/// What `command` does to a payment in `status`: its next status and what the provider is
/// asked. Every command is idempotent: asked again, it asks nothing more.
pub fn transition(status: Status, command: Command) -> Result<(Status, Action), TransitionError> {
    use Status::*;
    Ok(match (status, command) {
        (Authorized, Command::Capture) => (Captured, Action::Capture),
        (Captured, Command::Capture) => (Captured, Action::Nothing),
        (Voided | Refunded | Declined, Command::Capture) => {
            return Err(TransitionError::NotAuthorized(status));
        }
        (Authorized, Command::Void) => (Voided, Action::Void),
        (Captured, Command::Void) => (Refunded, Action::Refund),
        (Voided | Refunded | Declined, Command::Void) => (status, Action::Nothing),
    })
}

/// How an authorization asked again is answered, given the payment already stored under
/// its id (`amount` and `method` as stored; none for a tombstone): the payment as it is
/// now, unless it was declined or voided before it was made, or the id was used for
/// another amount or method.
pub fn authorize_again(
    status: Status,
    stored: Option<(Money, &PaymentMethod)>,
    amount: Money,
    method: &PaymentMethod,
    decline_reason: Option<&str>,
) -> Result<(), Refusal> {
    if stored.is_some_and(|(a, m)| a != amount || m != method) {
        return Err(Refusal::KeyReused);
    }
    match (status, stored) {
        (Status::Declined, _) => Err(Refusal::Declined(
            decline_reason.unwrap_or("declined").to_owned(),
        )),
        // Voided before it was ever authorized: a tombstone, which refuses.
        (_, None) => Err(Refusal::Closed(status)),
        // Made: the payment as it is now.
        (_, Some(_)) => Ok(()),
    }
}

/// Why a payment was not done, in words for whoever asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("declined: {0}")]
    Declined(String),
    #[error("this payment id was used for another amount or method")]
    KeyReused,
    #[error("the payment is {} already", .0.as_str())]
    Closed(Status),
    #[error("{0}")]
    Transition(#[from] TransitionError),
    #[error("no payment {0}")]
    Unknown(PaymentId),
    #[error("the payment is for another amount")]
    OtherAmount,
    /// Its authorization is being asked of the provider by another request: ask again
    /// shortly.
    #[error("this payment's authorization is in progress; ask again shortly")]
    InProgress,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn payment_methods_are_tokens_never_card_numbers() {
        // A card number sent as a number is refused without being repeated.
        let error = serde_json::from_str::<PaymentMethod>("4242424242424242").unwrap_err();
        assert!(!error.to_string().contains("4242"), "{error}");
        for good in ["tok_visa", "tok_chargeDeclined", "tok_a_1"] {
            assert!(good.parse::<PaymentMethod>().is_ok(), "{good}");
        }
        for bad in [
            "4242424242424242",
            "tok_",
            "tok_a-b",
            "visa",
            &format!("tok_{}", "x".repeat(61)),
        ] {
            assert!(bad.parse::<PaymentMethod>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_authorization_asked_again_gets_the_first_answer() {
        let eur = |minor| Money::new(minor, "EUR".parse().unwrap()).unwrap();
        let visa: PaymentMethod = "tok_visa".parse().unwrap();
        let other: PaymentMethod = "tok_mastercard".parse().unwrap();
        let stored = Some((eur(100), &visa));
        assert_eq!(
            authorize_again(Status::Authorized, stored, eur(100), &visa, None),
            Ok(())
        );
        assert_eq!(
            authorize_again(Status::Captured, stored, eur(100), &visa, None),
            Ok(())
        );
        assert_eq!(
            authorize_again(Status::Authorized, stored, eur(101), &visa, None),
            Err(Refusal::KeyReused)
        );
        assert_eq!(
            authorize_again(Status::Authorized, stored, eur(100), &other, None),
            Err(Refusal::KeyReused)
        );
        assert_eq!(
            authorize_again(
                Status::Declined,
                stored,
                eur(100),
                &visa,
                Some("insufficient funds")
            ),
            Err(Refusal::Declined("insufficient funds".into()))
        );
        // Voided after it was made: the payment as it is now. Voided before it was asked
        // for: the tombstone has no amount, and refuses.
        assert_eq!(
            authorize_again(Status::Voided, stored, eur(100), &visa, None),
            Ok(())
        );
        assert_eq!(
            authorize_again(Status::Voided, None, eur(100), &visa, None),
            Err(Refusal::Closed(Status::Voided))
        );
    }

    fn status() -> impl Strategy<Value = Status> {
        prop_oneof![
            Just(Status::Authorized),
            Just(Status::Captured),
            Just(Status::Voided),
            Just(Status::Refunded),
            Just(Status::Declined),
        ]
    }

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![Just(Command::Capture), Just(Command::Void)]
    }

    proptest! {
        /// Whatever the commands, in whatever order and however often: money is taken at
        /// most once, given back at most once and only after it was taken, and nothing is
        /// ever taken after a void.
        #[test]
        fn money_moves_at_most_once_each_way(
            start in status(),
            commands in prop::collection::vec(command(), 0..12),
        ) {
            let mut status = start;
            let mut taken = start == Status::Captured;
            let (mut captures, mut refunds) = (0, 0);
            for command in commands {
                let Ok((next, action)) = transition(status, command) else {
                    prop_assert!(matches!(status, Status::Voided | Status::Refunded | Status::Declined));
                    continue;
                };
                match action {
                    Action::Capture => {
                        prop_assert_eq!(status, Status::Authorized);
                        taken = true;
                        captures += 1;
                    }
                    Action::Refund => {
                        prop_assert!(taken);
                        taken = false;
                        refunds += 1;
                    }
                    Action::Void => prop_assert!(!taken),
                    Action::Nothing => {}
                }
                // The same command again asks the provider nothing.
                prop_assert_eq!(transition(next, command).map(|(_, action)| action), Ok(Action::Nothing));
                status = next;
            }
            prop_assert!(captures <= 1 && refunds <= 1);
            // The money is taken exactly when the payment says captured.
            prop_assert_eq!(taken, status == Status::Captured);
        }
    }
}
