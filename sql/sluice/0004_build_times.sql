-- How long derivations take to build, for critical-path scheduling: a
-- moving average (each new time weighs a quarter) over the successful
-- steps of derivations of one name. The name is the derivation's name
-- without its version (`hello-2.12.1` counts as `hello`), so a new
-- version starts from the estimate of the last one. Written in the
-- transaction that finishes the step; read by point queries when builds
-- are loaded.
create table SluiceBuildTimes (
    name     text primary key,
    avgMs    bigint not null,
    samples  integer not null
);
