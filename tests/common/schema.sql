-- Test schema, run by Postgres::setup_schema after the roles and
-- pg_session_jwt (real or stand-in) exist.

-- todos: claims through pg_session_jwt (auth.user_id()).
CREATE TABLE todos (
    id bigserial PRIMARY KEY,
    owner text NOT NULL DEFAULT auth.user_id(),
    title text NOT NULL
);
ALTER TABLE todos ENABLE ROW LEVEL SECURITY;
-- FORCE so that even the table owner is filtered (superusers still bypass).
ALTER TABLE todos FORCE ROW LEVEL SECURITY;

CREATE POLICY todos_own ON todos FOR ALL TO authenticated
    USING (owner = auth.user_id())
    WITH CHECK (owner = auth.user_id());
CREATE POLICY todos_public_read ON todos FOR SELECT TO anonymous
    USING (owner = 'public');

GRANT SELECT, INSERT, UPDATE, DELETE ON todos TO authenticated;
GRANT SELECT ON todos TO anonymous;
GRANT USAGE ON SEQUENCE todos_id_seq TO authenticated;

-- guc_todos: claims through request.jwt.claims (the proxy's `guc` mode).
-- nullif: after RESET the setting reads as '' rather than NULL, and ''
-- is not valid jsonb.
CREATE TABLE guc_todos (
    id bigserial PRIMARY KEY,
    owner text NOT NULL
        DEFAULT nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
    title text NOT NULL
);
ALTER TABLE guc_todos ENABLE ROW LEVEL SECURITY;
ALTER TABLE guc_todos FORCE ROW LEVEL SECURITY;

CREATE POLICY guc_todos_own ON guc_todos FOR ALL TO authenticated
    USING (owner = nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
    WITH CHECK (owner = nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub');
CREATE POLICY guc_todos_public_read ON guc_todos FOR SELECT TO anonymous
    USING (owner = 'public');

GRANT SELECT, INSERT, UPDATE, DELETE ON guc_todos TO authenticated;
GRANT SELECT ON guc_todos TO anonymous;
GRANT USAGE ON SEQUENCE guc_todos_id_seq TO authenticated;

-- Seed rows, inserted as the superuser (which bypasses RLS).
INSERT INTO todos (owner, title) VALUES
    ('alice', 'alice: buy milk'),
    ('alice', 'alice: water plants'),
    ('bob', 'bob: fix bike'),
    ('public', 'public: read the docs');
INSERT INTO guc_todos (owner, title) SELECT owner, title FROM todos ORDER BY id;
