"""The manifest loader's plain YAML walk (domain/manifest.py, ``_plain``) gives exactly what
PyYAML's SafeLoader gives, and leaves everything else to it (docs/performance.md)."""

from __future__ import annotations

import pytest
import yaml

from reconciler.domain import manifest as loader_module
from reconciler.domain.manifest import load_file

DOCUMENTS = [
    "a: 1\nb: two\nc: [x, 'y', \"z\"]\nd: {e: null, f: ~, g: true, h: no, i: 1.5}\n",
    "n: 0x1F\no: 0o17\np: 1_000\nq: -.inf\ns: 1:30\nt: '007'\nu: 2026-12-01\n",
    "dup: 1\ndup: 2\n1: int key\ntrue: bool key\nnull: null key\n",
    "base: &b {x: 1}\nuse: *b\nmerged: {<<: *b, y: 2}\n",
    "bin: !!binary aGVsbG8=\nset: !!set {a, b}\nomap: !!omap [{a: 1}]\n",
    "---\nfirst: 1\n---\nsecond: [2, {deep: [3]}]\n...\n",
    "list:\n- - - nested\n- ''\n- \"\\u00e9\\t\"\n",
    "x: " + "[" * 400 + "]" * 400 + "\n",
]


def values(text: str) -> list[object]:
    return [doc.value for doc in loader_module._documents("m.yaml", text)]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_values_are_pyyaml_safe_loader_values(text: str) -> None:
    expected = list(yaml.load_all(text, Loader=yaml.CSafeLoader))  # SafeLoader with a C parser
    got = values(text)
    assert got == expected


def test_plain_manifest_is_not_constructed_by_pyyaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain walk is what reads an ordinary manifest (PyYAML's constructor is not asked)."""
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("constructed by PyYAML")

    monkeypatch.setattr(yaml.constructor.BaseConstructor, "construct_document", refuse)
    text = ("apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: plain}\n"
            "spec:\n  engine: docker\n  publisher: ipfs\n  docker: {image: \"ubuntu\"}\n"
            "policy: {maxRetries: 2}\n")
    result = load_file("plain.yaml", text.encode())
    assert not result.errors and result.manifests[0].policy.max_retries == 2


def test_alias_bomb_still_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    result = load_file("bomb.yaml", ("\n".join(lines) + "\n").encode())
    assert [e.message for e in result.errors] == [
        f"document expands to more than {loader_module.MAX_NODES} values; refused"]


@pytest.mark.parametrize("text", [b"a: !!python/object:os.system x\n",
                                  b"? [complex, key]\n: value\n"])
def test_what_pyyaml_refuses_is_one_line_error(text: bytes) -> None:
    [error] = load_file("bad.yaml", text).errors
    assert str(error) == "bad.yaml:1: file: invalid YAML: ConstructorError"


def test_plain_document_counted_as_before() -> None:
    """Without aliases each node is one value: the plain walk's count is _check_size's."""
    limit = loader_module.MAX_NODES
    at_limit = "[" + "1," * (limit - 1) + "]\n"  # the list and its items: exactly the limit
    over = "[" + "1," * limit + "]\n"
    assert [e.message for e in load_file("a.yaml", at_limit.encode()).errors] == [
        "must be a mapping"]
    assert [e.message for e in load_file("b.yaml", over.encode()).errors] == [
        f"document expands to more than {limit} values; refused"]


JSON_MANIFEST = """{
  "apiVersion": "reconciler/v1",
  "kind": "Job",
  "metadata": {"name": "from-json"},
  "spec": {"engine": "docker", "publisher": "ipfs",
           "docker": {"image": "ubuntu", "imgae": "x"}}
}
"""


def test_valid_json_manifest_is_not_composed_as_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON file's YAML node is only for the line numbers of errors (docs/performance.md)."""
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("composed")

    monkeypatch.setattr(yaml, "compose", refuse)
    valid = JSON_MANIFEST.replace(', "imgae": "x"', "")
    result = load_file("from-json.json", valid.encode())
    assert not result.errors and result.manifests[0].name == "from-json"


def test_broken_json_manifest_still_names_the_line() -> None:
    [error] = load_file("from-json.json", JSON_MANIFEST.encode()).errors
    assert str(error).startswith("from-json.json:6: spec.Docker.imgae: ")
