-- The SQLite engine's statements, by name (gateway/store/queries.py reads this file once).
-- The schema is in the numbered migrations beside it; the money moves in its triggers.
-- One process owns the file, so the fleet's statements (heartbeats, shared limits, the task
-- poll cache) have no SQLite version: the store keeps those in the process.

-- reserve --
-- The reservation is this one statement: the hold's BEFORE INSERT trigger checks the team's
-- budget (and a capped key's), moves the amount into reserved or raises budget_exceeded /
-- key_budget_exceeded; the team's usage after it comes back.
INSERT INTO holds (request_id, team, period, created_at, endpoint, mode, quality, n, unit_price,
                   amount, budget, fingerprint, key_id, key_fp, key_budget, end_user)
VALUES (:request_id, :team, :period, :created_at, :endpoint, :mode, :quality, :n, :unit_price,
        :amount, :budget, :fingerprint, :key_id, :key_fp, :key_budget, :end_user)
RETURNING
    (SELECT u.spent FROM usage u WHERE u.team = :team AND u.period = :period) AS spent,
    (SELECT u.reserved FROM usage u WHERE u.team = :team AND u.period = :period) AS reserved,
    (SELECT u.uncertain FROM usage u WHERE u.team = :team AND u.period = :period) AS uncertain,
    (SELECT u.overrun FROM usage u WHERE u.team = :team AND u.period = :period) AS overrun

-- usage --
SELECT spent, reserved, uncertain, overrun FROM usage WHERE team = :team AND period = :period

-- key_usage --
SELECT spent, reserved, uncertain, overrun FROM key_usage
 WHERE team = :team AND key_fp = :key_fp AND period = :period

-- settle --
-- Once per hold: a second settlement of the same request changes nothing (0 rows).
INSERT INTO settlements (request_id, state, amount, overrun, images, upstream_id, reason, result,
                         settled_at, upstream, unit_price)
SELECT :request_id, :state, :amount, :overrun, :images, :upstream_id, :reason, :result,
       :settled_at, :upstream, :unit_price
 WHERE EXISTS (SELECT 1 FROM holds WHERE request_id = :request_id)
    ON CONFLICT (request_id) DO NOTHING

-- resolve --
-- Once per uncertain settlement: a second resolution changes nothing (0 rows).
INSERT INTO resolutions (request_id, state, images, amount, overrun, reason, actor, upstream_id,
                         resolved_at, upstream)
VALUES (:request_id, :state, :images, :amount, :overrun, :reason, :actor, :upstream_id,
        :resolved_at, :upstream)
    ON CONFLICT (request_id) DO NOTHING

-- insert_correction --
-- A closed entry that turns out to have been served: append-only, counted in spent by the
-- schema, which refuses one of an entry not closed or beyond the images held.
INSERT INTO corrections (request_id, images, amount, reason, upstream_id, corrected_at, upstream)
VALUES (:request_id, :images, :amount, :reason, :upstream_id, :corrected_at, :upstream)

-- log_resolution --
-- Whoever inserts this row first writes the resolution's access-log line.
INSERT INTO resolution_log (request_id, logged_at) VALUES (:request_id, :logged_at)
    ON CONFLICT DO NOTHING

-- lock_entry --
-- One writer: every decision about an entry is serialized already.
SELECT 1 AS locked

-- hold_instance_gone --
-- One process per file: a hold's gateway is never known to be gone here (a start turns
-- whatever its last run left in flight uncertain by itself).
SELECT 0 AS gone

-- insert_expiry --
INSERT INTO expiries (request_id, actor, expired_at) VALUES (:request_id, :actor, :expired_at)

-- unlogged_expiries --
SELECT l.*, e.actor AS expired_by FROM ledger l JOIN expiries e USING (request_id)
 WHERE e.logged_at IS NULL ORDER BY e.expired_at

-- claim_expiry_log --
-- Whoever sets it first writes the expiry's access-log line.
UPDATE expiries SET logged_at = :logged_at WHERE request_id = :request_id AND logged_at IS NULL

-- unlogged_resolutions --
SELECT * FROM ledger
 WHERE resolved_state IS NOT NULL
   AND request_id NOT IN (SELECT request_id FROM resolution_log)
 ORDER BY resolved_at

-- entry --
SELECT * FROM ledger WHERE request_id = :request_id

-- entry_by_any_id --
SELECT * FROM ledger
 WHERE request_id = :entry_id OR upstream_id = :entry_id OR task_id = :entry_id
 ORDER BY created_at LIMIT 1

-- entries --
SELECT * FROM ledger
 WHERE created_at >= :since AND created_at < :until
   AND (:team IS NULL OR team = :team) AND (:state IS NULL OR state = :state)
 ORDER BY created_at DESC, request_id DESC
 LIMIT coalesce(:limit, -1)

-- hold_state --
SELECT l.state, s.result FROM ledger l LEFT JOIN settlements s USING (request_id)
 WHERE l.request_id = :request_id

-- latest_attempt --
-- One process per file: no other instance can be working on it (live is 0).
SELECT l.request_id, l.state, s.result, l.task_id, 0 AS live
  FROM ledger l LEFT JOIN settlements s USING (request_id) JOIN holds h USING (request_id)
 WHERE h.team = :team AND h.fingerprint = :fingerprint AND h.created_at >= :since
 ORDER BY h.created_at DESC LIMIT 1

-- in_flight_holds --
-- Unsettled holds that only their request could settle: no task, or one never to be polled
-- again while its hold is open (what a crash could leave between recording an instant task and
-- settling it, before the two were one transaction). 1e18 is the store's NEVER.
SELECT h.request_id, h.amount FROM holds h
  LEFT JOIN settlements s USING (request_id)
  LEFT JOIN tasks t ON t.request_id = h.request_id
 WHERE s.request_id IS NULL
   AND (t.task_id IS NULL OR (t.status = 'pending' AND t.next_poll_at >= 1e18))
 ORDER BY h.created_at

-- report --
-- Spend of a team in [since, until) grouped by :by (key, end_user, quality, day, or NULL: one
-- group); a key's group carries the identity it last had.
SELECT g.grp, g.spent, g.reserved, g.uncertain, g.overrun, g.images, g.requests, g.last_at,
       CASE WHEN :by = 'key' THEN (SELECT h.key_id FROM holds h WHERE h.key_fp = g.grp
                                    ORDER BY h.created_at DESC LIMIT 1) END AS key_id
  FROM (SELECT CASE :by WHEN 'key' THEN key_fp
                        WHEN 'end_user' THEN end_user
                        WHEN 'quality' THEN quality
                        WHEN 'day' THEN local_day(created_at, :tz)
                        WHEN 'upstream' THEN upstream END AS grp,
               SUM(charged) AS spent,
               SUM(CASE WHEN settled_state = 'held' THEN held ELSE 0 END) AS reserved,
               SUM(CASE WHEN settled_state = 'uncertain' AND resolved_state IS NULL
                        THEN settled ELSE 0 END) AS uncertain,
               SUM(overrun + COALESCE(resolved_overrun, 0)) AS overrun,
               SUM(CASE WHEN state = 'captured' THEN COALESCE(resolved_images, images)
                        ELSE 0 END + corrected_images) AS images,
               COUNT(*) AS requests, MAX(created_at) AS last_at
          FROM ledger
         WHERE team = :team AND created_at >= :since AND created_at < :until
         GROUP BY 1) g
 ORDER BY 1

-- key_last_used --
SELECT key_fp, MAX(created_at) AS last_at FROM holds WHERE key_fp IS NOT NULL GROUP BY key_fp

-- verify --
-- Every counter beside the sums of its entries, in one statement (one snapshot): the team
-- counters, the key counters (scope "team key_fp"), and how many holds there are.
SELECT 'stored' AS kind, team AS scope, period, spent, reserved, uncertain, overrun FROM usage
UNION ALL
SELECT 'summed', team, period, SUM(charged),
       SUM(CASE WHEN settled_state = 'held' THEN held ELSE 0 END),
       SUM(CASE WHEN settled_state = 'uncertain' AND resolved_state IS NULL
                THEN settled ELSE 0 END),
       SUM(overrun + COALESCE(resolved_overrun, 0))
  FROM ledger GROUP BY team, period
UNION ALL
SELECT 'key stored', team || ' ' || key_fp, period, spent, reserved, uncertain, overrun
  FROM key_usage
UNION ALL
SELECT 'key summed', team || ' ' || key_fp, period, SUM(charged),
       SUM(CASE WHEN settled_state = 'held' THEN held ELSE 0 END),
       SUM(CASE WHEN settled_state = 'uncertain' AND resolved_state IS NULL
                THEN settled ELSE 0 END),
       SUM(overrun + COALESCE(resolved_overrun, 0))
  FROM ledger WHERE key_fp IS NOT NULL GROUP BY team, key_fp, period
UNION ALL
SELECT 'count', '', '', COUNT(*), 0, 0, 0 FROM holds

-- insert_task --
-- A task id the ledger already has changes nothing (0 rows): the store says DuplicateTask.
INSERT INTO tasks (task_id, team, request_id, created_at, status, result, next_poll_at,
                   upstream, unit_price)
VALUES (:task_id, :team, :request_id, :created_at, :status, :result, :next_poll_at, :upstream,
        :unit_price)
    ON CONFLICT (task_id) DO NOTHING

-- task --
SELECT t.task_id, t.team, t.request_id, t.created_at, t.status, t.result, t.polls,
       t.next_poll_at, h.amount, h.unit_price, h.quality, h.n, s.state AS settled,
       r.request_id IS NOT NULL AS resolved, t.upstream, t.unit_price AS upstream_unit_price
  FROM tasks t JOIN holds h USING (request_id)
  LEFT JOIN settlements s USING (request_id) LEFT JOIN resolutions r USING (request_id)
 WHERE t.task_id = :task_id

-- due_tasks --
-- Pending tasks due for a poll, whatever their money: one an admin resolved may still complete,
-- and what it delivered is then recorded. One process per file: nothing to claim against
-- (:lease_until is the fleet's).
SELECT t.task_id, t.team, t.request_id, t.created_at, t.status, t.result, t.polls,
       t.next_poll_at, h.amount, h.unit_price, h.quality, h.n, s.state AS settled,
       r.request_id IS NOT NULL AS resolved, t.upstream, t.unit_price AS upstream_unit_price
  FROM tasks t JOIN holds h USING (request_id)
  LEFT JOIN settlements s USING (request_id) LEFT JOIN resolutions r USING (request_id)
 WHERE t.status = 'pending' AND t.next_poll_at <= :now
 ORDER BY t.next_poll_at LIMIT :limit

-- next_task_due --
SELECT MIN(next_poll_at) AS due FROM tasks WHERE status = 'pending'

-- unsettled_task_count --
SELECT COUNT(*) AS tasks FROM tasks t LEFT JOIN settlements s USING (request_id)
 WHERE s.request_id IS NULL

-- reschedule_task --
UPDATE tasks SET polls = polls + 1, next_poll_at = :next_poll_at WHERE task_id = :task_id

-- finish_task --
-- The first terminal answer only (1 row); a later one changes nothing.
UPDATE tasks SET status = :status, result = :result, polls = polls + 1
 WHERE task_id = :task_id AND status = 'pending'

-- expire_idempotency_key --
DELETE FROM idempotency WHERE team = :team AND key = :key AND created_at < :before

-- claim_idempotency_key --
INSERT INTO idempotency (team, key, fingerprint, request_id, created_at)
VALUES (:team, :key, :fingerprint, :request_id, :created_at)
    ON CONFLICT DO NOTHING

-- idempotency_key --
-- One process per file: no other live instance holds a claim (live is 0).
SELECT fingerprint, request_id, status, body, headers, 0 AS live FROM idempotency
 WHERE team = :team AND key = :key

-- store_idempotent_outcome --
UPDATE idempotency SET status = :status, body = :body, headers = :headers
 WHERE team = :team AND key = :key

-- release_idempotency_key --
DELETE FROM idempotency WHERE team = :team AND key = :key AND status IS NULL

-- purge_idempotency --
DELETE FROM idempotency WHERE created_at < :before

-- schema_meta --
-- What the database records about its schema (gateway/store/migrations.py), read afresh: a
-- newer release may migrate the database while this one runs.
SELECT key, value FROM meta WHERE key IN ('schema_version', 'schema_step', 'min_release')

-- position --
-- How far the ledger has gone (core.restore.Position), in one statement: one snapshot.
SELECT (SELECT COUNT(*) FROM holds) AS holds, (SELECT COUNT(*) FROM settlements) AS settlements,
       (SELECT COUNT(*) FROM resolutions) AS resolutions,
       (SELECT MAX(created_at) FROM holds) AS last_at,
       (SELECT COALESCE(SUM(spent), 0) FROM usage) AS spent

-- set_meta --
INSERT OR REPLACE INTO meta (key, value) VALUES (:key, :value)

-- restores --
SELECT key, value FROM meta WHERE key LIKE :prefix ORDER BY key

-- ready_probe --
INSERT OR REPLACE INTO meta (key, value) VALUES ('ready_probe', :at)

-- tables --
SELECT name FROM sqlite_master WHERE type = 'table'

-- daily_spend --
-- A team's spend in [since, until) per local day (in :tz), key and quality, corrections
-- included: the console's charts. On the base tables, not the ledger view: nothing else of the
-- view's joins is needed, and this scans a whole month of a busy team.
SELECT local_day(h.created_at, :tz) AS day, h.key_fp, MAX(h.key_id) AS key_id, h.quality,
       SUM(CASE WHEN r.state = 'captured' THEN r.amount + r.overrun WHEN r.state IS NOT NULL
                THEN 0 WHEN s.state = 'captured' THEN s.amount + s.overrun ELSE 0 END
           + COALESCE(c.amount, 0)) AS spent,
       SUM(CASE WHEN COALESCE(r.state, s.state) = 'captured' THEN COALESCE(r.images, s.images)
                ELSE 0 END + COALESCE(c.images, 0)) AS images
  FROM holds h JOIN settlements s USING (request_id) LEFT JOIN resolutions r USING (request_id)
  LEFT JOIN (SELECT request_id, SUM(images) AS images, SUM(amount) AS amount FROM corrections
              GROUP BY request_id) c ON c.request_id = h.request_id
 WHERE h.team = :team AND h.created_at >= :since AND h.created_at < :until
 GROUP BY 1, 2, 4 HAVING spent > 0 ORDER BY 1

-- stored_results --
-- The stored answer (a sync body, or the task's) of each of :request_ids (a JSON array) that was
-- served: captured, or corrected later.
SELECT l.request_id, COALESCE(s.result, t.result) AS result FROM ledger l
  LEFT JOIN settlements s USING (request_id) LEFT JOIN tasks t ON t.request_id = l.request_id
 WHERE l.request_id IN (SELECT value FROM json_each(:request_ids))
   AND (l.state = 'captured' OR l.corrected_images > 0)

-- open_tasks --
-- A team's tasks still pending upstream, oldest first.
SELECT t.task_id, t.team, t.request_id, t.created_at, t.status, t.result, t.polls,
       t.next_poll_at, h.amount, h.unit_price, h.quality, h.n, s.state AS settled,
       r.request_id IS NOT NULL AS resolved, t.upstream, t.unit_price AS upstream_unit_price
  FROM tasks t JOIN holds h USING (request_id)
  LEFT JOIN settlements s USING (request_id) LEFT JOIN resolutions r USING (request_id)
 WHERE t.team = :team AND t.status = 'pending'
 ORDER BY t.created_at LIMIT :limit

-- result_add --
-- One image of a paid result, not stored yet (the result store's index, migration 0009); a row
-- already there stays as it is.
INSERT INTO result_images (request_id, position, team, upstream, url, url_sha256, reuse_key, images, created_at,
       digest, bytes, kind, stored_at, deleted_at)
VALUES (:request_id, :position, :team, :upstream, :url, :url_sha256, :reuse_key, :images,
        :created_at, :digest, :bytes, :kind, :stored_at, :deleted_at)
ON CONFLICT (request_id, position) DO NOTHING

-- result_stored --
-- The image's bytes are in the directory; nothing if it was deleted meanwhile.
UPDATE result_images SET digest = :digest, bytes = :bytes, kind = :kind, stored_at = :stored_at
 WHERE request_id = :request_id AND position = :position AND deleted_at IS NULL

-- result_of_request --
SELECT request_id, position, team, upstream, url, url_sha256, reuse_key, images, created_at,
       digest, bytes, kind, stored_at, deleted_at
  FROM result_images WHERE request_id = :request_id ORDER BY position

-- result_by_url --
-- The newest image with that URL (by the URL's SHA-256), deleted included.
SELECT request_id, position, team, upstream, url, url_sha256, reuse_key, images, created_at,
       digest, bytes, kind, stored_at, deleted_at
  FROM result_images WHERE url_sha256 = :url_sha256 ORDER BY created_at DESC LIMIT 1

-- result_reusable --
-- The team's newest request since :since with that key whose every image is stored, none deleted.
SELECT request_id FROM result_images
 WHERE team = :team AND reuse_key = :reuse_key AND created_at >= :since
 GROUP BY request_id, images, created_at
HAVING COUNT(*) = images AND COUNT(digest) = images AND COUNT(deleted_at) = 0
 ORDER BY created_at DESC LIMIT 1

-- result_choose --
-- The live images of a deletion: each of request, team and age narrows it unless NULL.
SELECT request_id, position, team, upstream, url, url_sha256, reuse_key, images, created_at,
       digest, bytes, kind, stored_at, deleted_at
  FROM result_images
 WHERE deleted_at IS NULL
   AND (:request_id IS NULL OR request_id = :request_id)
   AND (:team IS NULL OR team = :team)
   AND (:before IS NULL OR created_at < :before)

-- result_delete --
UPDATE result_images SET deleted_at = :deleted_at
 WHERE deleted_at IS NULL AND request_id = :request_id AND position = :position

-- result_live_digests --
-- Those of :digests (a JSON array) a live image still refers to.
SELECT DISTINCT digest FROM result_images
 WHERE deleted_at IS NULL AND digest IN (SELECT value FROM json_each(:digests))

-- result_deleted_since --
SELECT DISTINCT digest FROM result_images
 WHERE deleted_at >= :since AND digest IS NOT NULL ORDER BY digest

-- result_totals --
-- Live stored images, and the bytes of their files: each digest counted once.
SELECT (SELECT COUNT(*) FROM result_images WHERE deleted_at IS NULL AND digest IS NOT NULL)
           AS images,
       (SELECT COALESCE(SUM(size), 0) FROM
          (SELECT MAX(bytes) AS size FROM result_images
            WHERE deleted_at IS NULL AND digest IS NOT NULL GROUP BY digest) d) AS bytes

-- result_oldest --
-- Live stored images, oldest first: what goes first beyond max_gb.
SELECT request_id, position, team, upstream, url, url_sha256, reuse_key, images, created_at,
       digest, bytes, kind, stored_at, deleted_at
  FROM result_images WHERE deleted_at IS NULL AND digest IS NOT NULL
 ORDER BY created_at, request_id, position LIMIT :limit

-- result_unstored --
-- Live images indexed since :since whose bytes were never stored (a process stopped while
-- keeping them), oldest first.
SELECT request_id, position, team, upstream, url, url_sha256, reuse_key, images, created_at,
       digest, bytes, kind, stored_at, deleted_at
  FROM result_images WHERE deleted_at IS NULL AND digest IS NULL AND created_at >= :since
 ORDER BY created_at, request_id, position LIMIT :limit
