-- v1: the lease table and its fencing sequence. `{table}`, `{sequence}` and `{index}` are replaced by the
-- validated, quoted names of the configured schema and table.
CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint;

CREATE TABLE IF NOT EXISTS {table} (
    resource    text        PRIMARY KEY,
    owner       text        NOT NULL,
    fence       bigint      NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);

CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
