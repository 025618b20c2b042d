-- 0008: the web console (issue 24); expand-only. A team's newest entries and its spend per day
-- are read by team and time: one index serves both (and every report of a team's window).

CREATE INDEX holds_by_team_time ON holds (team, created_at);
