-- Realisations: the output path each built output of a content-addressed
-- (floating) or deferred derivation got, keyed as Nix keys them
-- (`DrvOutput`): the derivation's hash modulo, with its outputs masked
-- ("sha256:<base16>"), and the output's name. Written in the transaction
-- that records the step's result; read by point queries on the key when
-- builds are loaded (are their outputs known?) and when steps are
-- resolved (what did their inputs become?).
create table SluiceRealisations (
    drvHash     text not null,
    outputName  text not null,
    outPath     text not null,
    -- The derivation whose build recorded it, for operators.
    drvPath     text not null,
    primary key (drvHash, outputName)
);
