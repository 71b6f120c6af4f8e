"""The NixOS module, evaluated with Debian's nix-instantiate (Nix 2.8).

module/eval/eval.nix evaluates module/default.nix against stubs of the NixOS
options it writes to, with the evaluation harness module/eval/lib.nix as
`lib`, or nixpkgs' real lib when RECNIX_NIXPKGS_LIB=/path/to/nixpkgs/lib is set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from recnix.config.loader import (
    hook_environment,
    load_config,
    load_defaults,
    nix_conf_settings,
    render_nix_conf,
)

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
EVAL_FILE = REPO / "module" / "eval" / "eval.nix"
GEN_SCRIPT = REPO / "scripts" / "gen-nixos-options.py"
NRM = "/nix/store/11111111111111111111111111111111-nix-required-mounts"
NRM_MODULE = f"""{{
  programs.nix-required-mounts.enable = true;
  programs.nix-required-mounts.package = {{
    type = "derivation"; name = "nix-required-mounts"; outPath = "{NRM}";
    meta.mainProgram = "nix-required-mounts";
  }};
}}"""


class EvalError(Exception):
    """nix-instantiate failed; the message is its stderr."""


def nix_eval(attr: str, modules: list[str] | None = None, enable: bool = True) -> Any:
    """Evaluate ``attr`` of eval.nix with extra modules (Nix expressions)."""
    exe = shutil.which("nix-instantiate")
    if exe is None:
        pytest.fail("nix-instantiate not found: install Debian's nix-bin (./setup.sh)")
    argv = [exe, "--eval", "--strict", "--json", str(EVAL_FILE), "-A", attr]
    argv += ["--arg", "modules", "[ " + " ".join(f"({m})" for m in modules or []) + " ]"]
    argv += ["--arg", "enable", "true" if enable else "false"]
    nixpkgs_lib = os.environ.get("RECNIX_NIXPKGS_LIB")
    if nixpkgs_lib:
        argv += ["--arg", "lib", f"import {Path(nixpkgs_lib).resolve()}"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise EvalError(done.stderr)
    return json.loads(done.stdout)


def config_toml(modules: list[str] | None = None) -> dict[str, Any]:
    return tomllib.loads(nix_eval("configToml", modules))


def hooks(package: str) -> tuple[str, str]:
    return f"{package}/bin/recnix-pre-build-hook", f"{package}/bin/recnix-post-build-hook"


def build_hook(package: str) -> str:
    return f"{package}/bin/recnix-build-hook"


def test_nix_conf_settings_equal_recnix_nix_conf() -> None:
    package = nix_eval("package")
    expected = nix_conf_settings(load_defaults(), *hooks(package), build_hook=build_hook(package))
    assert nix_eval("nixSettings") == expected


def test_nix_conf_text_equals_render_nix_conf() -> None:
    package = nix_eval("package")
    assert nix_eval("nixConf") == render_nix_conf(
        load_defaults(), *hooks(package), build_hook=build_hook(package)
    )


def test_uses_extra_system_features_never_system_features() -> None:
    settings = nix_eval("nixSettings")
    features = settings["extra-system-features"].split()
    assert features == ["recnix", "recnix-readonly", "recursive-nix"]
    assert "system-features" not in settings


LIX_PACKAGE = """{
  nix.package = {
    type = "derivation"; name = "lix-2.94.2"; pname = "lix"; version = "2.94.2";
    outPath = "/nix/store/22222222222222222222222222222222-lix-2.94.2";
    meta.mainProgram = "nix";
  };
}"""


@pytest.mark.parametrize(
    "module", [LIX_PACKAGE, "{ services.recnix.lix = true; }"], ids=["nix.package", "option"]
)
def test_lix_leaves_out_the_builtin_recursive_nix(module: str) -> None:
    package = nix_eval("package")
    settings = nix_eval("nixSettings", [module])
    assert settings == nix_conf_settings(
        load_defaults(), *hooks(package), lix=True, build_hook=build_hook(package)
    )
    assert "experimental-features" not in settings and "build-hook" not in settings
    assert settings["extra-system-features"].split() == ["recnix", "recnix-readonly"]


def test_lix_option_forced_off_on_a_lix_package_fails_evaluation() -> None:
    """services.recnix.lix = false on Lix would put recnix's build-hook into a Lix
    nix.conf (every build then fails: issue 20): evaluation stops with a clear message."""
    for attr in ("nixSettings", "nixConf", "nixDaemonExecStart"):
        with pytest.raises(
            EvalError, match=r"services\.recnix\.lix = false, but nix\.package is Lix"
        ):
            nix_eval(attr, [LIX_PACKAGE, "{ services.recnix.lix = false; }"])


@pytest.mark.parametrize("version", ["2.93.0", "2.94.2", "2.95.3"])
def test_no_build_hook_anywhere_on_lix(version: str) -> None:
    """Whatever the Lix version, neither nix.conf nor nix-daemon's command line names
    recnix's build-hook."""
    lix = nix_package(version, "lix")
    conf = nix_eval("nixConf", [lix])
    assert "recnix-pre-build-hook" in conf  # the hooks recnix does use are there
    assert "recnix-build-hook" not in conf
    assert not [line for line in conf.splitlines() if line.startswith("build-hook")]
    assert nix_eval("nixDaemonExecStart", [lix]) is None


def test_lix_option_on_a_nix_package_leaves_out_the_builtin() -> None:
    """services.recnix.lix = true on a Nix package (e.g. a Lix under another name)."""
    settings = nix_eval("nixSettings", ["{ services.recnix.lix = true; }"])
    assert "build-hook" not in settings and "experimental-features" not in settings


def test_disabled_module_sets_nothing() -> None:
    assert nix_eval("nixSettings", enable=False) == {}


def test_config_file_defaults_are_defaults_toml() -> None:
    expected = {k: v for k, v in load_defaults().items() if k != "nix"}
    assert config_toml() == expected


def test_every_defaults_key_is_a_typed_option() -> None:
    names = {o["name"] for o in nix_eval("docList")}
    for section, table in load_defaults().items():
        if section in ("nix", "hooks"):
            continue
        for key in table:
            assert f"services.recnix.settings.{section}.{key}" in names


def test_policy_settings_flow_into_the_config_file(tmp_path: Path) -> None:
    got = config_toml(
        [
            "{ services.recnix.settings.policy.max-depth = 7; }",
            "{ services.recnix.settings.policy.readonly-only = true; }",
            '{ services.recnix.settings.daemon.upstream = "unix:///run/other.sock"; }',
            '{ services.recnix.settings.signing.secret-key-files = [ "/etc/nix/key" ]; }',
        ]
    )
    assert got["policy"]["max-depth"] == 7
    assert got["policy"]["readonly-only"] is True
    assert got["daemon"]["upstream"] == "unix:///run/other.sock"
    assert got["signing"]["secret-key-files"] == ["/etc/nix/key"]
    # The daemon accepts the file the module writes.
    path = tmp_path / "config.toml"
    path.write_text(nix_eval("configToml", ["{ services.recnix.settings.policy.max-depth = 7; }"]))
    assert load_config(path).settings.policy.max_depth == 7


def test_wrongly_typed_setting_is_rejected() -> None:
    with pytest.raises(EvalError, match="max-depth"):
        nix_eval("configToml", ["{ services.recnix.settings.policy.max-depth = -1; }"])


def test_nix_required_mounts_hook_is_chained() -> None:
    package = nix_eval("package")
    settings = nix_eval("nixSettings", [NRM_MODULE])
    assert settings["pre-build-hook"] == hooks(package)[0]
    got = config_toml([NRM_MODULE])
    assert got["hooks"]["pre-build"] == [f"{NRM}/bin/nix-required-mounts"]
    assert got["hooks"]["post-build"] == []


def test_dropping_nix_required_mounts_from_the_chain_fails() -> None:
    with pytest.raises(EvalError, match="nix-required-mounts is enabled"):
        nix_eval("nixSettings", [NRM_MODULE, "{ services.recnix.preBuildHooks = [ ]; }"])


def test_post_build_hooks_are_chained() -> None:
    got = config_toml(['{ services.recnix.postBuildHooks = [ "/run/upload-hook" ]; }'])
    assert got["hooks"]["post-build"] == ["/run/upload-hook"]


def test_another_post_build_hook_conflicts_loudly() -> None:
    with pytest.raises(EvalError, match="conflicting definition values"):
        nix_eval("nixSettings", ['{ nix.settings.post-build-hook = "/run/upload-hook"; }'])


def test_service_unit() -> None:
    unit = nix_eval("recnixService")
    service = unit["serviceConfig"]
    assert service["ExecStart"].endswith("/bin/recnix daemon --config /etc/recnix/config.toml")
    assert service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "recnix"
    assert {"CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE"} <= set(
        service["CapabilityBoundingSet"]
    )
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert service["NoNewPrivileges"] is True
    # It must act in the builds' mount namespaces: none of these may be set.
    for forbidden in ("PrivateMounts", "ProtectSystem", "RestrictNamespaces", "ProtectProc"):
        assert forbidden not in service
    assert "nix-daemon.socket" in unit["after"]
    assert "nix-daemon.socket" in unit["wants"]
    assert unit["environment"]["RECNIX_CONFIG"] == "/etc/recnix/config.toml"
    assert nix_eval("nixDaemonEnvironment")["RECNIX_CONFIG"] == "/etc/recnix/config.toml"


def test_hook_decision_in_the_daemon_environment() -> None:
    """The module renders the hook script's decision as recnix.config.loader.hook_environment
    does; with chained hooks it leaves it out (the script reads the config then)."""
    expected = hook_environment(load_defaults())
    assert expected["RECNIX_HOOK_SOCKET"] == "/run/recnix/control.sock"
    env = nix_eval("nixDaemonEnvironment")
    assert {k: v for k, v in env.items() if k.startswith("RECNIX_HOOK_")} == expected
    chained = nix_eval("nixDaemonEnvironment", ['{ services.recnix.postBuildHooks = [ "/x" ]; }'])
    assert "RECNIX_HOOK_SOCKET" not in chained
    assert "RECNIX_HOOK_SOCKET" not in nix_eval("nixDaemonEnvironment", [NRM_MODULE])


def load_gen_script():
    spec = importlib.util.spec_from_file_location("gen_nixos_options", GEN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_table_is_current() -> None:
    done = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_options_table_check_detects_a_stale_block(tmp_path: Path) -> None:
    gen = load_gen_script()
    stale = tmp_path / "README.md"
    stale.write_text(f"# x\n{gen.BEGIN}\n| old |\n{gen.END}\n")
    gen.TARGETS = (stale,)
    gen.REPO = tmp_path
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert "services.recnix.settings.policy.max-depth" in stale.read_text()
    assert gen.main(["--check"]) == 0


def nix_package(version: str, pname: str = "nix") -> str:
    return f"""{{
  nix.package = {{
    type = "derivation"; name = "{pname}-{version}"; pname = "{pname}"; version = "{version}";
    outPath = "/nix/store/33333333333333333333333333333333-{pname}-{version}";
    meta.mainProgram = "nix";
  }};
}}"""


@pytest.mark.parametrize(
    ("version", "on_command_line"),
    [("2.8.0", False), ("2.24.9", False), ("2.25.0", True), ("2.28.4", True), ("2.34.8", False)],
)
def test_build_hook_on_the_daemons_command_line_where_nix_conf_loses_it(
    version: str, on_command_line: bool
) -> None:
    """Nix 2.25-2.33 reset nix.conf's build-hook (recnix.cli.nixversion): the module gives
    it on nix-daemon's command line there."""
    package = nix_eval("package")
    exec_start = nix_eval("nixDaemonExecStart", [nix_package(version)])
    if not on_command_line:
        assert exec_start is None, exec_start
        return
    hook = build_hook(package)
    daemon = f"/nix/store/33333333333333333333333333333333-nix-{version}/bin/nix-daemon"
    assert exec_start == ["", f"{daemon} --daemon --option build-hook {hook}"]
    assert nix_eval("nixSettings", [nix_package(version)])["build-hook"] == hook


def test_no_build_hook_command_line_on_lix() -> None:
    assert nix_eval("nixDaemonExecStart", [nix_package("2.28.0", "lix")]) is None
