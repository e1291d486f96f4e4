"""Where an answer that is not Consul's is caught: where it is decoded, and nowhere else.

A malformed answer (not JSON, JSON of the wrong shape) is Consul's trouble:
a ConsulError, retried with backoff. A bug of ours inside an adapter call is
not: it goes up as it is, and the loop logs it as an internal error with its
traceback (SPEC §9.1) instead of asking whether the address is a Consul agent.
"""

import pytest

from test_consul_adapter import every_call, good_consul, serve  # noqa: F401 (serve: a fixture)
from vip_elector.consul import ConsulError

pytestmark = pytest.mark.compat

WRONG_SHAPES = ['{"Key": 1}', '"a string"', "[1, 2]", "null", '[{"Value": 5}]', '{"ID": 7}',
                '[{"Session": 3, "Flags": "x", "ModifyIndex": null, "Value": null}]',
                '{"Config": {"NodeName": 5}}', '{"vip-http": "passing"}', '[{"TTL": 10, "Checks": 3}]']
CALLS = [name for name, _ in every_call(None)]


def outcome(call) -> str:
    """'answered' or 'ConsulError'; any other exception escapes and fails the test."""
    try:
        call()
    except ConsulError:
        return "ConsulError"
    return "answered"


@pytest.mark.parametrize("body", WRONG_SHAPES)
@pytest.mark.parametrize("call", CALLS)
def test_json_of_the_wrong_shape_is_a_consul_error_or_an_answer_never_a_crash(serve, call, body):  # noqa: F811
    client, _ = serve(lambda seen: (200, {"X-Consul-Index": "7"}, body))
    assert outcome(dict(every_call(client))[call]) in ("answered", "ConsulError")


def test_a_key_of_the_wrong_shape_reads_as_fields_absent(serve):  # noqa: F811
    client, _ = serve(lambda seen: (200, {"X-Consul-Index": "7"},
                                    '[{"Session": 3, "Flags": "x", "ModifyIndex": null, "Value": null}]'))
    _, key = client.read_key()
    assert (key.value, key.flags, key.session, key.modify_index) == ("", 0, None, 0)


def test_a_bug_of_ours_in_an_adapter_call_is_not_reported_as_consul_trouble(serve):  # noqa: F811
    client, _ = serve(good_consul)
    with pytest.raises(TypeError):
        client.read_key(index=41, wait="soon")  # our mistake: a wait that is not a number
    assert client.read_key(index=41, wait=1)[0] == 42
