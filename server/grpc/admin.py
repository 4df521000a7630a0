"""The Admin servicer (admin key only): API keys, usage, prices, and the model
lifecycle calls that hot-load builds on."""

from __future__ import annotations

import logging
import re
import time

from gpt.checkpoint import CheckpointError
from gpt.quoting import quote
from gpt.registry import NAME_RE, ModelNotFound, RegistryError, validate_name
from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc
from server.accounting.accountant import Accountant
from server.accounting.auth import Authenticator, AuthError, hash_key, new_key
from server.accounting.ledger import (
    KEY_BANDS,
    MAX_SHARE,
    KeyInfo,
    LedgerStore,
    Price,
    StoreUnavailable,
    UsageRow,
)
from server.accounting.pricing import PriceBook
from server.errors import auth_error, exhausted, failed_precondition, invalid, not_found, unavailable
from server.grpc.servicer import InferenceServicer
from server.models.kv_budget import KVBudgetExhausted
from server.models.manager import ModelManager

log = logging.getLogger("sol.admin")

DAY_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")      # ASCII: \d would take any script's digits
MAX_KEY_NAME = 64


def key_pb(k: KeyInfo) -> pb.ApiKey:
    msg = pb.ApiKey(key_id=k.key_id, name=k.name, prefix=k.prefix, created=k.created, revoked=k.revoked,
                    tokens_used=k.tokens_used, share=k.share, band=k.band)
    for f in ("token_budget", "rpm", "tpm"):
        if getattr(k, f) is not None:
            setattr(msg, f, getattr(k, f))
    return msg


def scheduling_fields(request) -> tuple[float | None, str | None]:
    """A CreateKey/UpdateKey request's share and band (None = unset), checked."""
    share = request.share if request.HasField("share") else None
    band = request.band if request.HasField("band") else None
    if share is not None and not 0 < share <= MAX_SHARE:
        raise invalid(f"share must be in (0, {MAX_SHARE:g}] (got {share:g}); 1 = an equal share, 2 = twice that")
    if band is not None and band not in KEY_BANDS:
        raise invalid(f"band must be one of {', '.join(KEY_BANDS)} (got {quote(band)})")
    return share, band


def row_pb(r: UsageRow) -> pb.UsageRow:
    return pb.UsageRow(key_id=r.key_id, model=r.model, day=r.day, requests=r.requests, prompt_tokens=r.prompt_tokens,
                       completion_tokens=r.completion_tokens, cached_tokens=r.cached_tokens,
                       total_tokens=r.total_tokens, cost=r.cost)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, store: LedgerStore, auth: Authenticator, accountant: Accountant, prices: PriceBook,
                 models: ModelManager, inference: InferenceServicer, run) -> None:
        self.store = store
        self.auth = auth
        self.accountant = accountant
        self.prices = prices
        self.models = models
        self.inference = inference
        self._run = run
        self.hotloader = None     # set by the app when it follows the registry

    async def _call(self, context, method: str, fn):
        """Admin check, then `fn()`, in the same frame (errors, metrics) as Inference."""
        async with self.inference.call(context, method):
            try:
                self.auth.check_admin(context.invocation_metadata())
            except AuthError as err:
                raise auth_error(err) from None
            try:
                return await fn()
            except StoreUnavailable as err:
                raise unavailable(f"the ledger store is unreachable ({err}); retry shortly") from None

    async def CreateKey(self, request, context):
        async def fn():
            name = request.name.strip()
            if not name or len(name) > MAX_KEY_NAME:
                raise invalid(f"name must be 1-{MAX_KEY_NAME} characters (got {len(name)}); e.g. --name team-a")
            for field in ("token_budget", "rpm", "tpm"):
                if request.HasField(field) and getattr(request, field) < 1:
                    raise invalid(f"{field} must be >= 1 when set (got {getattr(request, field)}); leave it unset "
                                  "for no limit")
            share, band = scheduling_fields(request)
            clear, key_id, prefix = new_key()
            info = KeyInfo(key_id=key_id, name=name, prefix=prefix, created=int(time.time()),
                           token_budget=request.token_budget if request.HasField("token_budget") else None,
                           rpm=request.rpm if request.HasField("rpm") else None,
                           tpm=request.tpm if request.HasField("tpm") else None,
                           share=1.0 if share is None else share, band=band or "interactive")
            await self._run(self.store.create_key, info, hash_key(self.auth.pepper, clear))
            return pb.CreateKeyResponse(info=key_pb(info), key=clear)
        return await self._call(context, "CreateKey", fn)

    async def UpdateKey(self, request, context):
        async def fn():
            if not request.key_id:
                raise invalid("key_id is empty: name the key to update (see ListKeys)")
            share, band = scheduling_fields(request)
            key = await self._run(self.store.update_key, request.key_id, share, band)
            if key is None:
                raise not_found(f"no key with id {quote(request.key_id)} (see ListKeys)")
            # Cached copies of the key are dropped: its next request is scheduled as updated.
            self.auth.forget(request.key_id)
            return pb.UpdateKeyResponse(info=key_pb(key))
        return await self._call(context, "UpdateKey", fn)

    async def RevokeKey(self, request, context):
        async def fn():
            if not request.key_id:
                raise invalid("key_id is empty: name the key to revoke (see ListKeys)")
            key = await self._run(self.store.get_key, request.key_id)
            if key is None:
                raise not_found(f"no key with id {quote(request.key_id)} (see ListKeys)")
            revoked = await self._run(self.store.revoke_key, request.key_id)
            self.auth.forget(request.key_id)
            return pb.RevokeKeyResponse(revoked=revoked)
        return await self._call(context, "RevokeKey", fn)

    async def ListKeys(self, request, context):
        async def fn():
            keys = await self._run(self.store.list_keys, request.include_revoked)
            return pb.ListKeysResponse(keys=[key_pb(k) for k in keys])
        return await self._call(context, "ListKeys", fn)

    async def GetUsage(self, request, context):
        async def fn():
            for field in ("from_day", "to_day"):
                value = getattr(request, field)
                if value and not DAY_RE.fullmatch(value):
                    raise invalid(f"{field} must be YYYY-MM-DD (got {quote(value)})")
            rows = await self._run(self.store.usage, request.key_id, request.model, request.from_day, request.to_day)
            total = UsageRow()
            for r in rows:
                total.add(r)
            return pb.GetUsageResponse(rows=[row_pb(r) for r in rows], total=row_pb(total),
                                       spooled_records=len(self.accountant.spool))
        return await self._call(context, "GetUsage", fn)

    async def SetPrice(self, request, context):
        async def fn():
            if not NAME_RE.fullmatch(request.model):
                raise invalid(f"model must be a model name (got {quote(request.model)})")
            p = request.price
            price = Price(p.prompt_per_1k, p.completion_per_1k, p.cached_discount)
            try:
                price.validate()
            except ValueError as err:
                raise invalid(str(err)) from None
            await self.prices.set(request.model, price)
            return pb.SetPriceResponse(price=p)
        return await self._call(context, "SetPrice", fn)

    # --- model lifecycle --------------------------------------------------------------------
    async def LoadModel(self, request, context):
        async def fn():
            try:
                if self.hotloader is not None:
                    # Through the hot-load worker, so loads never race each other.
                    model = await self._run(lambda: self.hotloader.submit(
                        lambda: self.models.load(request.model)).result())
                else:
                    model = await self._run(self.models.load, request.model)
            except ModelNotFound as err:
                raise not_found(str(err)) from None
            except (RegistryError, CheckpointError) as err:
                raise invalid(str(err)) from None
            except KVBudgetExhausted as err:
                raise exhausted(str(err)) from None
            return pb.LoadModelResponse(info=self.inference.model_info(model))
        return await self._call(context, "LoadModel", fn)

    async def UnloadModel(self, request, context):
        async def fn():
            try:
                model = self.models.resolve(request.model)
            except ModelNotFound as err:
                raise not_found(str(err)) from None
            except RegistryError as err:
                raise invalid(str(err)) from None
            self.models.unload(model.name, model.version)
            if self.hotloader is not None:
                # The same retirement as a swap: closed when its last request ends, and
                # counted by the next load of this model (at most two versions in memory).
                self.hotloader.retire([model])
            else:
                await self._run(_shutdown_when_idle, model)
            return pb.UnloadModelResponse(unloaded=True)
        return await self._call(context, "UnloadModel", fn)

    async def SetAlias(self, request, context):
        """Promote or roll back: point `model:alias` at `version` for the next request.
        The registry is updated too where this server may write it, so every replica
        follows; on a read-only registry the change holds for this server only."""
        async def fn():
            name, alias, version = request.model, request.alias, request.version
            try:
                validate_name(name)
                validate_name(alias, "alias")
                self.models.registry.resolve(f"{name}@{version}")
                try:
                    await self._run(self.models.registry.set_alias, name, alias, version)
                except OSError as err:
                    log.warning("registry is read-only (%s); %s:%s -> %s holds on this server only",
                                err, name, alias, version)
                if self.hotloader is not None:
                    outcome = await self._run(lambda: self.hotloader.submit(
                        lambda: self.hotloader.switch(name, alias, version)).result())
                    if not outcome.ok:
                        raise failed_precondition(f"cannot serve {outcome.ref}: {outcome.error}")
                else:
                    self.models.set_alias(name, alias, version)
                model = self.models.resolve(f"{name}@{version}")
            except ModelNotFound as err:
                raise not_found(str(err)) from None
            except RegistryError as err:
                raise invalid(str(err)) from None
            return pb.SetAliasResponse(info=self.inference.model_info(model))
        return await self._call(context, "SetAlias", fn)


def _shutdown_when_idle(model, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while model.in_flight > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    model.close()

