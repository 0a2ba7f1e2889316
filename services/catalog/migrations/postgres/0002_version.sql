-- Each write of a product bumps its version, carried by ProductChanged so that a consumer
-- that hears changes out of order keeps the latest.
ALTER TABLE products ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
