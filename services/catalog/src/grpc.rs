//! The catalog's gRPC API (`proto/keel/catalog/v1/catalog.proto`), served on the HTTP port
//! beside the JSON API: what other services ask it, such as orders asking for prices.

use keel_runtime::Problem;
use tonic::{Request, Response, Status};

use crate::Catalog;
use crate::domain::Sku;

/// The code generated from the .proto file.
#[allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]
pub mod proto {
    tonic::include_proto!("keel.catalog.v1");
}

use proto::catalog_server::{Catalog as CatalogApi, CatalogServer};
use proto::{Price, PricesReply, PricesRequest};

/// The most SKUs one `Prices` call may ask about.
pub const MAX_SKUS: usize = 100;

/// The gRPC service, over the same use cases as the JSON API.
pub struct CatalogGrpc {
    catalog: Catalog,
}

impl CatalogGrpc {
    pub fn server(catalog: Catalog) -> CatalogServer<Self> {
        // 100 SKUs of 32 bytes fit many times over; a hostile message is refused before
        // it is decoded into memory.
        CatalogServer::new(Self { catalog }).max_decoding_message_size(16 * 1024)
    }
}

#[tonic::async_trait]
impl CatalogApi for CatalogGrpc {
    async fn prices(
        &self,
        request: Request<PricesRequest>,
    ) -> Result<Response<PricesReply>, Status> {
        let mut skus = request.into_inner().skus;
        // Each SKU once, in the order asked.
        let mut seen = std::collections::HashSet::new();
        skus.retain(|sku| seen.insert(sku.clone()));
        if skus.len() > MAX_SKUS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_SKUS} SKUs per call, not {}",
                skus.len()
            )));
        }
        let mut prices = Vec::with_capacity(skus.len());
        for sku in skus {
            let sku: Sku = sku.parse().map_err(|error: crate::domain::SkuError| {
                Status::invalid_argument(error.to_string())
            })?;
            let product = self.catalog.product(&sku).await.map_err(|error| {
                let problem: Problem = crate::api::problem(error);
                Status::unavailable(problem.detail.unwrap_or_default())
            })?;
            if let Some(product) = product {
                prices.push(Price {
                    sku: product.sku.to_string(),
                    minor: product.price.minor(),
                    currency: product.price.currency().to_string(),
                    for_sale: product.active,
                });
            }
        }
        Ok(Response::new(PricesReply { prices }))
    }
}
