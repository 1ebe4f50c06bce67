-- Sluice: the Hydra database schema, at Hydra schema version 87.
--
-- Applying this file to an empty database yields the same catalog as
-- Hydra's own `hydra-init` does on a fresh install of a Hydra whose newest
-- migration is upgrade-87: same tables, column order, types, defaults,
-- nullability, constraints (including the names PostgreSQL picks for
-- unnamed ones), indexes, triggers, notify channels, rules and seed rows.
-- Hydra's web UI, evaluator and notifier can therefore run against a
-- database created by Sluice, and Sluice can run against one created by
-- Hydra.
--
-- Rules for editing this file:
--   * It mirrors an external schema. Never "improve" a type, default or
--     constraint here; a change belongs in a later file that corresponds to
--     a Hydra migration.
--   * Unnamed constraints get generated names (builds_check,
--     builds_check1, ..._fkey). Those names depend on the order of the
--     declarations inside each table, so keep that order.
--   * Column order is part of the contract (SELECT * and COPY users).
--   * Check with sql/tools/diff-against-hydra.sh against Hydra's hydra.sql.
--
-- Identifiers are unquoted, so PostgreSQL folds them to lower case; they are
-- spelt below the way Hydra spells them.

------------------------------------------------------------------------
-- Schema version bookkeeping
------------------------------------------------------------------------

-- One row. hydra-init compares it with its newest upgrade-N.sql and only
-- runs the migrations above it; with 87 here it has nothing to do.
create table SchemaVersion (
    version                     integer not null
);

insert into SchemaVersion (version) values (87);

------------------------------------------------------------------------
-- Accounts and projects
------------------------------------------------------------------------

create table Users (
    userName                    text not null primary key,
    fullName                    text,
    emailAddress                text not null,
    password                    text not null,           -- password hash
    emailOnError                integer not null default 0,
    type                        text not null default 'hydra',  -- login provider
    publicDashboard             boolean not null default false
);

create table UserRoles (
    userName                    text not null,
    role                        text not null,
    primary key (userName, role),
    foreign key (userName) references Users (userName)
        on update cascade on delete cascade
);

create table Projects (
    name                        text not null primary key,
    displayName                 text not null,
    description                 text,
    enabled                     integer not null default 1,
    hidden                      integer not null default 0,
    owner                       text not null,
    homepage                    text,
    declfile                    text,   -- declarative jobsets: spec file
    decltype                    text,   --   input type holding it
    declvalue                   text,   --   input value
    enable_dynamic_run_command  boolean not null default false,
    foreign key (owner) references Users (userName) on update cascade
);

create table ProjectMembers (
    project                     text not null,
    userName                    text not null,
    primary key (project, userName),
    foreign key (project) references Projects (name)
        on update cascade on delete cascade,
    foreign key (userName) references Users (userName)
        on update cascade on delete cascade
);

------------------------------------------------------------------------
-- Jobsets
------------------------------------------------------------------------

create table Jobsets (
    name                        text not null,
    id                          serial not null,
    project                     text not null,
    description                 text,
    nixExprInput                text,      -- legacy jobsets only
    nixExprPath                 text,      -- legacy jobsets only
    errorMsg                    text,
    errorTime                   integer,
    lastCheckedTime             integer,
    triggerTime                 integer,   -- set by push triggers
    enabled                     integer not null default 1,  -- 0 off, 1 on, 2 one-shot, 3 one-at-a-time
    enableEmail                 integer not null default 1,
    hidden                      integer not null default 0,
    emailOverride               text not null,
    keepnr                      integer not null default 3,
    checkInterval               integer not null default 300,  -- seconds; 0 = never poll
    schedulingShares            integer not null default 100,
    fetchErrorMsg               text,
    forceEval                   boolean,
    startTime                   integer,   -- evaluation in progress since
    type                        integer not null default 0,  -- 0 legacy, 1 flake
    flake                       text,      -- flake jobsets only
    enable_dynamic_run_command  boolean not null default false,

    constraint jobsets_schedulingshares_nonzero_check
        check (schedulingShares > 0),
    constraint jobsets_type_known_check
        check (type = 0 or type = 1),
    -- A legacy jobset has an expression input and path and no flake ...
    constraint jobsets_legacy_paths_check
        check ((type = 0) = (nixExprInput is not null and nixExprPath is not null and flake is null)),
    -- ... and a flake jobset has exactly the reverse.
    constraint jobsets_flake_paths_check
        check ((type = 1) = (nixExprInput is null and nixExprPath is null and flake is not null)),
    primary key (project, name),
    foreign key (project) references Projects (name)
        on update cascade on delete cascade,
    constraint Jobsets_id_unique unique (id)
);

-- Wake-ups for the queue runner and the evaluator; all payloads are empty.

create function notifyJobsetSharesChanged() returns trigger
language plpgsql as $$
begin
    notify jobset_shares_changed;
    return null;
end;
$$;

create trigger JobsetSharesChanged
    after update on Jobsets
    for each row
    when (old.schedulingShares != new.schedulingShares)
    execute procedure notifyJobsetSharesChanged();

create function notifyJobsetsAdded() returns trigger
language plpgsql as $$
begin
    notify jobsets_added;
    return null;
end;
$$;

-- Statement level, like the delete trigger below.
create trigger JobsetsAdded
    after insert on Jobsets
    execute procedure notifyJobsetsAdded();

create function notifyJobsetsDeleted() returns trigger
language plpgsql as $$
begin
    notify jobsets_deleted;
    return null;
end;
$$;

create trigger JobsetsDeleted
    after delete on Jobsets
    execute procedure notifyJobsetsDeleted();

create function notifyJobsetSchedulingChanged() returns trigger
language plpgsql as $$
begin
    notify jobset_scheduling_changed;
    return null;
end;
$$;

-- Fires on a new push trigger, a changed poll interval or a changed
-- enabled state.
create trigger JobsetSchedulingChanged
    after update on Jobsets
    for each row
    when (((old.triggerTime is distinct from new.triggerTime) and (new.triggerTime is not null))
          or (old.checkInterval != new.checkInterval)
          or (old.enabled != new.enabled))
    execute procedure notifyJobsetSchedulingChanged();

create table JobsetRenames (
    project                     text not null,
    from_                       text not null,
    to_                         text not null,
    primary key (project, from_),
    foreign key (project) references Projects (name)
        on update cascade on delete cascade,
    foreign key (project, to_) references Jobsets (project, name)
        on update cascade on delete cascade
);

create table JobsetInputs (
    project                     text not null,
    jobset                      text not null,
    name                        text not null,
    type                        text not null,   -- git, path, string, boolean, nix, ...
    emailResponsible            integer not null default 0,
    primary key (project, jobset, name),
    foreign key (project, jobset) references Jobsets (project, name)
        on update cascade on delete cascade
);

create table JobsetInputAlts (
    project                     text not null,
    jobset                      text not null,
    input                       text not null,
    altnr                       integer not null,
    value                       text,
    revision                    text,
    primary key (project, jobset, input, altnr),
    foreign key (project, jobset, input) references JobsetInputs (project, jobset, name)
        on update cascade on delete cascade
);

------------------------------------------------------------------------
-- Builds
------------------------------------------------------------------------

-- One row per job of an evaluation. The evaluator inserts it with
-- finished = 0; the queue runner fills in the result columns and sets
-- finished = 1. Status codes: see docs / the contract (0 ok, 1 failed,
-- 2 dependency failed, 3 aborted, 4 cancelled, 6 failed with output,
-- 7 timed out, 9 unsupported, 10 log limit, 11 output limit,
-- 12 non-deterministic).
create table Builds (
    id                          serial not null primary key,
    finished                    integer not null,   -- 0 queued, 1 done
    timestamp                   integer not null,   -- queue time
    jobset_id                   integer not null,
    job                         text not null,
    nixName                     text,
    description                 text,
    drvPath                     text not null,
    system                      text not null,
    license                     text,
    homepage                    text,
    maintainers                 text,
    maxsilent                   integer default 3600,
    timeout                     integer default 36000,
    isChannel                   integer not null default 0,
    isCurrent                   integer default 0,
    priority                    integer not null default 0,  -- meta.schedulingPriority
    globalPriority              integer not null default 0,  -- "bump" in the UI
    startTime                   integer,
    stopTime                    integer,
    isCachedBuild               integer,
    buildStatus                 integer,
    size                        bigint,
    closureSize                 bigint,
    releaseName                 text,
    keep                        integer not null default 0,  -- GC root forever
    notificationPendingSince    integer,

    -- These two stay unnamed (builds_check, then builds_check1).
    check (finished = 0 or (stopTime is not null and stopTime != 0)),
    check (finished = 0 or (startTime is not null and startTime != 0)),

    foreign key (jobset_id) references Jobsets (id) on delete cascade
);

create function notifyBuildsDeleted() returns trigger
language plpgsql as $$
begin
    notify builds_deleted;
    return null;
end;
$$;

create trigger BuildsDeleted
    after delete on Builds
    execute procedure notifyBuildsDeleted();

create function notifyBuildRestarted() returns trigger
language plpgsql as $$
begin
    notify builds_restarted;
    return null;
end;
$$;

create trigger BuildRestarted
    after update on Builds
    for each row
    when (old.finished = 1 and new.finished = 0)
    execute procedure notifyBuildRestarted();

create function notifyBuildCancelled() returns trigger
language plpgsql as $$
begin
    notify builds_cancelled;
    return null;
end;
$$;

create trigger BuildCancelled
    after update on Builds
    for each row
    when (old.finished = 0 and new.finished = 1 and new.buildStatus = 4)
    execute procedure notifyBuildCancelled();

create function notifyBuildBumped() returns trigger
language plpgsql as $$
begin
    notify builds_bumped;
    return null;
end;
$$;

create trigger BuildBumped
    after update on Builds
    for each row
    when (old.globalPriority != new.globalPriority)
    execute procedure notifyBuildBumped();

-- path stays NULL for floating content-addressed outputs until built.
create table BuildOutputs (
    build                       integer not null,
    name                        text not null,
    path                        text,
    primary key (build, name),
    foreign key (build) references Builds (id) on delete cascade
);

-- One row per attempt at one derivation on behalf of one build.
create table BuildSteps (
    build                       integer not null,
    stepnr                      integer not null,
    type                        integer not null,   -- 0 build, 1 substitution
    drvPath                     text not null,      -- with the store dir
    busy                        integer not null,   -- phase; 0 = not busy
    status                      integer,            -- NULL while busy
    errorMsg                    text,
    startTime                   integer,
    stopTime                    integer,
    machine                     text not null default '',
    system                      text,
    propagatedFrom              integer,
    overhead                    integer,            -- ms spent copying
    timesBuilt                  integer,
    isNonDeterministic          boolean,
    resolvedDrvPath             text,               -- base name, no store dir

    primary key (build, stepnr),
    foreign key (build) references Builds (id) on delete cascade,
    foreign key (propagatedFrom) references Builds (id) on delete cascade,
    -- Unnamed (buildsteps_check). Status 13 means "resolved" and requires
    -- resolvedDrvPath; other non-NULL statuses forbid it. A NULL status
    -- makes the check NULL, which passes.
    check ((status = 13) = (resolvedDrvPath is not null))
);

create table BuildStepOutputs (
    build                       integer not null,
    stepnr                      integer not null,
    name                        text not null,
    path                        text,
    primary key (build, stepnr, name),
    foreign key (build) references Builds (id) on delete cascade,
    foreign key (build, stepnr) references BuildSteps (build, stepnr) on delete cascade
);

create table BuildInputs (
    id                          serial not null primary key,
    build                       integer,
    name                        text not null,
    type                        text not null,
    uri                         text,
    revision                    text,
    value                       text,
    emailResponsible            integer not null default 0,
    dependency                  integer,
    path                        text,
    sha256hash                  text,
    foreign key (build) references Builds (id) on delete cascade,
    foreign key (dependency) references Builds (id)
);

create table BuildProducts (
    build                       integer not null,
    productnr                   integer not null,
    type                        text not null,
    subtype                     text not null,
    fileSize                    bigint,
    sha256hash                  text,
    path                        text,
    name                        text not null,
    defaultPath                 text,
    primary key (build, productnr),
    foreign key (build) references Builds (id) on delete cascade
);

-- project/jobset/job/timestamp are copies of the build's, for the metric
-- history graphs.
create table BuildMetrics (
    build                       integer not null,
    name                        text not null,
    unit                        text,
    value                       double precision not null,
    project                     text not null,
    jobset                      text not null,
    job                         text not null,
    timestamp                   integer not null,
    primary key (build, name),
    foreign key (build) references Builds (id) on delete cascade,
    foreign key (project) references Projects (name) on update cascade,
    foreign key (project, jobset) references Jobsets (project, name) on update cascade
);

------------------------------------------------------------------------
-- Caches of fetched inputs (legacy jobsets)
------------------------------------------------------------------------

create table CachedPathInputs (
    srcPath                     text not null,
    timestamp                   integer not null,
    lastSeen                    integer not null,
    sha256hash                  text not null,
    storePath                   text not null,
    primary key (srcPath, sha256hash)
);

create table CachedSubversionInputs (
    uri                         text not null,
    revision                    integer not null,
    sha256hash                  text not null,
    storePath                   text not null,
    primary key (uri, revision)
);

create table CachedBazaarInputs (
    uri                         text not null,
    revision                    integer not null,
    sha256hash                  text not null,
    storePath                   text not null,
    primary key (uri, revision)
);

create table CachedGitInputs (
    uri                         text not null,
    branch                      text not null,
    revision                    text not null,
    isDeepClone                 boolean not null,
    sha256hash                  text not null,
    storePath                   text not null,
    primary key (uri, branch, revision, isDeepClone)
);

create table CachedDarcsInputs (
    uri                         text not null,
    revision                    text not null,
    sha256hash                  text not null,
    storePath                   text not null,
    revCount                    integer not null,
    primary key (uri, revision)
);

create table CachedHgInputs (
    uri                         text not null,
    branch                      text not null,
    revision                    text not null,
    sha256hash                  text not null,
    storePath                   text not null,
    primary key (uri, branch, revision)
);

create table CachedCVSInputs (
    uri                         text not null,
    module                      text not null,
    timestamp                   integer not null,
    lastSeen                    integer not null,
    sha256hash                  text not null,
    storePath                   text not null,
    primary key (uri, module, sha256hash)
);

------------------------------------------------------------------------
-- Evaluations
------------------------------------------------------------------------

create table EvaluationErrors (
    id                          serial not null primary key,
    errorMsg                    text,
    errorTime                   integer
);

create table JobsetEvals (
    id                          serial not null primary key,
    jobset_id                   integer not null,
    evaluationerror_id          integer,
    timestamp                   integer not null,
    checkoutTime                integer not null,   -- seconds
    evalTime                    integer not null,   -- seconds
    hasNewBuilds                integer not null,
    hash                        text not null,      -- of the evaluator's inputs
    nrBuilds                    integer,
    nrSucceeded                 integer,
    flake                       text,
    nixExprInput                text,
    nixExprPath                 text,
    foreign key (jobset_id) references Jobsets (id) on delete cascade,
    foreign key (evaluationerror_id) references EvaluationErrors (id) on delete set null
);

create table JobsetEvalInputs (
    eval                        integer not null
                                references JobsetEvals (id) on delete cascade,
    name                        text not null,
    altNr                       integer not null,
    type                        text not null,
    uri                         text,
    revision                    text,
    shortRevLength              smallint,
    value                       text,
    dependency                  integer,
    path                        text,
    sha256hash                  text,
    primary key (eval, name, altNr),
    foreign key (dependency) references Builds (id)
);

create table JobsetEvalMembers (
    eval                        integer not null
                                references JobsetEvals (id) on delete cascade,
    build                       integer not null
                                references Builds (id) on delete cascade,
    isNew                       integer not null,
    primary key (eval, build)
);

------------------------------------------------------------------------
-- Miscellaneous web UI and notifier state
------------------------------------------------------------------------

create table UriRevMapper (
    baseuri                     text not null,
    uri                         text not null,
    primary key (baseuri)
);

create table NewsItems (
    id                          serial not null primary key,
    contents                    text not null,
    createTime                  integer not null,
    author                      text not null,
    foreign key (author) references Users (userName)
        on update cascade on delete cascade
);

create table AggregateConstituents (
    aggregate                   integer not null
                                references Builds (id) on delete cascade,
    constituent                 integer not null
                                references Builds (id) on delete cascade,
    primary key (aggregate, constituent)
);

create table StarredJobs (
    userName                    text not null,
    project                     text not null,
    jobset                      text not null,
    job                         text not null,
    primary key (userName, project, jobset, job),
    foreign key (userName) references Users (userName)
        on update cascade on delete cascade,
    foreign key (project) references Projects (name)
        on update cascade on delete cascade,
    foreign key (project, jobset) references Jobsets (project, name)
        on update cascade on delete cascade
);

-- hydra-notify's retry queue: one row per (event, failing plugin).
create table TaskRetries (
    id                          serial not null primary key,
    channel                     text not null,
    pluginname                  text not null,
    payload                     text not null,
    attempts                    integer not null,
    retry_at                    integer not null
);

create index IndexTaskRetriesOrdered on TaskRetries (retry_at asc);

-- RunCommand plugin executions: queued, then started, then ended.
create table RunCommandLogs (
    id                          serial not null primary key,
    uuid                        uuid not null,
    job_matcher                 text not null,
    build_id                    integer not null,
    command                     text not null,
    start_time                  integer,
    end_time                    integer,
    error_number                integer,
    exit_code                   integer,
    signal                      integer,
    core_dumped                 boolean,

    foreign key (build_id) references Builds (id) on delete cascade,
    -- Nothing but the queue-time columns may be set before it started.
    constraint RunCommandLogs_not_started_no_exit_time_no_code check (
        (start_time is not null)
        or (end_time is null and error_number is null and exit_code is null
            and signal is null and core_dumped is null)
    ),
    -- It cannot have ended without having started.
    constraint RunCommandLogs_end_time_has_start_time check (
        (end_time is null) or (start_time is not null)
    ),
    constraint RunCommandLogs_uuid_unique unique (uuid)
);

create index IndexRunCommandLogsOnBuildID on RunCommandLogs (build_id);

------------------------------------------------------------------------
-- Queue runner state
------------------------------------------------------------------------

-- Output paths known to fail.
create table FailedPaths (
    path                        text not null primary key
);

-- Makes a plain INSERT of an already known path a no-op instead of a
-- unique violation (Hydra relies on this rather than ON CONFLICT).
create rule IdempotentInsert as
    on insert to FailedPaths
    where exists (select 1 from FailedPaths where path = new.path)
    do instead nothing;

-- Legacy: only older web UIs read the 'queue-runner' row.
create table SystemStatus (
    what                        text not null primary key,
    status                      json not null
);

-- Cached counters; the row 'finished' counts builds with finished = 1 and
-- is kept current by the trigger below.
create table NrBuilds (
    what                        text not null primary key,
    count                       integer not null
);

insert into NrBuilds (what, count) values ('finished', 0);

create function modifyNrBuildsFinished() returns trigger
language plpgsql as $$
declare
    delta integer := 0;
begin
    -- Only a transition into or out of finished = 1 (from or to 0)
    -- changes the count.
    if tg_op = 'INSERT' then
        if new.finished = 1 then
            delta := 1;
        end if;
    elsif tg_op = 'DELETE' then
        if old.finished = 1 then
            delta := -1;
        end if;
    elsif old.finished = 0 and new.finished = 1 then
        delta := 1;
    elsif old.finished = 1 and new.finished = 0 then
        delta := -1;
    end if;

    if delta <> 0 then
        update NrBuilds set count = count + delta where what = 'finished';
    end if;
    return null;
end;
$$;

create trigger NrBuildsFinished
    after insert or update or delete on Builds
    for each row
    execute procedure modifyNrBuildsFinished();

------------------------------------------------------------------------
-- Indexes
------------------------------------------------------------------------

-- Builds. The partial index on finished = 0 is what the queue runner's
-- "load unfinished builds" scan uses.
create index IndexBuildsOnFinished on Builds (finished) where finished = 0;
create index IndexBuildsOnIsCurrent on Builds (isCurrent) where isCurrent = 1;
create index IndexBuildsJobsetIdCurrentUnfinished on Builds (jobset_id)
    where isCurrent = 1 and finished = 0;
create index IndexBuildsJobsetIdCurrentFinishedStatus on Builds (jobset_id, buildStatus)
    where isCurrent = 1 and finished = 1;
create index IndexBuildsJobsetIdCurrent on Builds (jobset_id) where isCurrent = 1;
create index IndexBuildsOnTimestamp on Builds (timestamp);
create index IndexBuildsOnFinishedStopTime on Builds (finished, stopTime desc);
create index IndexBuildsOnJobsetIdFinishedId on Builds (jobset_id, job, finished, id desc);
create index IndexFinishedSuccessfulBuilds on Builds (jobset_id, job, finished, buildStatus, id desc)
    where buildStatus = 0 and finished = 1;
create index IndexBuildsOnDrvPath on Builds (drvPath);
create index IndexBuildsOnKeep on Builds (keep) where keep = 1;   -- GC roots
create index IndexBuildsOnNotificationPendingSince on Builds (notificationPendingSince)
    where notificationPendingSince is not null;

-- Build steps. IndexBuildStepsOnBusy covers the busy steps (start-up
-- clean-up, status pages).
create index IndexBuildStepsOnBusy on BuildSteps (busy) where busy != 0;
create index IndexBuildStepsOnDrvPath on BuildSteps (drvPath);
create index IndexBuildStepsOnPropagatedFrom on BuildSteps (propagatedFrom)
    where propagatedFrom is not null;
create index IndexBuildStepsOnStopTime on BuildSteps (stopTime desc)
    where startTime is not null and stopTime is not null;
create index IndexBuildStepOutputsOnPath on BuildStepOutputs (path);

-- Other build data.
create index IndexBuildInputsOnBuild on BuildInputs (build);
create index IndexBuildInputsOnDependency on BuildInputs (dependency);
create index IndexBuildMetricsOnJobTimestamp on BuildMetrics (project, jobset, job, timestamp desc);
-- (sic: Hydra's name has the "Producst" spelling.)
create index IndexBuildProducstOnBuildAndType on BuildProducts (build, type);
create index IndexBuildProductsOnBuild on BuildProducts (build);
create index IndexBuildOutputsPath on BuildOutputs using hash (path);

-- Input caches.
create index IndexCachedHgInputsOnHash on CachedHgInputs (uri, branch, sha256hash);
create index IndexCachedGitInputsOnHash on CachedGitInputs (uri, branch, sha256hash);
create index IndexCachedSubversionInputsOnUriRevision on CachedSubversionInputs (uri, revision);
create index IndexCachedBazaarInputsOnUriRevision on CachedBazaarInputs (uri, revision);

-- Evaluations and jobsets.
create index IndexJobsetEvalMembersOnBuild on JobsetEvalMembers (build);
create index IndexJobsetEvalMembersOnEval on JobsetEvalMembers (eval);
create index IndexJobsetInputAltsOnInput on JobsetInputAlts (project, jobset, input);
create index IndexJobsetInputAltsOnJobset on JobsetInputAlts (project, jobset);
create index IndexJobsetEvalsOnJobsetId on JobsetEvals (jobset_id, id desc) where hasNewBuilds = 1;
create index IndexJobsetIdEvals on JobsetEvals (jobset_id) where hasNewBuilds = 1;
create index IndexProjectsOnEnabled on Projects (enabled);

-- Trigram index for the UI's LIKE searches on Builds.drvPath. pg_trgm is a
-- trusted extension, but creating it can still be refused (no CREATE right
-- on the database, extension not installed). Hydra then carries on
-- without the index, and so do we: the failure is reported as a warning and
-- the rest of the schema is kept.
do $$
begin
    create extension if not exists pg_trgm;
    create index IndexTrgmBuildsOnDrvpath on Builds using gin (drvPath gin_trgm_ops);
exception when others then
    raise warning 'pg_trgm unavailable (%); index IndexTrgmBuildsOnDrvpath not created', sqlerrm;
    raise warning 'searching builds by derivation path will be slow; to fix, let a role that may create pg_trgm create it, then create the index';
end
$$;
