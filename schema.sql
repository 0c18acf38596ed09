-- DailyPlay schema, version 4 (the whole schema: a new database gets it in one step; older files
-- are brought here by the later steps of MIGRATIONS in dailyplay/storage/sqlite/schema.py).
-- Applied by `dailyplay init-db` and at server start inside one BEGIN IMMEDIATE transaction,
-- together with `PRAGMA user_version`. Times are integer milliseconds since the Unix epoch, UTC.

CREATE TABLE IF NOT EXISTS orgs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    tier        TEXT    NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'business')),
    external_id TEXT    UNIQUE,            -- Clerk organization id (org_...), matched to JWT claims
    created_at  INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS org_members (
    org_id     INTEGER NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id    TEXT    NOT NULL,           -- JWT `sub` (Clerk user id)
    role       TEXT    NOT NULL CHECK (role IN ('admin', 'member')),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (org_id, user_id)
) WITHOUT ROWID;

-- AUTOINCREMENT: a key id is never reused, so a verified-key cache entry can never come to
-- point at a newer key after a delete.
CREATE TABLE IF NOT EXISTS api_keys (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id                INTEGER NOT NULL REFERENCES orgs (id),
    name                  TEXT    NOT NULL,
    description           TEXT,
    key_prefix            TEXT    NOT NULL,           -- first 8 characters, for people and lookup
    key_hash              TEXT    NOT NULL,           -- argon2id; the raw key is never stored
    is_active             INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    allowed_game_ids      TEXT,                       -- JSON array; NULL means every game
    allowed_stream_ids    TEXT,                       -- JSON array; NULL means every stream
    rate_limit_per_minute INTEGER NOT NULL CHECK (rate_limit_per_minute >= 1),
    rate_limit_per_day    INTEGER NOT NULL CHECK (rate_limit_per_day >= 1),
    expires_at            INTEGER,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL,
    last_used_at          INTEGER
);
CREATE INDEX IF NOT EXISTS api_keys_by_org ON api_keys (org_id);
CREATE INDEX IF NOT EXISTS api_keys_by_prefix ON api_keys (key_prefix);

CREATE TABLE IF NOT EXISTS sessions (
    id           INTEGER PRIMARY KEY,
    token        BLOB    NOT NULL UNIQUE CHECK (length(token) = 16),   -- UUID, 16 bytes (tokens.py)
    org_id       INTEGER NOT NULL REFERENCES orgs (id),
    api_key_id   INTEGER REFERENCES api_keys (id) ON DELETE SET NULL,
    game_id      INTEGER,
    stream_id    INTEGER,
    external_ref TEXT,
    metadata     TEXT,                                   -- JSON object
    status       TEXT    NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'consumed', 'revoked')),
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    consumed_at  INTEGER,
    revoked_at   INTEGER,
    player_uuid  TEXT
);
-- Revoking a key touches only its still-active tokens.
CREATE INDEX IF NOT EXISTS sessions_active_by_key ON sessions (api_key_id) WHERE status = 'active';

-- Requests counted against each key's per-minute and per-day limits, added up by every worker
-- process, so that a restart or a second worker does not hand out a fresh quota.
CREATE TABLE IF NOT EXISTS rate_counters (
    api_key_id INTEGER NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    span       TEXT    NOT NULL CHECK (span IN ('minute', 'day')),
    period     INTEGER NOT NULL,                         -- minutes or days since the epoch
    hits       INTEGER NOT NULL,
    PRIMARY KEY (api_key_id, span, period)
) WITHOUT ROWID;

-- One row, rewritten by GET /readyz: proves that a write reaches the file (added in version 2).
CREATE TABLE IF NOT EXISTS readiness (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at INTEGER NOT NULL
);

-- Retention (added in version 2): finished tokens are found by when they finished.
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
CREATE INDEX IF NOT EXISTS sessions_consumed_by_time ON sessions (consumed_at)
    WHERE status = 'consumed';
CREATE INDEX IF NOT EXISTS sessions_revoked_by_time ON sessions (revoked_at)
    WHERE status = 'revoked';

-- Who changed what (added in version 2): every key and membership change, every org change.
CREATE TABLE IF NOT EXISTS audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    org_id      INTEGER NOT NULL,
    actor       TEXT    NOT NULL,          -- the JWT `sub` of who did it, or 'cli'
    action      TEXT    NOT NULL,          -- api_key.create, member.add, org.tier_change, ...
    api_key_id  INTEGER,                   -- kept after the key is deleted
    client_ip   TEXT,
    changes     TEXT                       -- JSON object: field -> {"from": ..., "to": ...}
);
CREATE INDEX IF NOT EXISTS audit_log_by_org ON audit_log (org_id, id);

-- Tokens created and consumed per key per hour, for key listings (added in version 2).
CREATE TABLE IF NOT EXISTS key_usage (
    api_key_id INTEGER NOT NULL,
    hour       INTEGER NOT NULL,                         -- hours since the epoch
    created    INTEGER NOT NULL DEFAULT 0,
    consumed   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (api_key_id, hour)
) WITHOUT ROWID;

-- list-sessions (added in version 3): an organization's tokens by external reference, newest
-- first (the look-up a shop or a CRM makes: "the tokens of order 1234").
CREATE INDEX IF NOT EXISTS sessions_by_org_ref ON sessions (org_id, external_ref, id);

-- Idempotency-Key on create-session (added in version 4): the outcome of the first request
-- sent with a key, per API key, replayed to its retries. A row is `pending` from the moment a
-- request claims the key until its outcome is stored (in the transaction that stores the
-- token); `claim` names the request holding it, and a pending row past `locked_until` (its
-- process died) may be taken over. Deleted sessions.idempotency_hours after created_at.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    api_key_id   INTEGER NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    idem_key     TEXT    NOT NULL CHECK (length(idem_key) BETWEEN 1 AND 255),
    fingerprint  BLOB    NOT NULL,                   -- SHA-256 of method, action, canonical body
    claim        TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'done')),
    status       INTEGER,                            -- the stored answer, once done
    body         BLOB,
    created_at   INTEGER NOT NULL,
    locked_until INTEGER NOT NULL,
    PRIMARY KEY (api_key_id, idem_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_by_time ON idempotency_keys (created_at);
