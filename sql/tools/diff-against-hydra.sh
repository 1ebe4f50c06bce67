#!/usr/bin/env bash
# diff-against-hydra.sh: compare Sluice's Hydra schema with Hydra's own.
#
# Developer tool, not used at run time.
#
#   sql/tools/diff-against-hydra.sh HYDRA_SQL [SLUICE_SQL...]
#
# HYDRA_SQL is the hydra.sql of a Hydra checkout (in current Hydra:
# subprojects/hydra/sql/hydra.sql). SLUICE_SQL defaults to every
# sql/hydra/*.sql of this repository, applied in name order.
#
# The script makes two scratch databases. Into the first it loads HYDRA_SQL
# the way hydra-init does on a fresh install: in one transaction, followed
# by inserting the schema version (the highest N of the upgrade-N.sql files
# in the migrations/ directory next to HYDRA_SQL; override with
# HYDRA_SCHEMA_VERSION=N). Into the second it loads our files, each in one
# transaction. It then compares:
#
#   1. catalogs: relations, columns (order, type, default, nullability),
#      constraints, indexes, triggers, rules, function signatures,
#      sequences, extensions, comments, the row count of every table and
#      the seeded rows (SchemaVersion, NrBuilds);
#   2. pg_dump --schema-only of both, with function bodies left out
#      (a catch-all for anything section 1 does not look at);
#   3. behaviour: one psql session per database runs the same statements
#      (LISTEN on every channel, inserts/updates/deletes that should fire
#      the triggers, the FailedPaths rule, the NrBuilds counter, constraint
#      violations) and the transcripts must be identical;
#   4. function bodies, whitespace and case normalised. Informational:
#      we write our own plpgsql, so a body may differ as long as section 3
#      shows the same behaviour.
#
# Exit status: 0 when sections 1-3 show no difference, 1 when they do,
# 2 on a usage or setup error.
#
# PostgreSQL: with PGHOST set, the script uses that server (and PGPORT,
# PGUSER, ...); the role must be able to create databases and the pg_trgm
# extension. Otherwise it starts a throwaway server from SLUICE_PG_BIN, or
# the newest /usr/lib/postgresql/*/bin, or $PATH, in a temporary directory
# (as user `nobody` when run as root, since PostgreSQL refuses root) and
# removes it on exit. KEEP_TMP=1 keeps the temporary directory, with the
# compared files in it.

set -euo pipefail

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac

hydra_sql=$(realpath "$1")
shift
[ -r "$hydra_sql" ] || { echo "cannot read $hydra_sql" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
if [ $# -gt 0 ]; then
    ours=()
    for f in "$@"; do ours+=("$(realpath "$f")"); done
else
    shopt -s nullglob
    ours=("$here"/../hydra/*.sql)
    shopt -u nullglob
    [ ${#ours[@]} -gt 0 ] || { echo "no sql/hydra/*.sql found" >&2; exit 2; }
fi

# Schema version hydra-init would record.
version=${HYDRA_SCHEMA_VERSION:-}
if [ -z "$version" ]; then
    version=$(find "$(dirname "$hydra_sql")/migrations" -maxdepth 1 -name 'upgrade-*.sql' 2>/dev/null |
        sed -n 's/.*upgrade-\([0-9][0-9]*\)\.sql$/\1/p' | sort -n | tail -1)
fi
if [ -z "$version" ]; then
    echo "no migrations/ next to $hydra_sql: set HYDRA_SCHEMA_VERSION" >&2
    exit 2
fi
case "$version" in *[!0-9]*) echo "bad HYDRA_SCHEMA_VERSION" >&2; exit 2 ;; esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/hydra-schema-diff.XXXXXX")
chmod 755 "$tmp"
server_started=
pg_ctl_bin=
run_pg() { "$@"; }

cleanup() {
    set +e
    if [ -n "$server_started" ]; then
        run_pg "$pg_ctl_bin" -D "$tmp/pg/data" -m fast -w stop >/dev/null 2>&1
    elif [ -n "${db_ref:-}" ]; then
        dropdb --if-exists "$db_ref" 2>/dev/null
        dropdb --if-exists "$db_ours" 2>/dev/null
    fi
    if [ -n "${KEEP_TMP:-}" ]; then
        echo "kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT

find_pg_bin() {
    if [ -n "${SLUICE_PG_BIN:-}" ]; then echo "$SLUICE_PG_BIN"; return; fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n | tail -1 || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
    d=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
    [ -x "$d/initdb" ] && { echo "$d"; return; }
    echo "no PostgreSQL server binaries; set SLUICE_PG_BIN or PGHOST" >&2
    exit 2
}

if [ -z "${PGHOST:-}" ]; then
    bin=$(find_pg_bin)
    pg_ctl_bin="$bin/pg_ctl"
    export PATH="$bin:$PATH"
    mkdir -p "$tmp/pg"
    if [ "$(id -u)" = 0 ]; then
        chown nobody "$tmp/pg"
        run_pg() { runuser -u nobody -- "$@"; }
    fi
    run_pg "$bin/initdb" -D "$tmp/pg/data" -U postgres --auth=trust \
        --no-locale -E UTF8 >"$tmp/initdb.log" 2>&1 ||
        { cat "$tmp/initdb.log" >&2; exit 2; }
    run_pg "$pg_ctl_bin" -D "$tmp/pg/data" -w -l "$tmp/pg/log" \
        -o "-k $tmp/pg -c listen_addresses= -F" start >/dev/null ||
        { cat "$tmp/pg/log" >&2; exit 2; }
    server_started=1
    export PGHOST="$tmp/pg" PGUSER=postgres
    unset PGPORT PGDATABASE PGPASSWORD || true
fi
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"

db_ref="hydra_ref_$$"
db_ours="sluice_$$"
createdb "$db_ref"
createdb "$db_ours"

psql_q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }

echo "loading $hydra_sql (schema version $version) into $db_ref" >&2
psql_q -d "$db_ref" --single-transaction -f "$hydra_sql" \
    -c "insert into schemaversion (version) values ($version)" >/dev/null
for f in "${ours[@]}"; do
    echo "loading $f into $db_ours" >&2
    psql_q -d "$db_ours" --single-transaction -f "$f" >/dev/null
done

# ---------------------------------------------------------------- 1: catalogs

catalog_sql=$(cat <<'EOF'
\pset format unaligned
\pset fieldsep ' | '
\pset tuples_only on
-- Objects that belong to an extension are the extension's business.
create temp view own as
  select c.oid, c.relname, c.relkind from pg_class c
  join pg_namespace n on n.oid = c.relnamespace
  where n.nspname = 'public'
    and not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass
                    and d.objid = c.oid and d.deptype = 'e');
\echo == relations
select own.relname, own.relkind, c.relpersistence, c.reloptions, c.relhasrules,
       coalesce(am.amname, '-')
  from own join pg_class c using (oid) left join pg_am am on am.oid = c.relam
  order by own.relname;
\echo == columns
select table_name, ordinal_position, column_name, data_type,
       coalesce(character_maximum_length::text, '-'), coalesce(column_default, '-'),
       is_nullable, is_identity, is_generated, coalesce(collation_name, '-')
  from information_schema.columns where table_schema = 'public'
  order by table_name, ordinal_position;
\echo == constraints
select conrelid::regclass, conname, contype, pg_get_constraintdef(oid, true),
       condeferrable, condeferred, convalidated, connoinherit
  from pg_constraint where connamespace = 'public'::regnamespace
  order by 1::text, 2;
\echo == indexes
select tablename, indexname, indexdef from pg_indexes
  where schemaname = 'public' order by tablename, indexname;
\echo == triggers
select tgrelid::regclass, tgname, tgenabled, pg_get_triggerdef(oid, true)
  from pg_trigger where not tgisinternal
  and tgrelid in (select oid from own) order by 1::text, 2;
\echo == rules
select tablename, rulename, definition from pg_rules
  where schemaname = 'public' order by 1, 2;
\echo == functions (signature and attributes; bodies in section 4)
select p.proname, pg_get_function_identity_arguments(p.oid),
       p.prorettype::regtype, l.lanname, p.prokind, p.provolatile,
       p.proisstrict, p.prosecdef, p.proleakproof, p.proparallel, p.proconfig
  from pg_proc p join pg_language l on l.oid = p.prolang
  where p.pronamespace = 'public'::regnamespace
    and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass
                    and d.objid = p.oid and d.deptype = 'e')
  order by 1, 2;
\echo == sequences
select s.sequencename, s.data_type, s.start_value, s.min_value, s.max_value,
       s.increment_by, s.cycle, s.cache_size, coalesce(s.last_value::text, '-'),
       coalesce((select a.attrelid::regclass || '.' || a.attname
                   from pg_depend d join pg_attribute a
                     on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
                  where d.classid = 'pg_class'::regclass
                    and d.objid = (quote_ident(s.sequencename))::regclass
                    and d.deptype in ('a', 'i')), '-')
  from pg_sequences s where s.schemaname = 'public' order by 1;
\echo == extensions
select e.extname, e.extversion, n.nspname from pg_extension e
  join pg_namespace n on n.oid = e.extnamespace order by 1;
\echo == comments
select d.classoid::regclass, coalesce(c.relname, '-'), d.objsubid, d.description
  from pg_description d left join pg_class c on d.classoid = 'pg_class'::regclass and c.oid = d.objoid
  where d.objoid in (select oid from own)
     or d.objoid in (select oid from pg_constraint where connamespace = 'public'::regnamespace)
     or d.objoid in (select oid from pg_trigger where tgrelid in (select oid from own))
     or d.objoid in (select oid from pg_proc where pronamespace = 'public'::regnamespace)
  order by 1::text, 2, 3;
\echo == row counts
select relname, (xpath('/row/n/text()',
         query_to_xml(format('select count(*) as n from public.%I', relname), false, true, '')))[1]::text
  from own where relkind in ('r', 'p') order by 1;
\echo == rows of schemaversion and nrbuilds
select 'schemaversion', version::text from schemaversion;
select 'nrbuilds', what, count from nrbuilds order by what;
EOF
)

for db in "$db_ref" "$db_ours"; do
    psql_q -d "$db" <<<"$catalog_sql" >"$tmp/catalog.$db"
done

# ---------------------------------------------------------------- 2: pg_dump

for db in "$db_ref" "$db_ours"; do
    pg_dump --schema-only --no-owner --no-privileges "$db" |
        perl -0777 -pe '
            s/^--.*\n//mg;                     # comments
            s/^SET .*\n//mg;                   # session settings
            s/^SELECT pg_catalog\.set_config.*\n//mg;
            s/^\\(un)?restrict .*\n//mg;       # pg_dump 15.14+: random per-dump key
            s/\bAS (\$[A-Za-z_]*\$).*?\1;/AS <body>;/sg;   # function bodies
            s/\n{2,}/\n/g;' >"$tmp/dump.$db"
done

# ---------------------------------------------------------------- 3: behaviour

behaviour_sql=$(cat <<'EOF'
\set VERBOSITY terse
\pset footer off
listen builds_added; listen builds_deleted; listen builds_restarted;
listen builds_cancelled; listen builds_bumped; listen jobset_shares_changed;
listen jobsets_added; listen jobsets_deleted; listen jobset_scheduling_changed;
select * from schemaversion;
insert into users (username, emailaddress, password) values ('alice', 'a@example.org', 'x');
insert into projects (name, displayname, owner) values ('p', 'P', 'alice');
insert into jobsets (project, name, emailoverride, nixexprinput, nixexprpath) values ('p', 'legacy', '', 'src', 'release.nix');
insert into jobsets (project, name, emailoverride, type, flake) values ('p', 'flake', '', 1, 'github:x/y');
insert into jobsets (project, name, emailoverride, type) values ('p', 'bad', '', 1);
insert into jobsets (project, name, emailoverride, type, nixexprinput, nixexprpath) values ('p', 'bad', '', 2, 'a', 'b');
select project, name, id, enabled, enableemail, hidden, keepnr, checkinterval, schedulingshares, type from jobsets order by id;
update jobsets set schedulingshares = 100 where name = 'legacy';
update jobsets set schedulingshares = 5 where name = 'legacy';
update jobsets set schedulingshares = 0 where name = 'legacy';
update jobsets set checkinterval = 60 where name = 'legacy';
update jobsets set enabled = 0 where name = 'flake';
update jobsets set triggertime = 1 where name = 'flake';
update jobsets set triggertime = null where name = 'flake';
update jobsets set description = 'quiet' where name = 'flake';
insert into builds (finished, timestamp, jobset_id, job, drvpath, system) values (0, 1, 1, 'a', '/nix/store/aaa-a.drv', 'x86_64-linux');
insert into builds (finished, timestamp, jobset_id, job, drvpath, system, starttime, stoptime, buildstatus) values (1, 1, 1, 'b', '/nix/store/bbb-b.drv', 'x86_64-linux', 2, 3, 0);
insert into builds (finished, timestamp, jobset_id, job, drvpath, system, starttime) values (1, 1, 1, 'c', '/nix/store/ccc-c.drv', 'x86_64-linux', 2);
insert into builds (finished, timestamp, jobset_id, job, drvpath, system, stoptime) values (1, 1, 1, 'c', '/nix/store/ccc-c.drv', 'x86_64-linux', 2);
insert into builds (finished, timestamp, jobset_id, job, drvpath, system, starttime, stoptime) values (1, 1, 1, 'c', '/nix/store/ccc-c.drv', 'x86_64-linux', 0, 2);
select id, finished, maxsilent, timeout, ischannel, iscurrent, priority, globalpriority, keep from builds order by id;
select * from nrbuilds;
update builds set finished = 1, buildstatus = 4, starttime = 5, stoptime = 5 where id = 1;
select * from nrbuilds;
update builds set finished = 0 where id = 1;
select * from nrbuilds;
update builds set finished = 1, buildstatus = 0, starttime = 5, stoptime = 6 where id = 1;
select * from nrbuilds;
update builds set globalpriority = 10 where id = 1;
update builds set globalpriority = 10 where id = 1;
update builds set priority = 3 where id = 1;
insert into builds (finished, timestamp, jobset_id, job, drvpath, system, starttime, stoptime) values (2, 1, 1, 'd', '/nix/store/ddd-d.drv', 'x86_64-linux', 1, 1);
update builds set finished = 1 where job = 'd';
update builds set finished = 1, buildstatus = 4 where job = 'd';
select * from nrbuilds;
delete from builds where job = 'd';
select * from nrbuilds;
insert into buildoutputs (build, name, path) values (1, 'out', null);
insert into buildsteps (build, stepnr, type, drvpath, busy) values (1, 1, 0, '/nix/store/aaa-a.drv', 1);
select machine from buildsteps;
insert into buildsteps (build, stepnr, type, drvpath, busy, status) values (1, 2, 0, '/nix/store/aaa-a.drv', 0, 13);
insert into buildsteps (build, stepnr, type, drvpath, busy, status, resolveddrvpath) values (1, 2, 0, '/nix/store/aaa-a.drv', 0, 13, 'r-a.drv');
insert into buildsteps (build, stepnr, type, drvpath, busy, status, resolveddrvpath) values (1, 3, 0, '/nix/store/aaa-a.drv', 0, 0, 'r-a.drv');
insert into buildsteps (build, stepnr, type, drvpath, busy, status, resolveddrvpath) values (1, 3, 0, '/nix/store/aaa-a.drv', 1, null, 'r-a.drv');
insert into buildsteps (build, stepnr, type, busy) values (1, 4, 1, 0);
insert into buildstepoutputs (build, stepnr, name, path) values (1, 1, 'out', null);
insert into buildstepoutputs (build, stepnr, name, path) values (1, 9, 'out', null);
insert into failedpaths (path) values ('/nix/store/fff-f');
insert into failedpaths (path) values ('/nix/store/fff-f');
insert into failedpaths (path) values ('/nix/store/ggg-g'), ('/nix/store/ggg-g');
select * from failedpaths order by path;
insert into buildmetrics (build, name, value, project, jobset, job, timestamp) values (1, 'm', 1.5, 'p', 'legacy', 'a', 1);
insert into runcommandlogs (uuid, job_matcher, build_id, command, exit_code) values ('00000000-0000-0000-0000-000000000001', '*:*:*', 1, 'true', 0);
insert into runcommandlogs (uuid, job_matcher, build_id, command, end_time) values ('00000000-0000-0000-0000-000000000001', '*:*:*', 1, 'true', 3);
insert into runcommandlogs (uuid, job_matcher, build_id, command) values ('00000000-0000-0000-0000-000000000001', '*:*:*', 1, 'true');
insert into runcommandlogs (uuid, job_matcher, build_id, command) values ('00000000-0000-0000-0000-000000000001', '*:*:*', 1, 'true');
insert into systemstatus (what, status) values ('queue-runner', '{"status": "up"}');
insert into users (username, emailaddress, password) values ('bob', 'b@example.org', 'x');
update users set username = 'carol' where username = 'alice';
update projects set name = 'q' where name = 'p';
select project, name from jobsets order by id;
select project, jobset, job from buildmetrics;
delete from users where username = 'carol';
delete from projects where name = 'q';
update builds set finished = 0 where finished = 1;
select * from nrbuilds;
update builds set finished = 1, starttime = 7, stoptime = 8 where finished = 0;
select * from nrbuilds;
delete from builds where id = 2;
select * from nrbuilds;
delete from jobsets where name = 'flake';
select count(*) from builds;
select * from nrbuilds;
select count(*) from buildsteps;
EOF
)

for db in "$db_ref" "$db_ours"; do
    # The notification lines carry the backend's PID.
    psql -X -a -d "$db" <<<"$behaviour_sql" 2>&1 |
        sed -E 's/(server process with PID) [0-9]+/\1 N/' >"$tmp/behaviour.$db"
done

# ---------------------------------------------------------------- 4: bodies

bodies_sql=$(cat <<'EOF'
\pset format unaligned
\pset tuples_only on
select p.proname || ': ' ||
       lower(btrim(regexp_replace(p.prosrc, '\s+', ' ', 'g')))
  from pg_proc p where p.pronamespace = 'public'::regnamespace
    and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass
                    and d.objid = p.oid and d.deptype = 'e')
  order by p.proname;
EOF
)
for db in "$db_ref" "$db_ours"; do
    psql_q -d "$db" <<<"$bodies_sql" >"$tmp/bodies.$db"
done

# ---------------------------------------------------------------- report

status=0
section() {
    local title=$1 name=$2 counts=$3
    echo "=== $title"
    if diff -u --label "hydra/$name" --label "sluice/$name" \
            "$tmp/$name.$db_ref" "$tmp/$name.$db_ours"; then
        echo "(no difference; $(wc -l <"$tmp/$name.$db_ref") lines compared)"
    elif [ "$counts" = yes ]; then
        status=1
    fi
}
section "1. catalogs" catalog yes
section "2. pg_dump --schema-only (function bodies elided)" dump yes
section "3. behaviour transcript" behaviour yes
section "4. function bodies, normalised (informational)" bodies no

if [ "$status" = 0 ]; then
    echo "RESULT: no structural or behavioural difference"
else
    echo "RESULT: differences found"
fi
exit "$status"
