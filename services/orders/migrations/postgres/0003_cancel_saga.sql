-- The cancellation saga of a cancelled (or cancelling) order, whose steps GET shows.
ALTER TABLE orders ADD COLUMN cancel_saga_id TEXT;
