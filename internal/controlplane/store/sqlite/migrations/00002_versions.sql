-- Published function versions, SnapStart settings and the qualifier of
-- queued Event invocations.

-- +goose Up
ALTER TABLE functions ADD COLUMN snap_start_apply_on     TEXT    NOT NULL DEFAULT '';
ALTER TABLE functions ADD COLUMN snap_start_optimization TEXT    NOT NULL DEFAULT '';
-- last_version is the highest version number ever assigned to the function,
-- so numbers are never reused after a version is deleted. Functions.Update
-- never writes it; only Versions.Publish does.
ALTER TABLE functions ADD COLUMN last_version            INTEGER NOT NULL DEFAULT 0;

-- versions has the columns of functions (so one scanner reads both), with
-- the version's number and the $LATEST revision it was published from.
CREATE TABLE versions (
    name                      TEXT    NOT NULL REFERENCES functions (name) ON DELETE CASCADE,
    number                    INTEGER NOT NULL,
    source_revision_id        TEXT    NOT NULL,
    runtime                   TEXT    NOT NULL,
    handler                   TEXT    NOT NULL,
    role                      TEXT    NOT NULL,
    description               TEXT    NOT NULL,
    timeout                   INTEGER NOT NULL,
    memory_size               INTEGER NOT NULL,
    ephemeral_storage         INTEGER NOT NULL,
    environment               TEXT    NOT NULL,
    architectures             TEXT    NOT NULL,
    tags                      TEXT    NOT NULL,
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
    reserved_concurrency      INTEGER,
    snap_start_apply_on       TEXT    NOT NULL,
    snap_start_optimization   TEXT    NOT NULL,
    created_at                INTEGER NOT NULL,
    PRIMARY KEY (name, number)
);

-- CodeInUse looks versions up by digest too.
CREATE INDEX versions_code_sha256 ON versions (code_sha256);
-- ListPending reads the few Pending versions without scanning the rest.
CREATE INDEX versions_pending ON versions (name, number) WHERE state = 'Pending';

ALTER TABLE events ADD COLUMN qualifier TEXT NOT NULL DEFAULT '';

-- +goose Down
ALTER TABLE events DROP COLUMN qualifier;
DROP TABLE versions;
ALTER TABLE functions DROP COLUMN last_version;
ALTER TABLE functions DROP COLUMN snap_start_optimization;
ALTER TABLE functions DROP COLUMN snap_start_apply_on;
