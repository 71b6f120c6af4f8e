# A small stand-in for nixpkgs' `lib`: just enough of the module system and of
# `lib.types` to evaluate module/default.nix with Debian's Nix 2.8 and no
# nixpkgs checkout (no network here). Semantics follow nixpkgs where the module
# relies on them: definitions pushed through mkIf/mkMerge/mkOverride lazily
# (a condition is only evaluated when its option is), the highest priority
# wins (mkForce 50 < plain 100 < mkDefault 1000 < option default 1500),
# lists concatenate, scalars must agree, submodules with a freeformType.
# Type descriptions are worded as nixpkgs words them, so the generated options
# table reads the same with either lib (module/eval/eval.nix takes either).
let
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    concatStringsSep
    elem
    filter
    foldl'
    genList
    head
    isAttrs
    isBool
    isFloat
    isFunction
    isInt
    isList
    isPath
    isString
    length
    listToAttrs
    map
    tail
    typeOf
    ;

  concatMap = f: list: concatLists (map f list);
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
  mapAttrs = builtins.mapAttrs;
  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };
  showLoc = concatStringsSep ".";
  isOption = x: isAttrs x && x._type or null == "option";
  isDerivation = x: isAttrs x && x.type or null == "derivation";

  # --- properties -------------------------------------------------------------
  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkOptionDefault = mkOverride 1500;
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;

  # Definitions of `path` inside the value `v`, with the conditions and the
  # priority met on the way. Conditions are collected, not evaluated.
  lookup =
    path: v:
    let
      t = if isAttrs v then v._type or null else null;
    in
    if t == "if" then
      map (d: d // { conds = d.conds ++ [ v.condition ]; }) (lookup path v.content)
    else if t == "merge" then
      concatMap (lookup path) v.contents
    else if t == "override" then
      map (d: d // { prio = if d.prio == null then v.priority else d.prio; }) (lookup path v.content)
    else if path == [ ] then
      [
        {
          value = v;
          prio = null;
          conds = [ ];
        }
      ]
    else if isAttrs v && v ? ${head path} then
      lookup (tail path) v.${head path}
    else
      [ ];

  # Attribute names defined in `v`, looking through properties (no condition evaluated).
  namesOf =
    v:
    let
      t = if isAttrs v then v._type or null else null;
    in
    if t == "if" || t == "override" then
      namesOf v.content
    else if t == "merge" then
      concatMap namesOf v.contents
    else if isAttrs v then
      attrNames v
    else
      [ ];

  # Keep the definitions whose conditions hold and that have the highest priority.
  activeDefs =
    defs:
    let
      live = filter (d: all (c: c) d.conds) defs;
      prioOf = d: if d.prio == null then 100 else d.prio;
      best = foldl' (m: d: if prioOf d < m then prioOf d else m) 9999 live;
    in
    filter (d: prioOf d == best) live;

  # Merge raw definitions (from `lookup`) with `type`; null when none is active.
  mergeDefs =
    loc: type: defs:
    let
      active = activeDefs defs;
      values = map (d: { inherit (d) value; }) active;
      bad = filter (d: !(type.check d.value)) values;
    in
    if active == [ ] then
      null
    else if bad != [ ] then
      throw "The option `${showLoc loc}' has a value of the wrong type: expected ${type.description}, got ${typeOf (head bad).value}."
    else
      { value = type.merge loc values; };

  mergeEqualOption =
    loc: defs:
    let
      first = (head defs).value;
    in
    if all (d: d.value == first) defs then
      first
    else
      throw "The option `${showLoc loc}' has conflicting definition values.";

  # --- types --------------------------------------------------------------------
  mkOptionType =
    {
      name,
      description ? name,
      check ? (_: true),
      merge ? mergeEqualOption,
      getSubOptions ? (_: { }),
      ...
    }@attrs:
    {
      _type = "option-type";
      inherit
        name
        description
        check
        merge
        getSubOptions
        ;
    }
    // removeAttrs attrs [
      "name"
      "description"
      "check"
      "merge"
      "getSubOptions"
    ];

  scalar =
    name: description: check:
    mkOptionType { inherit name description check; };

  types = rec {
    bool = scalar "bool" "boolean" isBool;
    int = scalar "int" "signed integer" isInt;
    float = scalar "float" "floating point number" isFloat;
    str = scalar "str" "string" isString;
    path = scalar "path" "absolute path" (
      x: isPath x || (isString x && builtins.substring 0 1 x == "/") || (isAttrs x && x ? outPath)
    );
    package = scalar "package" "package" (x: isDerivation x || (isAttrs x && x ? outPath));
    anything = mkOptionType {
      name = "anything";
      description = "anything";
      merge =
        loc: defs:
        let
          values = map (d: d.value) defs;
        in
        if all isList values then
          concatLists values
        else if all (v: isAttrs v && !(v ? outPath)) values then
          let
            raw = map (d: d.value) defs;
            names = unique (concatMap attrNames raw);
          in
          listToAttrs (
            concatMap (
              n:
              let
                merged = mergeDefs (loc ++ [ n ]) anything (concatMap (lookup [ n ]) raw);
              in
              optional (merged != null) {
                name = n;
                inherit (merged) value;
              }
            ) names
          )
        else
          mergeEqualOption loc defs;
    };
    ints = {
      positive = scalar "positiveInt" "positive integer, meaning >0" (x: isInt x && x > 0);
      unsigned = scalar "unsignedInt" "unsigned integer, meaning >=0" (x: isInt x && x >= 0);
    };
    enum =
      values:
      scalar "enum" "one of ${concatStringsSep ", " (map (v: ''"${v}"'') values)}" (x: elem x values);
    listOf =
      elemType:
      mkOptionType {
        name = "listOf";
        description = "list of ${phrase elemType}";
        check = x: isList x && all elemType.check x;
        merge = loc: defs: concatMap (d: d.value) defs;
        inherit elemType;
      };
    attrsOf =
      elemType:
      mkOptionType {
        name = "attrsOf";
        description = "attribute set of ${phrase elemType}";
        check = isAttrs;
        merge =
          loc: defs:
          let
            raw = map (d: d.value) defs;
          in
          listToAttrs (
            concatMap (
              n:
              let
                merged = mergeDefs (loc ++ [ n ]) elemType (concatMap (lookup [ n ]) raw);
              in
              optional (merged != null) {
                name = n;
                inherit (merged) value;
              }
            ) (unique (concatMap attrNames raw))
          );
        inherit elemType;
      };
    lazyAttrsOf = attrsOf;
    nullOr =
      t:
      mkOptionType {
        name = "nullOr";
        description = "null or ${phrase t}";
        check = x: x == null || t.check x;
        merge =
          loc: defs: if all (d: d.value == null) defs then null else t.merge loc (filter (d: d.value != null) defs);
      };
    either =
      a: b:
      mkOptionType {
        name = "either";
        description = "${phrase a} or ${phrase b}";
        check = x: a.check x || b.check x;
        merge =
          loc: defs:
          if all (d: a.check d.value) defs then
            a.merge loc defs
          else if all (d: b.check d.value) defs then
            b.merge loc defs
          else
            throw "The option `${showLoc loc}' has definitions of different types.";
      };
    oneOf = ts: foldl' either (head ts) (tail ts);
    submodule = submoduleWith;
    submoduleWith =
      modules:
      let
        mods = if isList modules then modules else [ modules ];
        evalWith = defs: evalModules { modules = mods ++ defs; };
        freeform = (evalWith [ ]).freeformType;
      in
      mkOptionType {
        name = "submodule";
        description =
          if freeform == null then
            "submodule"
          else if freeform.name == "attrsOf" || freeform.name == "listOf" then
            "open submodule of ${freeform.description}"
          else
            "open submodule of ${phrase freeform}";
        check = x: isAttrs x || isFunction x;
        merge = loc: defs: (evalWith (map (d: { config = d.value; }) defs)).config;
        getSubOptions = prefix: (evalModules {
          modules = mods;
          inherit prefix;
        }).options;
      };
  };

  # nixpkgs parenthesises composite descriptions inside others.
  phrase =
    t:
    if
      elem t.name [
        "either"
        "nullOr"
        "submodule"
      ]
    then
      "(${t.description})"
    else if t.name == "listOf" || t.name == "attrsOf" then
      "(${t.description})"
    else
      t.description;

  # --- options --------------------------------------------------------------------
  mkOption =
    attrs:
    attrs
    // {
      _type = "option";
      type = attrs.type or types.anything;
    };
  mkEnableOption = name: mkOption {
    type = types.bool;
    default = false;
    example = true;
    description = "Whether to enable ${name}.";
  };
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };
  literalMD = text: {
    _type = "literalMD";
    inherit text;
  };

  # --- the module system -----------------------------------------------------------
  evalModules =
    {
      modules,
      prefix ? [ ],
      specialArgs ? { },
    }:
    let
      args = specialArgs // {
        inherit lib config options;
        name = if prefix == [ ] then "" else builtins.elemAt prefix (length prefix - 1);
      };
      load =
        m:
        let
          f = if isPath m || isString m then import m else m;
          v = if isFunction f then f args else f;
          shorthand = !(v ? config || v ? options || v ? freeformType);
        in
        {
          imports = v.imports or [ ];
          options = v.options or { };
          freeformType = v.freeformType or (v.config or { })._module.freeformType or null;
          config =
            if shorthand then
              removeAttrs v [
                "imports"
                "freeformType"
                "meta"
                "_file"
                "key"
              ]
            else
              removeAttrs (v.config or { }) [ "_module" ];
        };
      collect = m: let l = load m; in [ l ] ++ concatMap collect l.imports;
      loaded = concatMap collect modules;
      freeforms = filter (f: f != null) (map (l: l.freeformType) loaded);
      freeformType = if freeforms == [ ] then null else head freeforms;

      mergeDecls =
        a: b:
        if isOption a || isOption b then
          throw "option declared twice"
        else
          a // mapAttrs (n: bv: if a ? ${n} then mergeDecls a.${n} bv else bv) b;
      decls = foldl' mergeDecls { } (map (l: l.options) loaded);

      configs = map (l: l.config) loaded;
      defsAt = path: concatMap (lookup path) configs;

      # Unknown names at a node go to the freeform type (its element type).
      freeformAt =
        path: node:
        let
          known = attrNames node;
          names = unique (
            filter (n: !(elem n known)) (concatMap (c: concatMap namesOf (lookupNode path c)) configs)
          );
          elemType = freeformType.elemType or freeformType;
        in
        if freeformType == null then
          (
            if names == [ ] then
              { }
            else
              throw "The option `${showLoc (prefix ++ path ++ [ (head names) ])}' does not exist."
          )
        else
          listToAttrs (
            concatMap (
              n:
              let
                merged = mergeDefs (prefix ++ path ++ [ n ]) elemType (defsAt (path ++ [ n ]));
              in
              optional (merged != null) {
                name = n;
                inherit (merged) value;
              }
            ) names
          );
      lookupNode = path: c: map (d: d.value) (lookup path c);

      build =
        path: node:
        if isOption node then
          let
            loc = prefix ++ path;
            merged = mergeDefs loc node.type (defsAt path);
          in
          if merged != null then
            merged.value
          else if node ? default then
            node.default
          else
            throw "The option `${showLoc loc}' is used but not defined."
        else
          freeformAt path node // mapAttrs (n: sub: build (path ++ [ n ]) sub) node;

      annotate =
        path: node:
        if isOption node then
          node
          // {
            loc = prefix ++ path;
            value = build path node;
          }
        else
          mapAttrs (n: sub: annotate (path ++ [ n ]) sub) node;

      config = build [ ] decls;
      options = annotate [ ] decls;
    in
    {
      inherit config options freeformType;
    };

  lib = {
    inherit
      mkIf
      mkMerge
      mkOverride
      mkDefault
      mkForce
      mkOptionDefault
      mkOption
      mkEnableOption
      mkOptionType
      literalExpression
      literalMD
      types
      evalModules
      isOption
      optional
      optionals
      optionalAttrs
      concatMap
      mapAttrs
      unique
      ;
    inherit (builtins)
      concatStringsSep
      elem
      attrNames
      filter
      ;
    getExe' = pkg: exe: "${pkg}/bin/${exe}";
    getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram or pkg.pname}";
    # as nixpkgs' lib.getName: a package's pname, else the name part of its name
    getName =
      x:
      if builtins.isString x then
        (builtins.parseDrvName x).name
      else
        x.pname or (builtins.parseDrvName x.name).name;
    mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (attrNames attrs);
    boolToString = b: if b then "true" else "false";
    genList = genList;
    any = any;
    version = "recnix-eval-harness";
  };
in
lib
