"""The output schema itself, and documents built by the code that prints them."""

from __future__ import annotations

import json

import jsonschema
import pytest

from qmpnet import schema
from qmpnet.model import InterfaceDescription, IPAddress
from qmpnet.recovery import ReconcileReport
from qmpnet.testing.output import conforms
from qmpnet.views import list_document


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema.load())
    assert schema.load()["$defs"]["schema"] == {"const": schema.SCHEMA_VERSION}


def test_the_interface_echo_keeps_katas_shape_and_no_version() -> None:
    desc = InterfaceDescription(
        device="eth0",
        name="eth0",
        hw_addr="52:54:00:00:00:01",
        mtu=1400,
        ip_addresses=(IPAddress(family=4, address="169.254.1.2", mask="24"),),
    )
    conforms(desc.to_json(), "interface")
    with pytest.raises(jsonschema.ValidationError, match="schema"):
        conforms(schema.versioned(desc.to_json()), "interface")


def test_documents_carry_the_version_and_refuse_unknown_keys() -> None:
    doc = schema.versioned(list_document([], []))
    assert next(iter(doc)) == "schema"
    conforms(json.loads(json.dumps(doc)), "interfaceList")
    with pytest.raises(jsonschema.ValidationError, match="surprise"):
        conforms({**doc, "surprise": 1}, "interfaceList")
    with pytest.raises(jsonschema.ValidationError, match="schema"):
        conforms(list_document([], []), "interfaceList")


def test_a_reconcile_report_conforms() -> None:
    report = ReconcileReport(qmp_path="/run/vm/qmp.sock", qemu_running=False)
    conforms(schema.versioned(report.to_json()), "reconcile")
