-- Attempts in progress: one row per busy BuildSteps row that an agent was
-- given, naming the attempt the agent knows. A restarted queue runner
-- reads them to adopt the attempts agents still run, instead of aborting
-- their steps. The row is deleted in the transaction that finishes its
-- step.
create table SluiceAttempts (
    id          uuid primary key,
    build       integer not null,
    stepnr      integer not null,
    -- The agent's name (BuildSteps.machine).
    machine     text not null,
    drvPath     text not null,
    -- Unix seconds, the queue runner's clock (BuildSteps.startTime).
    startTime   integer not null,
    unique (build, stepnr),
    foreign key (build, stepnr) references BuildSteps (build, stepnr) on delete cascade
);
