"""Request services: a paid generation from hold to settlement, async tasks, Idempotency-Key,
writes that must land, where money is reported, and the reports admins read."""
