"""Two replicas sharing one Redis: keys, quotas, budgets and the ledger are shared."""

from __future__ import annotations

import grpc
import pytest

from client.client import Client
from client.types import SolError
from tests.service.harness import ADMIN_KEY, RunningServer, wait_for

MSG = [{"role": "user", "content": "hi"}]


def test_replicas_share_keys_quotas_and_ledger(tiny_checkpoint, tmp_path, durable_redis):
    registry, _ = tiny_checkpoint
    a = RunningServer(registry.root, tmp_path / "a", redis_url=durable_redis.url).start()
    b = RunningServer(registry.root, tmp_path / "b", redis_url=durable_redis.url).start()
    try:
        with Client(a.target, admin_key=ADMIN_KEY) as admin_a, Client(b.target, admin_key=ADMIN_KEY) as admin_b:
            key, info = admin_a.create_key("shared", rpm=4)
            with Client(a.target, api_key=key, retries=0) as ca, Client(b.target, api_key=key, retries=0) as cb:
                for c in (ca, cb, ca, cb):
                    c.chat(MSG, model="tiny", max_tokens=2)
                for c in (ca, cb):
                    with pytest.raises(SolError) as err:
                        c.chat(MSG, model="tiny", max_tokens=2)
                    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                # Both replicas' usage lands in one ledger, readable from either.
                report = admin_b.usage(key_id=info.key_id)
                assert report.total.requests == 4
                assert admin_a.usage(key_id=info.key_id).total == report.total
                # A revocation on one replica reaches the other within the key cache's life.
                admin_a.revoke_key(info.key_id)

                def refused_on_b():
                    try:
                        cb.count_tokens("tiny", prompt="x")
                    except SolError as e:
                        return e.code == grpc.StatusCode.UNAUTHENTICATED
                    return False

                wait_for(refused_on_b, timeout=10, message="revocation to reach replica b")

            # One request id runs once across replicas: a duplicate on the other is refused.
            dup_key, _ = admin_a.create_key("dup")
            with Client(a.target, api_key=dup_key, retries=0) as ca, \
                    Client(b.target, api_key=dup_key, retries=0) as cb:
                stream = ca.chat_stream(MSG, model="tiny", max_tokens=150, ignore_eos=True, request_id="once")
                it = iter(stream)
                next(it)
                with pytest.raises(SolError) as err:
                    cb.chat(MSG, model="tiny", max_tokens=2, request_id="once")
                assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and "another replica" in err.value.message
                list(it)
                with pytest.raises(SolError) as err:
                    cb.chat(MSG, model="tiny", max_tokens=2, request_id="once")
                assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and "already served" in err.value.message

            budget_key, _ = admin_b.create_key("budget", token_budget=60)
            with Client(a.target, api_key=budget_key, retries=0) as ca, \
                    Client(b.target, api_key=budget_key, retries=0) as cb:
                ca.chat(MSG, model="tiny", max_tokens=20, ignore_eos=True)     # 27 of 60 tokens
                cb.chat(MSG, model="tiny", max_tokens=20, ignore_eos=True)     # 54 of 60
                with pytest.raises(SolError) as err:
                    ca.chat(MSG, model="tiny", max_tokens=20)
                assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "budget" in err.value.message
    finally:
        a.stop()
        b.stop()


def test_redis_holds_no_key_in_clear(tiny_checkpoint, tmp_path, durable_redis):
    import redis

    registry, _ = tiny_checkpoint
    s = RunningServer(registry.root, tmp_path / "a", redis_url=durable_redis.url).start()
    try:
        with Client(s.target, admin_key=ADMIN_KEY) as admin:
            key, _ = admin.create_key("secret-check")
        r = redis.Redis.from_url(durable_redis.url)
        dump = b"".join(r.dump(k) or b"" for k in r.keys("*")) + b"".join(r.keys("*"))
        assert key.encode() not in dump and key[len("sk-sol-"):].encode() not in dump
    finally:
        s.stop()


def test_a_replica_with_another_pepper_refuses_to_start(tiny_checkpoint, tmp_path, durable_redis):
    registry, _ = tiny_checkpoint
    a = RunningServer(registry.root, tmp_path / "a", redis_url=durable_redis.url).start()
    try:
        b = RunningServer(registry.root, tmp_path / "b", redis_url=durable_redis.url, key_pepper="another")
        b._thread.start()
        with pytest.raises(ValueError, match="SOL_KEY_PEPPER"):
            b.call(b.app.start())
        b.loop.call_soon_threadsafe(b.loop.stop)
    finally:
        a.stop()
