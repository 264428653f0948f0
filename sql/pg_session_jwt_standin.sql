-- Test stand-in for the pg_session_jwt extension (observed behaviour of
-- version 0.5.0), for machines where the real extension cannot be installed.
-- Run as a superuser: psql -v ON_ERROR_STOP=1 -f pg_session_jwt_standin.sql
-- Safe to run more than once.
--
-- NOT A SECURITY BOUNDARY. This stand-in never checks the JWT signature, so
-- anyone who can call auth.jwt_session_init can claim to be anyone; and
-- pg_session_jwt.jwk / pg_session_jwt.session are ordinary placeholder
-- settings here, so a client can SET them at any time (the real extension
-- only accepts the jwk at connection start). Tests that assert a client
-- cannot forge claims must run against the real extension.
--
-- Error messages and SQLSTATEs follow the real extension so that the proxy
-- sees the same failures: 02000 for a missing jwk, 42804 for malformed input,
-- 23514 for a token that fails a check.

CREATE SCHEMA IF NOT EXISTS auth;

-- Last accepted jti per backend. The real extension keeps it in backend
-- memory; a table is the only per-backend state plpgsql has that survives
-- DISCARD ALL. A pid alone is reused by later backends, so the key adds the
-- backend's start time. Unlogged: losing it in a crash is harmless, since the
-- backends it describes are gone too. Unlike backend memory, a row written in
-- a transaction that rolls back is rolled back with it.
CREATE UNLOGGED TABLE IF NOT EXISTS auth.standin_backend_state (
    pid integer NOT NULL,
    backend_start timestamptz NOT NULL,
    last_jti bigint NOT NULL,
    last_token_sha256 bytea NOT NULL,
    PRIMARY KEY (pid, backend_start)
);

-- Only the SECURITY DEFINER functions below may touch it.
REVOKE ALL ON TABLE auth.standin_backend_state FROM PUBLIC;

-- The Ed25519 JWK from the startup packet, parsed and checked; raises the
-- real extension's errors when it is missing or not an OKP/Ed25519 key.
CREATE OR REPLACE FUNCTION auth.standin_jwk() RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    raw text := nullif(current_setting('pg_session_jwt.jwk', true), '');
    jwk jsonb;
BEGIN
    IF raw IS NULL THEN
        RAISE EXCEPTION 'Missing runtime parameter: pg_session_jwt.jwk'
            USING ERRCODE = '02000';  -- no_data
    END IF;

    BEGIN
        jwk := raw::jsonb;
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'pg_session_jwt.jwk requires an Ed25519 JWK'
            USING ERRCODE = 'datatype_mismatch', DETAIL = 'not valid JSON';
    END;

    IF jsonb_typeof(jwk) IS DISTINCT FROM 'object'
        OR jwk->>'kty' IS DISTINCT FROM 'OKP'
        OR jwk->>'crv' IS DISTINCT FROM 'Ed25519'
        OR jsonb_typeof(jwk->'x') IS DISTINCT FROM 'string'
    THEN
        RAISE EXCEPTION 'pg_session_jwt.jwk requires an Ed25519 JWK'
            USING ERRCODE = 'datatype_mismatch',
                  DETAIL = format('kty=%s crv=%s', jwk->>'kty', jwk->>'crv');
    END IF;

    RETURN jwk;
END
$fn$;

-- base64url (unpadded) → JSON object; NULL when the text is not that.
CREATE OR REPLACE FUNCTION auth.standin_b64url_json(part text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    b64 text := translate(part, '-_', '+/');
    doc jsonb;
BEGIN
    -- decode() would skip whitespace and accept '+' and '/'; a JWT has none.
    IF part !~ '^[A-Za-z0-9_-]+$' THEN
        RETURN NULL;
    END IF;
    b64 := b64 || repeat('=', (4 - length(b64) % 4) % 4);
    doc := convert_from(decode(b64, 'base64'), 'UTF8')::jsonb;
    IF jsonb_typeof(doc) <> 'object' THEN
        RETURN NULL;
    END IF;
    RETURN doc;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION auth.init() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM auth.standin_jwk();

    -- Rows left by earlier backends that had this pid.
    DELETE FROM auth.standin_backend_state s
    WHERE s.pid = pg_backend_pid()
      AND s.backend_start <> (SELECT a.backend_start
                              FROM pg_stat_get_activity(pg_backend_pid()) a);
END
$fn$;

-- Checks the token's shape and claims, but NOT its signature: plpgsql has no
-- Ed25519. Everything else (jti order, exp/nbf with 60 s leeway, sub type)
-- is checked as the real extension does.
CREATE OR REPLACE FUNCTION auth.jwt_session_init(jwt text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    leeway_s constant numeric := 60;
    backend timestamptz;
    parts text[];
    header jsonb;
    payload jsonb;
    token_hash bytea;
    prev record;
    jti numeric;
    now_s numeric := extract(epoch FROM now());
BEGIN
    PERFORM auth.standin_jwk();

    SELECT a.backend_start INTO backend
    FROM pg_stat_get_activity(pg_backend_pid()) a;

    parts := string_to_array(coalesce(jwt, ''), '.');
    IF coalesce(array_length(parts, 1), 0) <> 3 THEN
        RAISE EXCEPTION 'invalid JWT encoding' USING ERRCODE = 'datatype_mismatch';
    END IF;

    -- The very same token again is accepted without further checks, as the
    -- real extension caches the last token it accepted.
    token_hash := sha256(convert_to(jwt, 'UTF8'));
    SELECT s.last_jti, s.last_token_sha256 INTO prev
    FROM auth.standin_backend_state s
    WHERE s.pid = pg_backend_pid() AND s.backend_start = backend;

    header := auth.standin_b64url_json(parts[1]);
    payload := auth.standin_b64url_json(parts[2]);
    IF header IS NULL OR payload IS NULL THEN
        RAISE EXCEPTION 'invalid JWT encoding' USING ERRCODE = 'datatype_mismatch',
            DETAIL = CASE WHEN header IS NULL THEN 'header' ELSE 'payload' END
                     || ' is not base64url-encoded JSON';
    END IF;

    IF prev.last_token_sha256 IS NOT DISTINCT FROM token_hash THEN
        PERFORM set_config('pg_session_jwt.session', payload::text, false);
        RETURN;
    END IF;

    IF header->>'alg' IS DISTINCT FROM 'EdDSA' THEN
        RAISE EXCEPTION 'invalid JWT signature' USING ERRCODE = 'check_violation',
            DETAIL = format('alg=%s, only EdDSA is accepted', header->>'alg');
    END IF;

    -- Separate steps: SQL does not promise to evaluate OR left to right.
    IF jsonb_typeof(payload->'jti') = 'number' THEN
        jti := (payload->>'jti')::numeric;
    END IF;
    IF jti IS NULL OR jti <> trunc(jti)
        OR jti NOT BETWEEN -9223372036854775808 AND 9223372036854775807
    THEN
        RAISE EXCEPTION 'JWT payload must contain a valid ''jti'' (JWT ID)'
            USING ERRCODE = 'datatype_mismatch';
    END IF;

    -- A fresh backend starts at 0, so the first jti must be at least 1.
    IF jti <= coalesce(prev.last_jti, 0) THEN
        RAISE EXCEPTION 'Token ID must be strictly monotonically increasing.'
            USING ERRCODE = 'check_violation';
    END IF;

    IF payload ? 'nbf' THEN
        IF jsonb_typeof(payload->'nbf') <> 'number' THEN
            RAISE EXCEPTION '''nbf'' (Not Before) must be a number of seconds since the unix epoch'
                USING ERRCODE = 'datatype_mismatch';
        END IF;
        IF now_s + leeway_s < (payload->>'nbf')::numeric THEN
            RAISE EXCEPTION 'Token used before it is ready'
                USING ERRCODE = 'check_violation',
                      DETAIL = format('nbf=%s', payload->>'nbf');
        END IF;
    END IF;

    IF payload ? 'exp' THEN
        IF jsonb_typeof(payload->'exp') <> 'number' THEN
            RAISE EXCEPTION '''exp'' (Expiration) must be a number of seconds since the unix epoch'
                USING ERRCODE = 'datatype_mismatch';
        END IF;
        IF (payload->>'exp')::numeric + leeway_s < now_s THEN
            RAISE EXCEPTION 'Token used after it has expired'
                USING ERRCODE = 'check_violation',
                      DETAIL = format('exp=%s', payload->>'exp');
        END IF;
    END IF;

    IF payload ? 'sub' AND jsonb_typeof(payload->'sub') <> 'string' THEN
        RAISE EXCEPTION 'invalid subject claim in the JWT'
            USING ERRCODE = 'datatype_mismatch';
    END IF;

    INSERT INTO auth.standin_backend_state AS s
        (pid, backend_start, last_jti, last_token_sha256)
    VALUES (pg_backend_pid(), backend, jti::bigint, token_hash)
    ON CONFLICT (pid, backend_start) DO UPDATE
        SET last_jti = excluded.last_jti,
            last_token_sha256 = excluded.last_token_sha256;

    -- A session-level setting (not SET LOCAL): it outlives this function and
    -- the transaction. DISCARD ALL / RESET ALL clear it, unlike the real
    -- extension's backend memory; the proxy calls jwt_session_init on every
    -- checkout, so it never relies on the claims surviving a reset.
    PERFORM set_config('pg_session_jwt.session', payload::text, false);
END
$fn$;

-- The readers need no privilege, so they run as the caller. They sit in
-- row-level-security policies and run once per row, so they are kept as
-- cheap as plpgsql allows: no SET clause (a per-call GUC save and restore)
-- and no EXCEPTION block (a subtransaction per call). Instead every name is
-- schema-qualified, so a caller's search_path cannot change what they
-- resolve to. The real extension answers these from backend memory.
-- Text that is not JSON in the settings raises invalid_text_representation:
-- jwt_session_init only writes JSON it has parsed.
CREATE OR REPLACE FUNCTION auth.session() RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $fn$
DECLARE
    raw text;
BEGIN
    IF NULLIF(pg_catalog.current_setting('pg_session_jwt.jwk', true), '') IS NOT NULL THEN
        raw := NULLIF(pg_catalog.current_setting('pg_session_jwt.session', true), '');
    ELSE
        -- No jwk: the PostgREST convention, spoofable by any client that can
        -- run SET, exactly as with the real extension.
        raw := NULLIF(pg_catalog.current_setting('request.jwt.claims', true), '');
    END IF;

    -- JSON null, not SQL NULL, when there is no session.
    RETURN COALESCE(raw::pg_catalog.jsonb, 'null'::pg_catalog.jsonb);
END
$fn$;

CREATE OR REPLACE FUNCTION auth.jwt() RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $fn$
BEGIN
    RETURN auth.session();
END
$fn$;

-- The sub when it is a string, else NULL.
CREATE OR REPLACE FUNCTION auth.user_id() RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $fn$
DECLARE
    sub pg_catalog.jsonb := auth.session() OPERATOR(pg_catalog.->) 'sub';
BEGIN
    IF pg_catalog.jsonb_typeof(sub) OPERATOR(pg_catalog.=) 'string' THEN
        RETURN sub OPERATOR(pg_catalog.#>>) '{}';
    END IF;
    RETURN NULL;
END
$fn$;

-- The sub as a uuid, NULL when it is not one.
CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $fn$
DECLARE
    sub text := auth.user_id();
BEGIN
    IF sub IS NULL THEN
        RETURN NULL;
    END IF;
    -- The usual spelling skips the subtransaction of the EXCEPTION block.
    IF sub OPERATOR(pg_catalog.~*)
        '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
    THEN
        RETURN sub::pg_catalog.uuid;
    END IF;
    BEGIN
        RETURN sub::pg_catalog.uuid;
    EXCEPTION WHEN invalid_text_representation THEN
        RETURN NULL;
    END;
END
$fn$;

GRANT USAGE ON SCHEMA auth TO PUBLIC;

-- Helpers stay private; only the extension's own API is public.
REVOKE ALL ON FUNCTION auth.standin_jwk() FROM PUBLIC;
REVOKE ALL ON FUNCTION auth.standin_b64url_json(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    auth.init(),
    auth.jwt_session_init(text),
    auth.session(),
    auth.jwt(),
    auth.user_id(),
    auth.uid()
TO PUBLIC;
