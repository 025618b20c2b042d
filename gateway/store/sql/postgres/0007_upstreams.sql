-- 0007: several upstreams (issue 23). Each settlement names the upstream that served the request
-- (or was last asked, or held its task) and that upstream's price per image, which may be below
-- the hold's: a hold is priced at the dearest upstream the request could reach, its capture at
-- the one that served it. A task records where it was created: it is polled there, always.
-- NULL everywhere for what came before (one upstream; its price was the hold's). The view is
-- 0006's with the two columns appended. Expand-only: the previous release keeps working.

ALTER TABLE settlements ADD COLUMN upstream TEXT;
ALTER TABLE settlements ADD COLUMN unit_price BIGINT CHECK (unit_price IS NULL OR unit_price >= 0);
ALTER TABLE tasks ADD COLUMN upstream TEXT;
-- An outcome learned late (a resolution by the gateway, a correction) names its upstream too.
ALTER TABLE resolutions ADD COLUMN upstream TEXT;
ALTER TABLE corrections ADD COLUMN upstream TEXT;
ALTER TABLE tasks ADD COLUMN unit_price BIGINT CHECK (unit_price IS NULL OR unit_price >= 0);

DROP VIEW ledger;
CREATE VIEW ledger AS
SELECT h.request_id, h.team, h.period, h.created_at, h.endpoint, h.mode, h.quality, h.n,
       h.unit_price, h.amount AS held,
       COALESCE(r.state, s.state, 'held') AS state,
       COALESCE(s.state, 'held') AS settled_state,
       COALESCE(s.amount, 0) AS settled,
       COALESCE(s.images, 0) AS images,
       COALESCE(s.overrun, 0) AS overrun,
       COALESCE(s.upstream_id, r.upstream_id, c.upstream_id) AS upstream_id,
       t.task_id, s.reason, s.settled_at,
       r.state AS resolved_state, r.images AS resolved_images, r.amount AS resolved_amount,
       r.overrun AS resolved_overrun, r.reason AS resolved_reason, r.actor AS resolved_by,
       r.resolved_at,
       CASE WHEN r.state = 'captured' THEN r.amount + r.overrun
            WHEN r.state IS NOT NULL THEN 0
            WHEN s.state = 'captured' THEN s.amount + s.overrun
            ELSE 0 END + COALESCE(c.amount, 0) AS charged,
       h.key_id, h.key_fp, h.end_user,
       COALESCE(c.images, 0) AS corrected_images,
       COALESCE(c.list, '[]') AS corrections,
       COALESCE(s.upstream, r.upstream, c.upstream, t.upstream) AS upstream,
       COALESCE(s.unit_price, t.unit_price) AS upstream_unit_price
  FROM holds h
  LEFT JOIN settlements s USING (request_id)
  LEFT JOIN resolutions r USING (request_id)
  LEFT JOIN tasks t ON t.request_id = h.request_id
  LEFT JOIN (SELECT request_id, SUM(images)::integer AS images, SUM(amount)::bigint AS amount,
                    MAX(upstream_id) AS upstream_id, MAX(upstream) AS upstream,
                    json_agg(json_build_object('images', images, 'amount', amount,
                                               'reason', reason, 'at', corrected_at)
                             ORDER BY corrected_at)::text AS list
               FROM corrections GROUP BY request_id) c ON c.request_id = h.request_id;
