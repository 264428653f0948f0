-- Sample schema for the quickstart, scripts/e2e.sh and docker-compose.
-- Needs the roles `authenticated` and `anonymous` and an `auth` schema
-- (pg_session_jwt, its stand-in, or sql/auth_guc.sql for the guc mode).

SET client_min_messages = warning;

CREATE TABLE IF NOT EXISTS todos (
    id bigserial PRIMARY KEY,
    owner text NOT NULL DEFAULT auth.user_id(),
    title text NOT NULL,
    done boolean NOT NULL DEFAULT false
);
ALTER TABLE todos ENABLE ROW LEVEL SECURITY;
ALTER TABLE todos FORCE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS todos_owner ON todos;
CREATE POLICY todos_owner ON todos FOR ALL TO authenticated
    USING (owner = auth.user_id())
    WITH CHECK (owner = auth.user_id());
DROP POLICY IF EXISTS todos_public ON todos;
CREATE POLICY todos_public ON todos FOR SELECT TO anonymous
    USING (owner = 'public');

GRANT USAGE ON SCHEMA public TO authenticated, anonymous;
GRANT SELECT, INSERT, UPDATE, DELETE ON todos TO authenticated;
GRANT SELECT ON todos TO anonymous;
GRANT USAGE ON SEQUENCE todos_id_seq TO authenticated;

INSERT INTO todos (owner, title)
SELECT * FROM (VALUES
    ('alice', 'alice: buy milk'),
    ('alice', 'alice: water the plants'),
    ('bob', 'bob: fix the bike'),
    ('public', 'everyone: read the README')
) AS seed(owner, title)
WHERE NOT EXISTS (SELECT 1 FROM todos);
