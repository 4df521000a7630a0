#!/usr/bin/env python3
"""Container healthcheck: ask the server's grpc.health.v1 service whether it is SERVING.

Docker's HEALTHCHECK and compose's `depends_on: service_healthy` run this; Kubernetes uses
its native gRPC probe against the same service instead. Exit 0 = SERVING, 1 = anything
else (NOT_SERVING while no model is loaded or while draining, unreachable, timeout).
"""

from __future__ import annotations

import argparse
import os
import sys


def check(target: str, service: str, timeout: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return False, f"{err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("SOL_HEALTH_TARGET", "127.0.0.1:50051"))
    # "" is the server as a whole: the readiness the service engineer's health servicer reports.
    parser.add_argument("--service", default=os.environ.get("SOL_HEALTH_SERVICE", ""))
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    ok, status = check(args.target, args.service, args.timeout)
    print(f"{args.target} service={args.service!r}: {status}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
