-- How each attempt that an agent ran went, beyond Hydra's BuildSteps
-- columns: the builder's exact exit status and the time spent in each
-- phase. Written in the transaction that finishes the step; a step that
-- never reached an agent has no row.
create table SluiceStepRuns (
    build       integer not null,
    stepnr      integer not null,
    -- The builder's exit code, when it exited (0 on success).
    exitCode    integer,
    -- The signal that killed the builder, when one did.
    signal      integer,
    -- Milliseconds fetching inputs, building, and uploading outputs.
    fetchMs     bigint not null,
    buildMs     bigint not null,
    uploadMs    bigint not null,
    primary key (build, stepnr),
    foreign key (build, stepnr) references BuildSteps (build, stepnr) on delete cascade
);
