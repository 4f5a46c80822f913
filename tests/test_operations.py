import pytest

from actors.errors import InvalidRequest, UnsafePath
from actors.operations import ModelDownload, parse_operation


def test_download_defaults():
    op = parse_operation({"operation": "model_download", "model": "org/name"})
    assert isinstance(op, ModelDownload)
    assert (op.revision, op.vendor, op.files) == ("main", "hf", None)


@pytest.mark.parametrize(
    "body",
    [
        {"operation": "model_download", "model": "org/name", "modle": "typo"},
        {"operation": "nope"},
        {"model": "org/name"},
        {"operation": "model_download"},
        {"operation": "model_download", "model": "org/name", "files": "*.json"},
        {"operation": "model_download", "model": "org/name", "vendor": "ftp"},
        [],
        "x",
    ],
)
def test_bad_operations_are_refused(body):
    with pytest.raises(InvalidRequest):
        parse_operation(body)


@pytest.mark.parametrize(
    "body",
    [
        {"operation": "model_download", "model": "../etc"},
        {"operation": "model_download", "model": "org/.."},
        {"operation": "model_download", "model": "/abs/path"},
        {"operation": "model_download", "model": "org/na\x00me"},
        {"operation": "model_download", "model": "org/name", "files": ["../x"]},
        {"operation": "model_download", "model": "org/name", "files": ["/etc/passwd"]},
        {"operation": "model_download", "model": "org/name", "files": ["a/../../b"]},
        {"operation": "model_download", "model": "org/name", "revision": "../../x"},
        {"operation": "model_get", "model": "a/b/c"},
        {"operation": "model_delete", "model": ".."},
    ],
)
def test_paths_that_leave_the_cache_are_refused(body):
    with pytest.raises(UnsafePath):
        parse_operation(body)
