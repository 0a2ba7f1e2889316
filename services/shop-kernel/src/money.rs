//! Money: an amount in minor units (cents) of one currency. Never negative, never mixed
//! across currencies, never a float.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An ISO 4217 currency code of a currency in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

/// ISO 4217's codes in use (the list of 2025), sorted for a binary search; of the `X`
/// codes only the currencies (XAF, XCD, XCG, XOF, XPF): precious metals, the test code
/// and "no currency" are nothing a shop is paid in.
const ISO_4217: &[[u8; 3]] = &[
    *b"AED", *b"AFN", *b"ALL", *b"AMD", *b"ANG", *b"AOA", *b"ARS", *b"AUD", *b"AWG", *b"AZN",
    *b"BAM", *b"BBD", *b"BDT", *b"BGN", *b"BHD", *b"BIF", *b"BMD", *b"BND", *b"BOB", *b"BOV",
    *b"BRL", *b"BSD", *b"BTN", *b"BWP", *b"BYN", *b"BZD", *b"CAD", *b"CDF", *b"CHE", *b"CHF",
    *b"CHW", *b"CLF", *b"CLP", *b"CNY", *b"COP", *b"COU", *b"CRC", *b"CUP", *b"CVE", *b"CZK",
    *b"DJF", *b"DKK", *b"DOP", *b"DZD", *b"EGP", *b"ERN", *b"ETB", *b"EUR", *b"FJD", *b"FKP",
    *b"GBP", *b"GEL", *b"GHS", *b"GIP", *b"GMD", *b"GNF", *b"GTQ", *b"GYD", *b"HKD", *b"HNL",
    *b"HTG", *b"HUF", *b"IDR", *b"ILS", *b"INR", *b"IQD", *b"IRR", *b"ISK", *b"JMD", *b"JOD",
    *b"JPY", *b"KES", *b"KGS", *b"KHR", *b"KMF", *b"KPW", *b"KRW", *b"KWD", *b"KYD", *b"KZT",
    *b"LAK", *b"LBP", *b"LKR", *b"LRD", *b"LSL", *b"LYD", *b"MAD", *b"MDL", *b"MGA", *b"MKD",
    *b"MMK", *b"MNT", *b"MOP", *b"MRU", *b"MUR", *b"MVR", *b"MWK", *b"MXN", *b"MXV", *b"MYR",
    *b"MZN", *b"NAD", *b"NGN", *b"NIO", *b"NOK", *b"NPR", *b"NZD", *b"OMR", *b"PAB", *b"PEN",
    *b"PGK", *b"PHP", *b"PKR", *b"PLN", *b"PYG", *b"QAR", *b"RON", *b"RSD", *b"RUB", *b"RWF",
    *b"SAR", *b"SBD", *b"SCR", *b"SDG", *b"SEK", *b"SGD", *b"SHP", *b"SLE", *b"SLL", *b"SOS",
    *b"SRD", *b"SSP", *b"STN", *b"SVC", *b"SYP", *b"SZL", *b"THB", *b"TJS", *b"TMT", *b"TND",
    *b"TOP", *b"TRY", *b"TTD", *b"TWD", *b"TZS", *b"UAH", *b"UGX", *b"USD", *b"USN", *b"UYI",
    *b"UYU", *b"UYW", *b"UZS", *b"VED", *b"VES", *b"VND", *b"VUV", *b"WST", *b"XAF", *b"XCD",
    *b"XCG", *b"XOF", *b"XPF", *b"YER", *b"ZAR", *b"ZMW", *b"ZWG",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("a currency is an ISO 4217 code in use (EUR, USD, …), not {0:?}")]
    Currency(String),
    #[error("an amount is zero or more minor units, not {0}")]
    Negative(i64),
    #[error("cannot add {0} and {1}: different currencies")]
    Mixed(Currency, Currency),
    #[error("the amount overflows")]
    Overflow,
}

impl FromStr for Currency {
    type Err = MoneyError;

    fn from_str(code: &str) -> Result<Self, MoneyError> {
        match code.as_bytes() {
            &[a, b, c] if ISO_4217.binary_search(&[a, b, c]).is_ok() => Ok(Self([a, b, c])),
            _ => Err(MoneyError::Currency(code.chars().take(16).collect())),
        }
    }
}

impl Currency {
    pub fn as_str(&self) -> &str {
        // Three ASCII letters, checked on construction.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount of one currency, in its minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    minor: i64,
    currency: Currency,
}

impl Money {
    pub fn new(minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        if minor < 0 {
            return Err(MoneyError::Negative(minor));
        }
        Ok(Self { minor, currency })
    }

    pub fn minor(&self) -> i64 {
        self.minor
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// The sum, in the same currency.
    pub fn checked_add(self, other: Self) -> Result<Self, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::Mixed(self.currency, other.currency));
        }
        let minor = self
            .minor
            .checked_add(other.minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Self { minor, ..self })
    }

    /// `quantity` times this amount.
    pub fn times(self, quantity: u32) -> Result<Self, MoneyError> {
        let minor = self
            .minor
            .checked_mul(i64::from(quantity))
            .ok_or(MoneyError::Overflow)?;
        Ok(Self { minor, ..self })
    }
}

/// The wire shape: `{"minor": 1250, "currency": "EUR"}`, checked when read.
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct MoneyWire {
    /// Minor units (cents): 1250 is 12.50.
    minor: i64,
    /// ISO 4217.
    currency: String,
}

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        MoneyWire {
            minor: self.minor,
            currency: self.currency.to_string(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = MoneyWire::deserialize(deserializer)?;
        let currency = wire.currency.parse().map_err(serde::de::Error::custom)?;
        Money::new(wire.minor, currency).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Money {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Money".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        MoneyWire::json_schema(generator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(minor: i64) -> Money {
        Money::new(minor, "EUR".parse().unwrap()).unwrap()
    }

    #[test]
    fn currencies_are_three_uppercase_letters() {
        assert_eq!("EUR".parse::<Currency>().unwrap().as_str(), "EUR");
        for bad in ["eur", "EURO", "E1R", "", "€€€"] {
            assert!(bad.parse::<Currency>().is_err(), "{bad}");
        }
    }

    #[test]
    fn amounts_are_never_negative_or_mixed_and_overflow_is_an_error() {
        assert_eq!(
            Money::new(-1, "EUR".parse().unwrap()),
            Err(MoneyError::Negative(-1))
        );
        assert_eq!(eur(250).checked_add(eur(1000)).unwrap(), eur(1250));
        let usd = Money::new(1, "USD".parse().unwrap()).unwrap();
        assert!(matches!(
            eur(1).checked_add(usd),
            Err(MoneyError::Mixed(..))
        ));
        assert_eq!(eur(i64::MAX).checked_add(eur(1)), Err(MoneyError::Overflow));
        assert_eq!(eur(1250).times(3).unwrap(), eur(3750));
        assert_eq!(eur(i64::MAX).times(2), Err(MoneyError::Overflow));
    }

    #[test]
    fn the_currency_table_is_sorted_for_its_search() {
        assert!(ISO_4217.windows(2).all(|pair| pair[0] < pair[1]));
        for code in ["EUR", "USD", "JPY", "XOF", "CLF"] {
            assert_eq!(code.parse::<Currency>().unwrap().as_str(), code);
        }
    }

    #[test]
    fn money_round_trips_as_json_and_bad_json_is_refused() {
        let json = serde_json::to_string(&eur(1250)).unwrap();
        assert_eq!(json, r#"{"minor":1250,"currency":"EUR"}"#);
        assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), eur(1250));
        for bad in [
            r#"{"minor":-5,"currency":"EUR"}"#,
            r#"{"minor":5,"currency":"euro"}"#,
            r#"{"minor":5,"currency":"ZZZ"}"#,
            r#"{"minor":5,"currency":"XTS"}"#,
            r#"{"minor":5.5,"currency":"EUR"}"#,
            r#"{"minor":5,"currency":"EUR","extra":1}"#,
        ] {
            assert!(serde_json::from_str::<Money>(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn eur(minor: i64) -> Money {
        Money::new(minor, "EUR".parse().unwrap()).unwrap()
    }

    proptest! {
        #[test]
        fn addition_is_exact_commutative_and_never_negative(a in 0..i64::MAX / 2, b in 0..i64::MAX / 2) {
            let sum = eur(a).checked_add(eur(b)).unwrap();
            prop_assert_eq!(sum, eur(b).checked_add(eur(a)).unwrap());
            prop_assert_eq!(sum.minor(), a + b);
            prop_assert!(sum.minor() >= 0);
        }

        #[test]
        fn multiplying_is_adding_over_and_over(minor in 0..1_000_000_i64, quantity in 0..50_u32) {
            let mut sum = eur(0);
            for _ in 0..quantity {
                sum = sum.checked_add(eur(minor)).unwrap();
            }
            prop_assert_eq!(eur(minor).times(quantity).unwrap(), sum);
        }

        #[test]
        fn any_amount_either_fits_or_is_refused(minor in any::<i64>(), quantity in any::<u32>()) {
            match Money::new(minor, "EUR".parse().unwrap()) {
                Ok(money) => {
                    prop_assert!(minor >= 0);
                    // Overflow is an error, never a wrapped or negative amount.
                    if let Ok(product) = money.times(quantity) {
                        prop_assert!(product.minor() >= 0);
                        prop_assert_eq!(i128::from(product.minor()), i128::from(minor) * i128::from(quantity));
                    }
                }
                Err(error) => prop_assert_eq!(error, MoneyError::Negative(minor)),
            }
        }
    }
}
