"""Every device property says what it means (Jive shows the description), and every
property a pipeline definition registers is one its device class declares."""

import importlib
import pkgutil
from pathlib import Path

import pytest
from tango.server import Device

import devices
from devices.starter import SERVER_CLASSES, server_classes
from pipelines.definition import load_definition

ROOT = Path(__file__).resolve().parent.parent


def device_classes() -> dict[str, type]:
    """Every Tango device class defined in devices/ (found by importing each module)."""
    found = {}
    for info in pkgutil.iter_modules(devices.__path__):
        module = importlib.import_module(f"devices.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Device) and obj.__module__ == module.__name__:
                found[obj.__name__] = obj
    return found


CLASSES = device_classes()


def test_every_server_class_is_found_and_has_a_wrapper_module():
    assert set(SERVER_CLASSES) <= set(CLASSES)
    servers = server_classes()
    assert set(SERVER_CLASSES) <= set(servers)
    for name, module in servers.items():
        assert CLASSES[name].__module__ == module


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_device_property_has_a_description(name):
    properties = CLASSES[name].TangoClassClass.device_property_list
    undocumented = [prop for prop, (_, doc, *_rest) in properties.items() if not str(doc).strip()]
    assert not undocumented, f"{name}: device_property(...) without doc=: {undocumented}"


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "config").glob("*.yaml")))
def test_every_registered_property_is_declared_by_its_class(config):
    definition = load_definition(ROOT / "config" / config)
    for spec in definition.devices():
        declared = CLASSES[spec.cls].TangoClassClass.device_property_list
        undeclared = set(spec.tango_properties()) - set(declared)
        assert not undeclared, f"{config}: {spec.name} ({spec.cls}) gets undeclared properties {undeclared}"
