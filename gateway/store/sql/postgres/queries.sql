-- The PostgreSQL engine's statements, by name (gateway/store/queries.py reads this file once
-- and numbers the :named parameters). The schema is in the numbered migrations beside it; the
-- money moves in its triggers. A fleet of instances shares the database: the statements after
-- "the fleet" below have no SQLite version.

-- reserve --
-- The reservation in one round trip: reserve_hold() inserts the hold, whose trigger's
-- conditional UPDATE of the team's usage row (then a capped key's) moves the money or raises
-- budget_exceeded / key_budget_exceeded; the team's usage after it comes back.
SELECT spent, reserved, uncertain, overrun
  FROM reserve_hold(:request_id, :team, :period, :created_at, :endpoint, :mode, :quality, :n,
                    :unit_price, :amount, :budget, :fingerprint, :key_id, :key_fp, :key_budget,
                    :end_user, :instance_id)

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
-- Once per uncertain settlement: a second resolution changes nothing (0 rows), also when it
-- waited for another instance's or an admin's uncommitted one that then committed.
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
-- Held to the end of the transaction: every decision about one entry (resolutions, late
-- outcomes) is serialized. 6766 is the entries' lock space (0x1A6E).
SELECT pg_advisory_xact_lock(6766, hashtext(:request_id))

-- hold_instance_gone --
-- Gone: no row in instances, or one silent for the lease as the reaper counts silence (or no
-- instance at all: a hold copied from SQLite).
SELECT h.instance_id IS NULL OR NOT EXISTS (SELECT 1 FROM instances i
         WHERE i.instance_id = h.instance_id
           AND NOT instance_silent(i.heartbeat_at, :instance_id, :lease_s)) AS gone
  FROM holds h WHERE h.request_id = :request_id

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
   AND (:team::text IS NULL OR team = :team) AND (:state::text IS NULL OR state = :state)
 ORDER BY created_at DESC, request_id DESC
 LIMIT :limit

-- hold_state --
SELECT l.state, s.result FROM ledger l LEFT JOIN settlements s USING (request_id)
 WHERE l.request_id = :request_id

-- latest_attempt --
-- live: the instance that made it still heartbeats (it may still be working on it).
SELECT l.request_id, l.state, s.result, l.task_id,
       EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = h.instance_id
                  AND NOT instance_silent(i.heartbeat_at, :instance_id, :lease_s)) AS live
  FROM ledger l JOIN holds h USING (request_id) LEFT JOIN settlements s USING (request_id)
 WHERE h.team = :team AND h.fingerprint = :fingerprint AND h.created_at >= :since
 ORDER BY h.created_at DESC LIMIT 1

-- report --
-- Spend of a team in [since, until) grouped by :by (key, end_user, quality, day in the IANA
-- zone :tz, or NULL: one group); a key's group carries the identity it last had.
SELECT g.grp, g.spent, g.reserved, g.uncertain, g.overrun, g.images, g.requests, g.last_at,
       CASE WHEN :by::text = 'key' THEN (SELECT h.key_id FROM holds h WHERE h.key_fp = g.grp
                                          ORDER BY h.created_at DESC LIMIT 1) END AS key_id
  FROM (SELECT CASE :by::text
                    WHEN 'key' THEN key_fp
                    WHEN 'end_user' THEN end_user
                    WHEN 'quality' THEN quality
                    WHEN 'day' THEN to_char(to_timestamp(created_at) AT TIME ZONE :tz::text,
                                            'YYYY-MM-DD')
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
-- Pending tasks due for a poll, whatever their money (one an admin resolved may still
-- complete, and what it delivered is then recorded), claimed for this instance until
-- :lease_until: another settler skips the rows this one has locked, and then sees them not due.
WITH due AS (
    SELECT task_id, next_poll_at FROM tasks
     WHERE status = 'pending' AND next_poll_at <= :now
     ORDER BY next_poll_at LIMIT :limit
       FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE tasks SET next_poll_at = :lease_until FROM due WHERE tasks.task_id = due.task_id
    RETURNING tasks.*, due.next_poll_at AS due_at
)
SELECT t.task_id, t.team, t.request_id, t.created_at, t.status, t.result, t.polls,
       t.next_poll_at, h.amount, h.unit_price, h.quality, h.n, s.state AS settled,
       r.request_id IS NOT NULL AS resolved, t.upstream, t.unit_price AS upstream_unit_price
  FROM leased t JOIN holds h USING (request_id)
  LEFT JOIN settlements s USING (request_id) LEFT JOIN resolutions r USING (request_id)
 ORDER BY t.due_at

-- next_task_due --
SELECT MIN(next_poll_at) AS due FROM tasks WHERE status = 'pending'

-- unsettled_task_count --
SELECT COUNT(*) AS tasks FROM tasks t LEFT JOIN settlements s USING (request_id)
 WHERE s.request_id IS NULL

-- reschedule_task --
UPDATE tasks SET polls = polls + 1, next_poll_at = :next_poll_at WHERE task_id = :task_id

-- finish_task --
-- The first terminal answer only (1 row); a later one, from any instance, changes nothing.
UPDATE tasks SET status = :status, result = :result, polls = polls + 1
 WHERE task_id = :task_id AND status = 'pending'

-- expire_idempotency_key --
DELETE FROM idempotency WHERE team = :team AND key = :key AND created_at < :before

-- claim_idempotency_key --
INSERT INTO idempotency (team, key, fingerprint, request_id, created_at, instance_id)
VALUES (:team, :key, :fingerprint, :request_id, :created_at, :instance_id)
    ON CONFLICT DO NOTHING

-- idempotency_key --
-- live: claimed by another instance that still heartbeats (it may still be working on it).
SELECT fingerprint, request_id, status, body, headers,
       EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = d.instance_id
                  AND i.instance_id <> :instance_id
                  AND NOT instance_silent(i.heartbeat_at, :instance_id, :lease_s)) AS live
  FROM idempotency d WHERE team = :team AND key = :key

-- store_idempotent_outcome --
UPDATE idempotency SET status = :status, body = :body, headers = :headers
 WHERE team = :team AND key = :key

-- release_idempotency_key --
DELETE FROM idempotency WHERE team = :team AND key = :key AND status IS NULL

-- purge_idempotency --
DELETE FROM idempotency WHERE created_at < :before

-- the fleet ---------------------------------------------------------------------------------

-- deregister --
DELETE FROM instances WHERE instance_id = :instance_id

-- heartbeat --
-- Registers the instance again if the fleet had taken it for dead (again: true). After a
-- failure to reach the database (:lost) or a gap of half its lease, its view of the fleet
-- starts again (reachable_since).
SELECT instance_heartbeat(:instance_id, :host, :pid, :lease_s, :lost) AS again

-- reap_instances --
-- Instances silent for the lease, counted only while the caller could reach the database
-- (instance_silent, migration 0006), other than the caller: gone from the fleet.
DELETE FROM instances
 WHERE instance_id <> :instance_id AND instance_silent(heartbeat_at, :instance_id, :lease_s)
RETURNING instance_id

-- orphaned_holds --
-- In-flight holds (as on SQLite: no task, or one never to be polled again; 1e18 is the
-- store's NEVER) of instances no longer in the fleet, or made without one; never the caller's.
SELECT h.request_id, h.amount FROM holds h
  LEFT JOIN settlements s USING (request_id)
  LEFT JOIN tasks t ON t.request_id = h.request_id
 WHERE s.request_id IS NULL
   AND (t.task_id IS NULL OR (t.status = 'pending' AND t.next_poll_at >= 1e18))
   AND h.instance_id IS DISTINCT FROM :instance_id
   AND (h.instance_id IS NULL OR h.instance_id NOT IN (SELECT instance_id FROM instances))
 ORDER BY h.created_at

-- drop_orphaned_admissions --
DELETE FROM admissions WHERE instance_id NOT IN (SELECT instance_id FROM instances)

-- lock_scope --
-- Held to the end of the transaction: one admission decision per scope at a time.
SELECT pg_advisory_xact_lock(hashtext(:scope))

-- running --
SELECT COUNT(*) AS running FROM admissions WHERE scope = :scope

-- recent_requests --
SELECT at FROM rate_events WHERE scope = :scope AND at > :since ORDER BY at

-- admit --
INSERT INTO admissions (request_id, scope, instance_id) VALUES (:request_id, :scope, :instance_id)
    ON CONFLICT DO NOTHING

-- count_request --
INSERT INTO rate_events (scope, at) VALUES (:scope, :at)

-- forget_requests --
DELETE FROM rate_events WHERE scope = :scope AND at <= :before

-- release --
DELETE FROM admissions WHERE request_id = :request_id

-- claim_task_poll --
-- This instance fetches the pending task's answer (1 row) unless another is fetching it or
-- fetched it at or after :fresh_since.
UPDATE tasks SET fetching_until = :fetching_until
 WHERE task_id = :task_id AND status = 'pending'
   AND (fetching_until IS NULL OR fetching_until < :now)
   AND (answered_at IS NULL OR answered_at < :fresh_since)

-- task_answer --
-- A pending task's last fetched answer, or a finished task's result.
SELECT CASE WHEN status = 'pending' THEN answer ELSE result END AS answer, answered_at, status
  FROM tasks WHERE task_id = :task_id

-- store_task_answer --
UPDATE tasks SET answer = :answer, answered_at = :answered_at, fetching_until = NULL
 WHERE task_id = :task_id

-- opening ----------------------------------------------------------------------------------

-- lock_migrations --
-- Session-level: one migrating instance at a time, released whatever happens.
SELECT pg_advisory_lock(:key)

-- unlock_migrations --
SELECT pg_advisory_unlock(:key)

-- has_meta --
SELECT to_regclass('public.meta') IS NOT NULL AS present

-- public_tables --
SELECT COUNT(*) AS tables FROM information_schema.tables WHERE table_schema = 'public'

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
INSERT INTO meta (key, value) VALUES (:key, :value)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value

-- restores --
SELECT key, value FROM meta WHERE key LIKE :prefix ORDER BY key

-- daily_spend --
-- A team's spend in [since, until) per local day (in :tz), key and quality, corrections
-- included: the console's charts. On the base tables, not the ledger view: nothing else of the
-- view's joins is needed, and this scans a whole month of a busy team.
SELECT to_char(to_timestamp(h.created_at) AT TIME ZONE :tz::text, 'YYYY-MM-DD') AS day,
       h.key_fp, MAX(h.key_id) AS key_id, h.quality,
       SUM(CASE WHEN r.state = 'captured' THEN r.amount + r.overrun WHEN r.state IS NOT NULL
                THEN 0 WHEN s.state = 'captured' THEN s.amount + s.overrun ELSE 0 END
           + COALESCE(c.amount, 0))::bigint AS spent,
       SUM(CASE WHEN COALESCE(r.state, s.state) = 'captured' THEN COALESCE(r.images, s.images)
                ELSE 0 END + COALESCE(c.images, 0))::bigint AS images
  FROM holds h JOIN settlements s USING (request_id) LEFT JOIN resolutions r USING (request_id)
  LEFT JOIN (SELECT request_id, SUM(images) AS images, SUM(amount) AS amount FROM corrections
              GROUP BY request_id) c ON c.request_id = h.request_id
 WHERE h.team = :team AND h.created_at >= :since::float8 AND h.created_at < :until::float8
 GROUP BY 1, 2, 4
HAVING SUM(CASE WHEN r.state = 'captured' THEN r.amount + r.overrun WHEN r.state IS NOT NULL
                THEN 0 WHEN s.state = 'captured' THEN s.amount + s.overrun ELSE 0 END
           + COALESCE(c.amount, 0)) > 0
 ORDER BY 1

-- stored_results --
-- The stored answer (a sync body, or the task's) of each of :request_ids (a JSON array) that was
-- served: captured, or corrected later.
SELECT l.request_id, COALESCE(s.result, t.result) AS result FROM ledger l
  LEFT JOIN settlements s USING (request_id) LEFT JOIN tasks t ON t.request_id = l.request_id
 WHERE l.request_id IN (SELECT jsonb_array_elements_text(:request_ids::text::jsonb))
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

-- instances --
-- The fleet, oldest first (the console's admin view).
SELECT instance_id, host, pid, extract(epoch FROM started_at)::float8 AS started_at,
       extract(epoch FROM heartbeat_at)::float8 AS heartbeat_at
  FROM instances ORDER BY started_at

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
   AND (:request_id::text IS NULL OR request_id = :request_id)
   AND (:team::text IS NULL OR team = :team)
   AND (:before::double precision IS NULL OR created_at < :before)

-- result_delete --
UPDATE result_images SET deleted_at = :deleted_at
 WHERE deleted_at IS NULL AND request_id = :request_id AND position = :position

-- result_live_digests --
-- Those of :digests (a JSON array) a live image still refers to.
SELECT DISTINCT digest FROM result_images
 WHERE deleted_at IS NULL AND digest IN (SELECT jsonb_array_elements_text(:digests::text::jsonb))

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
