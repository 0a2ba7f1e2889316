//! The inventory's domain: stock counts that keep `on_hand = available + reserved` and
//! never go negative, and reservations whose commands are idempotent. No I/O here.

mod reservation;
mod stock;

pub use keel_shop_kernel::{Quantity, Sku, SkuError};
pub use reservation::{
    Command, Line, Lines, LinesError, MAX_LINES, ReservationId, Status, TransitionError, transition,
};
pub use stock::{Effect, MAX_ON_HAND, Stock, StockError};

/// Reserves every line of `lines` from `stocks` (the same SKUs, in the same order), or
/// none of them: on an error the stocks are as they were.
pub fn reserve(stocks: &mut [Stock], lines: &Lines) -> Result<(), StockError> {
    let mut changed = stocks.to_vec();
    for (stock, line) in changed.iter_mut().zip(lines.iter()) {
        debug_assert_eq!(stock.sku(), &line.sku);
        stock.reserve(line.quantity)?;
    }
    stocks.clone_from_slice(&changed);
    Ok(())
}

#[cfg(test)]
mod properties {
    //! A model of a warehouse driven by random commands: whatever happens, the counts
    //! hold their invariant and stock is conserved.

    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u8, Vec<(u8, u16)>),
        Apply(u8, Command),
        Restock(u8, u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..8u8, prop::collection::vec((0..4u8, 1..20u16), 1..4))
                .prop_map(|(id, lines)| Op::Reserve(id, lines)),
            (
                0..8u8,
                prop_oneof![
                    Just(Command::Commit),
                    Just(Command::Release),
                    Just(Command::Expire)
                ]
            )
                .prop_map(|(id, command)| Op::Apply(id, command)),
            (0..4u8, 0..50u16).prop_map(|(sku, on_hand)| Op::Restock(sku, on_hand)),
        ]
    }

    fn sku(index: u8) -> Sku {
        format!("SKU-{index}").parse().unwrap()
    }

    proptest! {
        #[test]
        fn counts_hold_and_stock_is_conserved(
            initial in prop::collection::vec(0..40u32, 4),
            ops in prop::collection::vec(op(), 0..60),
        ) {
            let mut stocks: BTreeMap<Sku, Stock> = initial
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let mut stock = Stock::empty(sku(i as u8));
                    stock.set_on_hand(*n).unwrap();
                    (sku(i as u8), stock)
                })
                .collect();
            let mut reservations: BTreeMap<u8, (Status, Lines)> = BTreeMap::new();
            // Units brought in by stocktakes (negative when counted down), per SKU.
            let mut brought: BTreeMap<Sku, i64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Reserve(id, lines) => {
                        let lines: Vec<Line> = lines
                            .into_iter()
                            .map(|(s, q)| Line { sku: sku(s), quantity: Quantity::new(q.into()).unwrap() })
                            .collect();
                        let Ok(lines) = Lines::new(lines) else { continue };
                        if reservations.contains_key(&id) {
                            continue;
                        }
                        let mut picked: Vec<Stock> =
                            lines.iter().map(|line| stocks[&line.sku].clone()).collect();
                        let before = picked.clone();
                        match reserve(&mut picked, &lines) {
                            Ok(()) => {
                                for stock in picked {
                                    stocks.insert(stock.sku().clone(), stock);
                                }
                                reservations.insert(id, (Status::Held, lines));
                            }
                            // All or nothing.
                            Err(_) => prop_assert_eq!(picked, before),
                        }
                    }
                    Op::Apply(id, command) => {
                        let Some((status, lines)) = reservations.get_mut(&id) else { continue };
                        if let Ok((next, effect)) = transition(*status, command) {
                            if let Some(effect) = effect {
                                for line in lines.iter() {
                                    let stock = stocks.get_mut(&line.sku).unwrap();
                                    prop_assert!(stock.apply(effect, line.quantity).is_ok());
                                }
                            }
                            *status = next;
                        }
                    }
                    Op::Restock(s, on_hand) => {
                        let stock = stocks.get_mut(&sku(s)).unwrap();
                        let before = i64::from(stock.on_hand());
                        if stock.set_on_hand(on_hand.into()).is_ok() {
                            *brought.entry(sku(s)).or_default() += i64::from(on_hand) - before;
                        }
                    }
                }
            }
            for (i, n) in initial.iter().enumerate() {
                let stock = &stocks[&sku(i as u8)];
                let held: u32 = reservations.values()
                    .filter(|(status, _)| *status == Status::Held)
                    .flat_map(|(_, lines)| lines.iter())
                    .filter(|line| line.sku == *stock.sku())
                    .map(|line| line.quantity.get())
                    .sum();
                let sold: u32 = reservations.values()
                    .filter(|(status, _)| *status == Status::Committed)
                    .flat_map(|(_, lines)| lines.iter())
                    .filter(|line| line.sku == *stock.sku())
                    .map(|line| line.quantity.get())
                    .sum();
                prop_assert_eq!(stock.on_hand(), stock.available() + stock.reserved());
                prop_assert_eq!(stock.reserved(), held);
                prop_assert_eq!(
                    i64::from(*n) + brought.get(stock.sku()).copied().unwrap_or(0),
                    i64::from(stock.on_hand()) + i64::from(sold)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_refuses_what_would_break_it() {
        let sku: Sku = "MUG".parse().unwrap();
        let one = Quantity::new(1).unwrap();
        let mut stock = Stock::empty(sku.clone());
        assert!(matches!(
            stock.reserve(one),
            Err(StockError::OutOfStock { available: 0, .. })
        ));
        stock.set_on_hand(2).unwrap();
        stock.reserve(Quantity::new(2).unwrap()).unwrap();
        assert_eq!((stock.available(), stock.reserved()), (0, 2));
        assert!(matches!(
            stock.set_on_hand(1),
            Err(StockError::BelowReserved { reserved: 2, .. })
        ));
        assert_eq!(stock.set_on_hand(MAX_ON_HAND + 1), Err(StockError::TooMany));
        stock.apply(Effect::Deduct, one).unwrap();
        assert_eq!((stock.on_hand(), stock.reserved()), (1, 1));
        stock.apply(Effect::Unreserve, one).unwrap();
        assert!(matches!(
            stock.apply(Effect::Unreserve, one),
            Err(StockError::Inconsistent { .. })
        ));
        assert!(Stock::from_counts(sku.clone(), 1, 2).is_err());

        // Returned units are taken back even above what a stocktake may count, and such
        // a count reads back.
        let mut full = Stock::empty(sku.clone());
        full.set_on_hand(MAX_ON_HAND).unwrap();
        full.apply(Effect::Restock, Quantity::new(5).unwrap())
            .unwrap();
        assert_eq!(full.on_hand(), MAX_ON_HAND + 5);
        assert_eq!(Stock::from_counts(sku, MAX_ON_HAND + 5, 0), Ok(full));
    }
}
