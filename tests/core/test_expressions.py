"""Resolving expressions at run time, and the codec that carries them through JSON."""

from __future__ import annotations

import json

import pytest

from khutulun import codec
from khutulun.expressions import Unknown, references, resolve
from khutulun.model import AttributeRef, Concat, Join, Token, Topology
from khutulun.tosca import load_file


def lookup(ref: AttributeRef) -> object:
    table = {("db", "address"): "10.0.0.7", ("db", "port"): 5432, ("db", "meta"): {"tags": ["a", "b"]}}
    if (ref.node, ref.attribute) not in table:
        raise Unknown(ref)
    return table[(ref.node, ref.attribute)]


def test_expressions_resolve_to_text_and_data() -> None:
    address = Concat((AttributeRef("db", "address", "endpoint"), ":", AttributeRef("db", "port", "endpoint")))
    assert resolve({"DB": address, "list": [Join(("x", AttributeRef("db", "port")), "-")]}, lookup) == {
        "DB": "10.0.0.7:5432", "list": ["x-5432"]}
    assert resolve(Token(AttributeRef("db", "address"), ".", 3), lookup) == "7"
    assert resolve(AttributeRef("db", "meta", path=("tags", 1)), lookup) == "b"
    assert references(address) == [AttributeRef("db", "address", "endpoint"), AttributeRef("db", "port", "endpoint")]


def test_an_attribute_not_known_yet_says_which() -> None:
    with pytest.raises(Unknown) as caught:
        resolve([Concat(("x", AttributeRef("cache", "port")))], lookup)
    assert caught.value.ref.node == "cache"


def test_a_topology_survives_the_codec_through_json(tmp_path) -> None:
    from pathlib import Path

    topology = load_file(Path(__file__).resolve().parents[2] / "examples" / "hello-world.yaml")
    text = json.dumps(codec.dump(topology))
    again = codec.load(Topology, json.loads(text))
    assert again == topology
