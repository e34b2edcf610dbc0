-- Schedules declared with the code (`register_schedule!`): each instance applies the
-- declarations linked into its binary, one set per declaring crate (its scope).
--
-- `declared_in` says where a schedule comes from: the crate whose declarations wrote
-- it, or null for one added by hand (`engine cron add`, `add_schedule`,
-- `Runner::schedule`, SQL), which declarations never change or remove. A nullable
-- column without a default: no rewrite of the table.
ALTER TABLE task_engine_schedules ADD COLUMN declared_in text;

-- The sets of declarations seen, per crate, so that an older binary starting late
-- during a rolling deploy does not undo a newer one's. `generation` orders a crate's
-- sets by when they were first seen (the highest is the newest); `last_seen` is
-- renewed every few seconds by each running instance that declares the set; of the
-- sets seen in the last minute, only the newest is applied, and `applied` marks the set
-- the crate's schedule rows were last written from.
CREATE TABLE task_engine_declarations (
    scope      text        NOT NULL,
    set_hash   text        NOT NULL,
    generation bigint      NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    applied    boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (scope, set_hash),
    UNIQUE (scope, generation)
);
