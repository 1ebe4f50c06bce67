# Put before an attribute set in a test expression: `ca attrs` is `mkDrv`
# for a floating content-addressed derivation.
let
  ca = attrs: mkDrv ({
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    PATH = "/usr/bin:/bin";
  } // attrs);
in
