"""Registry: lookups, duplicates/override, aliases, close-match errors, lazy home import, plugins."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import registry
from registry import Registry, RegistryError
from registry import plugins as plugin_loader

REPO_ROOT = Path(__file__).resolve().parents[1]


class Alpha:
    pass


class Beta:
    pass


def test_named_registries_exist():
    assert set(registry.ALL) == {
        "models", "image_encoders", "llms", "qformers", "builders", "tasks", "processors", "lr_schedulers", "runners",
    }
    for name, reg in registry.ALL.items():
        assert getattr(registry, name) is reg and reg.name == name


def test_register_get_list_and_aliases():
    reg = Registry("things")
    assert reg.register("blip2", "blip2_feature_extractor")(Alpha) is Alpha  # decorator returns the class
    reg.add("beta", Beta)
    assert reg.get("blip2") is Alpha and reg.get("blip2_feature_extractor") is Alpha
    assert reg.list() == ["beta", "blip2", "blip2_feature_extractor"]
    assert reg.names_of(Alpha) == ["blip2", "blip2_feature_extractor"]
    assert "beta" in reg and "gamma" not in reg and len(reg) == 3
    with pytest.raises(TypeError, match="at least one name"):
        reg.register()
    with pytest.raises(TypeError, match="non-empty"):
        reg.add("", Beta)


def test_factory_functions_register_too():
    reg = Registry("factories")

    @reg.register("make_three")
    def make_three() -> int:
        return 3

    assert reg.get("make_three")() == 3


def test_duplicate_name_is_an_error_unless_override():
    reg = Registry("things")
    reg.register("blip2")(Alpha)
    reg.register("blip2")(Alpha)  # re-registering the very same object is harmless (module re-import)
    with pytest.raises(RegistryError) as err:
        reg.register("blip2")(Beta)
    message = str(err.value)
    assert "things" in message and "blip2" in message and "Alpha" in message and "override=True" in message
    assert reg.get("blip2") is Alpha
    reg.register("blip2", override=True)(Beta)
    assert reg.get("blip2") is Beta


def test_unknown_name_error_names_registry_name_close_matches_and_choices():
    reg = Registry("models")
    for name in ("blip2_opt", "blip2_t5", "blip2", "clip"):
        reg.add(name, Alpha)
    with pytest.raises(RegistryError) as err:
        reg.get("blip2_otp")
    message = str(err.value)
    assert "registry 'models'" in message and "'blip2_otp'" in message
    assert "Did you mean: blip2_opt" in message
    assert "Available: blip2, blip2_opt, blip2_t5, clip" in message
    assert isinstance(err.value, KeyError)  # callers may catch KeyError
    with pytest.raises(RegistryError, match=r"Available: \(none\)"):
        Registry("empty").get("x")


def test_registering_does_not_import_home_and_lookup_does_once(tmp_path: Path, monkeypatch):
    home = tmp_path / "fake_home_pkg.py"
    home.write_text(textwrap.dedent("""
        import registry
        IMPORTS = globals().get("IMPORTS", 0) + 1
        from test_registry_home_target import REG
        REG.add("builtin", object)
    """))
    (tmp_path / "test_registry_home_target.py").write_text(
        "from registry import Registry\nREG = Registry('homed', home='fake_home_pkg')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import test_registry_home_target as target

    target.REG.add("mine", Alpha)
    assert "fake_home_pkg" not in sys.modules  # registration is a dict insert
    assert target.REG.get("mine") is Alpha  # a known name needs no import either
    assert "fake_home_pkg" not in sys.modules
    assert "builtin" in target.REG.list()  # list() loads the built-ins
    assert sys.modules["fake_home_pkg"].IMPORTS == 1
    target.REG.get("builtin")
    assert sys.modules["fake_home_pkg"].IMPORTS == 1
    for name in ("fake_home_pkg", "test_registry_home_target"):
        sys.modules.pop(name, None)


def test_home_import_error_surfaces_and_is_retried(tmp_path: Path, monkeypatch):
    (tmp_path / "broken_home_pkg.py").write_text("raise RuntimeError('home is broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("fragile", home="broken_home_pkg")
    for _ in range(2):  # not silently marked as loaded after the first failure
        with pytest.raises(RuntimeError, match="home is broken"):
            reg.get("anything")


def test_import_registry_is_fast_and_light():
    code = (
        "import sys, time; t = time.perf_counter(); import registry; dt = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'torchvision', 'transformers', 'timm', 'models', 'datasets', 'decord') "
        "if m in sys.modules]; print(dt, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    seconds, heavy = out.stdout.split(" ", 1)
    assert heavy.strip() == "[]"
    assert float(seconds) < 0.3, f"import registry took {seconds} s"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import registry"], cwd=REPO_ROOT, check=True)
    assert time.perf_counter() - start < 3.0  # whole interpreter start included; well under a second when idle


# ---------------------------------------------------------------------------------------------------
# plugins
# ---------------------------------------------------------------------------------------------------
PLUGIN_SOURCE = """
import registry

@registry.processors.register({name!r})
class PluginProcessor:
    CONFIG_KEYS = ()

    @classmethod
    def from_config(cls, cfg=None):
        return cls()

    def __call__(self, text):
        return text.upper()
"""


def write_plugin(directory: Path, module: str, registered_name: str) -> None:
    (directory / f"{module}.py").write_text(PLUGIN_SOURCE.format(name=registered_name))


def test_load_plugins_imports_modules_that_register(tmp_path: Path, monkeypatch):
    write_plugin(tmp_path, "yaml_listed_plugin", "plugin_upper_a")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert registry.load_plugins(["yaml_listed_plugin"]) == ["yaml_listed_plugin"]
        assert registry.processors.get("plugin_upper_a").from_config()("hi") == "HI"
        assert registry.load_plugins("yaml_listed_plugin") == ["yaml_listed_plugin"]  # idempotent; str accepted
    finally:
        registry.processors.unregister("plugin_upper_a")
        sys.modules.pop("yaml_listed_plugin", None)


def test_load_plugins_errors_are_clear(tmp_path: Path, monkeypatch):
    with pytest.raises(registry.PluginNotFoundError, match="plugin module 'no_such_plugin_mod' could not be imported.*--plugins"):
        registry.load_plugins(["no_such_plugin_mod"])
    (tmp_path / "plugin_with_missing_dep.py").write_text("import some_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="some_missing_dependency_xyz"):
        registry.load_plugins(["plugin_with_missing_dep"])  # the plugin's own missing import, shown as is
    with pytest.raises(ValueError, match="module names"):
        registry.load_plugins([3])


def write_entry_point_dist(site: Path, module: str, registered_name: str, dist: str = "blip2_test_plugin") -> None:
    """A minimal installed distribution: a module plus a dist-info declaring the blip2.plugins entry point."""
    write_plugin(site, module, registered_name)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[blip2.plugins]\n{dist} = {module}\n")


def test_entry_point_plugin_in_process(tmp_path: Path, monkeypatch):
    write_entry_point_dist(tmp_path, "ep_plugin_module", "plugin_upper_ep")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "blip2_test_plugin" in plugin_loader.load_entry_point_plugins(force=True)
        assert registry.processors.get("plugin_upper_ep").from_config()("ok") == "OK"
    finally:
        registry.processors.unregister("plugin_upper_ep")
        sys.modules.pop("ep_plugin_module", None)


def test_entry_point_plugin_found_by_first_lookup_in_fresh_process(tmp_path: Path):
    write_entry_point_dist(tmp_path, "ep_plugin_fresh", "plugin_upper_fresh")
    code = "import registry; cls = registry.processors.get('plugin_upper_fresh'); print(cls.__module__, cls.from_config()('x'))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)]))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ep_plugin_fresh", "X"]


def test_broken_entry_point_names_itself(tmp_path: Path, monkeypatch):
    info = tmp_path / "blip2_broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: blip2_broken_plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[blip2.plugins]\nbroken = module_that_does_not_exist_q\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="broken = module_that_does_not_exist_q.*blip2_broken_plugin"):
        plugin_loader.load_entry_point_plugins(force=True)
