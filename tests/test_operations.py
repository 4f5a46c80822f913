import pytest

from actors.core.errors import InvalidRequest, UnsafePath
from actors.core.operations import ModelDownload, check_id, is_id, parse_operation


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


@pytest.mark.parametrize(
    "body",
    [
        # `$` matches before a final newline, so every id is matched whole.
        {"operation": "model_get", "model": "org/name\n"},
        {"operation": "model_download", "model": "\norg/name"},
        {"operation": "infer", "model": "org/name ", "prompt": "x"},
        {"operation": "model_delete", "model": "org/na me"},
    ],
)
def test_model_ids_with_whitespace_are_refused(body):
    with pytest.raises(UnsafePath):
        parse_operation(body)


@pytest.mark.parametrize(
    "bad",
    ["x\n", " x", "x ", "a b", "a\tb", "a\x00b", "a\x7fb", "a\u00a0b", "a\u200bb", "a\u2028b"],
)
@pytest.mark.parametrize(
    "body",
    [
        {"operation": "hive_list", "hive_id": "{}"},
        {"operation": "worker_stop", "worker_id": "{}"},
        {"operation": "infer", "model": "org/name", "prompt": "x", "worker_id": "{}"},
        {"operation": "worker_spawn", "model": "org/name", "worker_id": "{}"},
        {"operation": "model_download", "model": "org/name", "revision": "{}"},
        {"operation": "model_download", "model": "org/name", "files": ["{}"]},
        {"operation": "model_download", "model": "org/name", "vendor": "url", "url": "http://h/{}"},
    ],
)
def test_ids_with_whitespace_or_control_characters_are_refused(body, bad):
    with pytest.raises(InvalidRequest):
        parse_operation({k: _fill(v, bad) for k, v in body.items()})


@pytest.mark.parametrize("bad", ["", "x" * 129])
def test_ids_are_1_to_128_characters(bad):
    for body in (
        {"operation": "hive_list", "hive_id": bad},
        {"operation": "worker_stop", "worker_id": bad},
    ):
        with pytest.raises(InvalidRequest):
            parse_operation(body)


def _fill(value, bad):
    if isinstance(value, list):
        return [v.replace("{}", bad) for v in value]
    return value.replace("{}", bad) if isinstance(value, str) else value


def test_good_ids_pass():
    op = parse_operation(
        {
            "operation": "model_download",
            "model": "Org-1/name_2.v3",
            "revision": "refs/pr/1",
            "files": ["*.safetensors", "sub/config.json"],
            "vendor": "url",
            "url": "https://example.com/a/b?c=d",
            "hive_id": "3f2a9c",
        }
    )
    assert isinstance(op, ModelDownload) and op.hive_id == "3f2a9c"
    assert parse_operation({"operation": "worker_stop", "worker_id": "w-main"})


def test_check_id():
    assert check_id("job-1") == "job-1"
    assert is_id("é-ok") and not is_id("job-1\n") and not is_id("x" * 129)
    with pytest.raises(InvalidRequest, match="job_id"):
        check_id("job 1", "job_id")


_CALL = {"api": "chat", "request": {"model": "org/name", "messages": [{"role": "user", "content": "hi"}]}}


def test_an_infer_may_carry_an_openai_request():
    op = parse_operation({"operation": "infer", "model": "org/name", "openai": _CALL})
    assert op.openai is not None and op.openai.api == "chat" and op.prompt is None


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"max_tokens": 5}, "its request's parameters apply"),  # would be ignored: refused
        ({"prompt": "hi"}, "exactly one"),
        ({"model": "org/other"}, "differ"),
        ({"openai": {**_CALL, "api": "embeddings"}}, "api"),
    ],
)
def test_an_openai_infer_takes_nothing_it_would_ignore(extra, words):
    with pytest.raises(InvalidRequest, match=words):
        parse_operation({"operation": "infer", "model": "org/name", "openai": _CALL, **extra})
