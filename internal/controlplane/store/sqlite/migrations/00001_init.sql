-- Initial schema of the control plane's SQLite database.
--
-- Every time column holds Unix nanoseconds (UTC). The zero time.Time is stored
-- as the smallest int64, so it round-trips exactly and still sorts first.

-- +goose Up
CREATE TABLE functions (
    name                      TEXT    NOT NULL PRIMARY KEY,
    runtime                   TEXT    NOT NULL,
    handler                   TEXT    NOT NULL,
    role                      TEXT    NOT NULL,
    description               TEXT    NOT NULL,
    timeout                   INTEGER NOT NULL,
    memory_size               INTEGER NOT NULL,
    ephemeral_storage         INTEGER NOT NULL,
    environment               TEXT    NOT NULL, -- JSON object, or null
    architectures             TEXT    NOT NULL, -- JSON array, or null
    tags                      TEXT    NOT NULL, -- JSON object, or null
    code_sha256               TEXT    NOT NULL,
    code_size                 INTEGER NOT NULL,
    revision_id               TEXT    NOT NULL,
    version                   TEXT    NOT NULL,
    state                     TEXT    NOT NULL,
    state_reason              TEXT    NOT NULL,
    state_reason_code         TEXT    NOT NULL,
    last_update_status        TEXT    NOT NULL,
    last_update_status_reason TEXT    NOT NULL,
    last_modified             INTEGER NOT NULL,
    reserved_concurrency      INTEGER,          -- NULL: unreserved
    created_at                INTEGER NOT NULL,
    updated_at                INTEGER NOT NULL
);

-- CodeInUse looks functions up by digest before a blob is removed.
CREATE INDEX functions_code_sha256 ON functions (code_sha256);

CREATE TABLE runtimes (
    id              TEXT    NOT NULL PRIMARY KEY,
    family          TEXT    NOT NULL,
    available       INTEGER NOT NULL,
    reason          TEXT    NOT NULL,
    interpreter     TEXT    NOT NULL,
    bootstrap       TEXT    NOT NULL, -- JSON array, or null
    handler_format  TEXT    NOT NULL,
    default_handler TEXT    NOT NULL,
    execution_env   TEXT    NOT NULL
) WITHOUT ROWID;

CREATE TABLE invocations (
    request_id     TEXT    NOT NULL PRIMARY KEY,
    function       TEXT    NOT NULL,
    revision_id    TEXT    NOT NULL,
    version        TEXT    NOT NULL,
    type           TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    error_type     TEXT    NOT NULL,
    error_message  TEXT    NOT NULL,
    attempts       INTEGER NOT NULL,
    cold           INTEGER NOT NULL,
    start_at       INTEGER NOT NULL,
    end_at         INTEGER NOT NULL,
    init_duration  INTEGER NOT NULL, -- nanoseconds
    duration       INTEGER NOT NULL, -- nanoseconds
    max_memory_mb  INTEGER NOT NULL,
    log            BLOB,
    log_bytes      INTEGER NOT NULL
);

-- ListByFunction pages a function's records newest first.
CREATE INDEX invocations_function_start ON invocations (function, start_at, request_id);
-- DeleteBefore removes expired records by end time.
CREATE INDEX invocations_end ON invocations (end_at);

CREATE TABLE events (
    request_id     TEXT    NOT NULL PRIMARY KEY,
    function       TEXT    NOT NULL,
    payload        BLOB,
    client_context TEXT    NOT NULL,
    enqueued_at    INTEGER NOT NULL,
    not_before     INTEGER NOT NULL,
    attempts       INTEGER NOT NULL,
    last_error     TEXT    NOT NULL,
    lease_until    INTEGER,          -- NULL: not leased
    -- due_at is when the event may next be claimed: its NotBefore until
    -- claimed, then its lease expiry, then a Retry's NotBefore. One ordered
    -- column lets Claim read exactly the due rows in order, without scanning
    -- events that are leased or backing off.
    due_at         INTEGER NOT NULL
);

CREATE INDEX events_due ON events (due_at, enqueued_at, request_id);

-- +goose Down
DROP TABLE events;
DROP TABLE invocations;
DROP TABLE runtimes;
DROP TABLE functions;
