-- Orders can be cancelled once confirmed: cancelling while refunded and restocked.
ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('pending', 'confirmed', 'rejected', 'cancelling', 'cancelled'));
