//! Prices from the catalog, over its gRPC API through the SDK's resilient client
//! (balanced over the registry's instances, retried within a budget, circuit-broken).

use std::collections::BTreeMap;

use keel_catalog::grpc::proto::PricesRequest;
use keel_catalog::grpc::proto::catalog_client::CatalogClient;
use keel_sdk::client::{GrpcChannel, ServiceClient};

use crate::domain::{Money, Price, Sku};

/// The catalog, asked for prices.
#[derive(Clone)]
pub struct Catalog {
    client: CatalogClient<GrpcChannel>,
}

/// The catalog did not answer usably.
#[derive(Debug, thiserror::Error)]
#[error("the catalog cannot give prices: {0}")]
pub struct CatalogError(String);

impl Catalog {
    pub fn new(client: &ServiceClient) -> Self {
        Self {
            client: CatalogClient::new(client.grpc()),
        }
    }

    /// The prices of `skus` (unknown ones left out).
    pub async fn prices(
        &self,
        skus: impl Iterator<Item = &Sku>,
    ) -> Result<BTreeMap<Sku, Price>, CatalogError> {
        let request = PricesRequest {
            skus: skus.map(|sku| sku.to_string()).collect(),
        };
        let reply = self
            .client
            .clone()
            .prices(request)
            .await
            .map_err(|status| CatalogError(status.message().to_owned()))?
            .into_inner();
        reply
            .prices
            .into_iter()
            .map(|price| {
                let invalid = |what: &dyn std::fmt::Display| CatalogError(what.to_string());
                let sku: Sku = price.sku.parse().map_err(|e| invalid(&e))?;
                let currency = price.currency.parse().map_err(|e| invalid(&e))?;
                let amount = Money::new(price.minor, currency).map_err(|e| invalid(&e))?;
                Ok((
                    sku,
                    Price {
                        price: amount,
                        for_sale: price.for_sale,
                    },
                ))
            })
            .collect()
    }
}
