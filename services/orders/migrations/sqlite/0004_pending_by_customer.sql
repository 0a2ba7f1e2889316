-- A customer's orders being placed, counted on every new order (the cap on orders in
-- progress): only pending rows are indexed, so the count reads those and nothing else.
CREATE INDEX orders_pending_by_customer ON orders (customer) WHERE status = 'pending';
