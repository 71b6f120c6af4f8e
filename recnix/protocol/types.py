"""Value types carried by worker-protocol messages (NI §1.5).

Store paths are full printed paths (``/nix/store/<hash>-<name>``) as ``str``;
hashes, signatures and content addresses are kept in their wire spelling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass
class PathInfo:
    """``UnkeyedValidPathInfo``: what QueryPathInfo returns (no path)."""

    deriver: str | None
    nar_hash: str  # base16 sha256, no prefix (as written by Nix)
    references: list[str] = field(default_factory=list)
    registration_time: int = 0
    nar_size: int = 0
    ultimate: bool = False  # minor >= 16
    sigs: list[str] = field(default_factory=list)  # minor >= 16, "keyname:base64"
    ca: str | None = None  # minor >= 16, e.g. "fixed:r:sha256:<nix32>"


@dataclass
class ValidPathInfo:
    """PathInfo with its store path (AddToStore reply, AddMultipleToStore entries)."""

    path: str
    info: PathInfo


@dataclass
class DerivedPath:
    """A path to realise: opaque (``outputs is None``) or outputs of a derivation.

    ``outputs == ["*"]`` means all outputs. ``path`` is the drv path for the built form.
    """

    path: str
    outputs: list[str] | None = None

    @property
    def is_built(self) -> bool:
        """Whether this names derivation outputs rather than a plain store path."""
        return self.outputs is not None


@dataclass
class Realisation:
    """A realisation in its JSON wire form (minor >= 31, without the path-not-hash feature).

    ``id`` is the DrvOutput id ``<algo>:<hash>!<output>``; ``out_path`` is a full
    store path (the JSON holds the base name). ``None`` fields were absent from the
    JSON; ``structured_signatures`` records whether signatures were JSON objects.
    """

    id: str
    out_path: str
    signatures: list[str] | None = field(default_factory=list)
    dependent_realisations: dict[str, str] | None = field(default_factory=dict)
    structured_signatures: bool = False

    @property
    def output_name(self) -> str:
        """The output name part of ``id``."""
        return self.id.rpartition("!")[2]


@dataclass
class DrvOutput:
    """DrvOutput in the ``realisation-with-path-not-hash`` layout (drv path + output)."""

    drv_path: str
    output_name: str


@dataclass
class UnkeyedRealisation:
    """Realisation value in the ``realisation-with-path-not-hash`` layout."""

    out_path: str
    signatures: list[str] = field(default_factory=list)


@dataclass
class KeyedRealisation:
    """Realisation with its key in the ``realisation-with-path-not-hash`` layout."""

    key: DrvOutput
    value: UnkeyedRealisation


@dataclass
class BuildResult:
    """Result of building one derived path (NI §1.5).

    ``built_outputs`` is keyed as on the wire: DrvOutput id with Realisation
    values, or output name with UnkeyedRealisation values under the
    ``realisation-with-path-not-hash`` feature.
    """

    status: int
    error_msg: str = ""
    times_built: int = 0  # minor >= 29
    is_non_deterministic: bool = False  # minor >= 29
    start_time: int = 0  # minor >= 29
    stop_time: int = 0  # minor >= 29
    cpu_user: int | None = None  # minor >= 37, microseconds
    cpu_system: int | None = None  # minor >= 37, microseconds
    built_outputs: dict[str, Realisation | UnkeyedRealisation] = field(
        default_factory=dict
    )  # minor >= 28


@dataclass
class KeyedBuildResult:
    """A BuildPathsWithResults entry: the derived path and its result."""

    path: DerivedPath
    result: BuildResult


@dataclass
class DerivationOutput:
    """One output of a BasicDerivation, as its three wire strings."""

    path: str  # "" for floating/deferred
    hash_algo: str = ""
    hash: str = ""


@dataclass
class BasicDerivation:
    """A derivation without inputDrvs and name, as sent by BuildDerivation."""

    outputs: dict[str, DerivationOutput]
    input_srcs: list[str]
    platform: str
    builder: str
    args: list[str]
    env: dict[str, str]


@dataclass
class ClientOptions:
    """SetOptions payload: 12 integers, then (minor >= 12) the settings overrides."""

    keep_failed: int = 0
    keep_going: int = 0
    try_fallback: int = 0
    verbosity: int = 0
    max_build_jobs: int = 1
    max_silent_time: int = 0
    use_build_hook: int = 1
    verbose_build: int = 0
    log_type: int = 0
    print_build_trace: int = 0
    build_cores: int = 0
    use_substitutes: int = 1
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass
class SubstitutablePathInfo:
    """QuerySubstitutablePathInfo(s) entry."""

    deriver: str | None
    references: list[str] = field(default_factory=list)
    download_size: int = 0
    nar_size: int = 0


@dataclass
class Missing:
    """QueryMissing reply."""

    will_build: list[str] = field(default_factory=list)
    will_substitute: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    download_size: int = 0
    nar_size: int = 0


@dataclass
class GCResult:
    """CollectGarbage reply."""

    paths: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    obsolete: int = 0


@dataclass
class ClientHandshakeInfo:
    """What the server sends after the version/feature exchange: Nix version and trust."""

    nix_version: str | None = None  # minor >= 33
    trust: int | None = None  # minor >= 35: None unknown, 1 trusted, 2 not trusted


class BuildStatus(enum.IntEnum):
    """BuildResult status codes (Nix 2.8's build-result.hh; later Nix adds none we use)."""

    Built = 0
    Substituted = 1
    AlreadyValid = 2
    PermanentFailure = 3
    InputRejected = 4
    OutputRejected = 5
    TransientFailure = 6
    CachedFailure = 7
    TimedOut = 8
    MiscFailure = 9
    DependencyFailed = 10
    LogLimitExceeded = 11
    NotDeterministic = 12
    ResolvesToAlreadyValid = 13
    NoSubstituters = 14


_SUCCESSES = frozenset(
    {
        BuildStatus.Built,
        BuildStatus.Substituted,
        BuildStatus.AlreadyValid,
        BuildStatus.ResolvesToAlreadyValid,
    }
)


def build_succeeded(status: int) -> bool:
    """Whether a BuildResult ``status`` (any int off the wire) means the outputs exist."""
    return status in _SUCCESSES


TRUSTED = 1
NOT_TRUSTED = 2
