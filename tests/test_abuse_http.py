"""Abuse cases for the HTTP front door: query parameters a route does not take, slow and
too many clients, TLS, and per-token rate limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gatekeeper.http.routes import ROUTES

from .conftest import DEPLOY_RULE, ENV, Project


def _project(project_factory: Callable[..., Project], **extra: Any) -> Project:
    project = project_factory(**extra)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    return project


# ---------------------------------------------------------------------------------------------
# Unknown query parameters

GET_ROUTES = [route for route in ROUTES if route.method == "GET"]


def _concrete(path: str) -> str:
    """A path of the route with a value in each path parameter."""
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: f"x-{m.group(1)}", path)


@pytest.mark.parametrize("route", GET_ROUTES, ids=[r.operation_id for r in GET_ROUTES])
async def test_every_get_route_refuses_an_unknown_query_parameter(
    route: Any, project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    live = await start_daemon(_project(project_factory))
    status, body = await live.get(_concrete(route.path) + "?bogus_filter=1")
    assert status == 400, body
    assert "'bogus_filter'" in body["error"]["message"]


async def test_audit_release_filter_is_refused_not_ignored(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    live = await start_daemon(_project(project_factory))
    status, body = await live.get("/v1/audit?release=act_1&limit=5")
    assert status == 400
    assert "'release'" in body["error"]["message"]
    assert "'limit'" not in body["error"]["message"]
    # the parameters a route declares are taken, with or without a query string
    assert (await live.get("/v1/audit?limit=5&kind=decision"))[0] == 200
    assert (await live.get("/v1/audit"))[0] == 200


def test_declared_query_parameters_are_the_documented_ones() -> None:
    from gatekeeper.http.openapi import build_openapi

    doc = build_openapi()
    for route in ROUTES:
        operation = doc["paths"][route.openapi_path][route.method.lower()]
        documented = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"}
        assert documented == route.query_names
        assert "400" in operation["responses"]


# ---------------------------------------------------------------------------------------------
# Slow clients and too many connections: a real listener on 127.0.0.1, raw sockets


@dataclass
class Served:
    host: str
    port: int


@pytest.fixture
async def serve_guarded() -> AsyncIterator[Callable[..., Any]]:
    """Serve a project as ``gatekeeper serve`` does: the application behind a GuardedSite."""
    from gatekeeper.config import load_config
    from gatekeeper.http.app import create_app
    from gatekeeper.http.limits import CONNECTIONS_KEY, GuardedSite
    from gatekeeper.runtime.daemon import Daemon

    runners: list[web.AppRunner] = []

    async def serve(project: Project) -> Served:
        config = load_config(project.config_path)
        app = create_app(
            Daemon(config, ENV),
            header_read_timeout_s=config.header_read_timeout_s,
            body_read_timeout_s=config.body_read_timeout_s,
            max_connections=config.max_connections,
        )
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        runners.append(runner)
        site = GuardedSite(runner, "127.0.0.1", 0, runner.app[CONNECTIONS_KEY])
        await site.start()
        return Served("127.0.0.1", site.port)

    yield serve
    for runner in runners:
        await runner.cleanup()


async def _open(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(served.host, served.port)


async def _close(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _read_all(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``within_s``)."""
    data = b""
    async with asyncio.timeout(within_s):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def _get_healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head


async def test_slowloris_header_trickle_is_closed_within_the_header_timeout(
    project_factory: Callable[..., Project], serve_guarded: Any
) -> None:
    served = await serve_guarded(_project(project_factory, header_read_timeout_s=1))
    clients = [await _open(served) for _ in range(50)]
    started = time.monotonic()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        received = b""
        for i in range(40):  # a header line every 0.25 s: 10 s, never a blank line
            try:
                writer.write(f"X-Slow-{i}: a\r\n".encode())
                await writer.drain()
                received += await asyncio.wait_for(reader.read(65536), 0.25)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if received == b"" or reader.at_eof():
                break
        return received

    answers = await asyncio.gather(*(trickle(r, w) for r, w in clients))
    elapsed = time.monotonic() - started
    assert elapsed < 3, f"slow header senders were held {elapsed:.1f} s"
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]
    await _close(*(writer for _, writer in clients))


async def test_a_connection_that_sends_nothing_is_closed_within_the_header_timeout(
    project_factory: Callable[..., Project], serve_guarded: Any
) -> None:
    served = await serve_guarded(_project(project_factory, header_read_timeout_s=1))
    reader, writer = await _open(served)
    started = time.monotonic()
    answer = await _read_all(reader, within_s=5)
    assert answer.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 2.5
    await _close(writer)


async def test_a_trickled_body_is_answered_408_and_the_connection_closed(
    project_factory: Callable[..., Project], serve_guarded: Any
) -> None:
    served = await serve_guarded(_project(project_factory, body_read_timeout_s=1))
    reader, writer = await _open(served)
    body = b'{"kind": "task", "id": "T-1", "project": "tower-a", "data": {}}'
    writer.write(
        b"POST /v1/facts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    started = time.monotonic()
    answer = b""
    for byte in body:  # a byte every 0.1 s: 6 s for the whole body
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            answer += await asyncio.wait_for(reader.read(65536), 0.1)
        except TimeoutError:
            continue
        except ConnectionError:
            break
        if reader.at_eof():
            break
    answer += await _read_all(reader, within_s=3)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body" in answer
    assert time.monotonic() - started < 3
    await _close(writer)


async def test_a_body_sent_at_once_is_not_delayed_by_the_body_timeout(
    project_factory: Callable[..., Project], serve_guarded: Any
) -> None:
    served = await serve_guarded(_project(project_factory, body_read_timeout_s=1))
    async with aiohttp.ClientSession() as session:
        fact = {"kind": "task", "id": "T-1", "project": "tower-a", "data": {"status": "open"}}
        url = f"http://{served.host}:{served.port}/v1/facts"
        for _ in range(3):  # kept alive, one after another
            async with session.post(url, json=fact) as response:
                assert response.status == 200


async def test_over_the_cap_new_connections_are_refused_and_an_open_one_still_answers(
    project_factory: Callable[..., Project],
    serve_guarded: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gatekeeper.http.limits")
    served = await serve_guarded(_project(project_factory, max_connections=5))
    kept = await _open(served)
    assert (await _get_healthz(*kept)).startswith(b"HTTP/1.1 200")
    idle = [await _open(served) for _ in range(4)]  # the cap is full
    await asyncio.sleep(0.1)
    started = time.monotonic()
    refused = 0
    for _ in range(200):
        reader, writer = await _open(served)
        try:
            refused += await _read_all(reader, within_s=1) == b""
        except ConnectionError:
            refused += 1
        await _close(writer)
    elapsed = time.monotonic() - started
    assert refused == 200
    assert elapsed < 5, f"refusing 200 connections took {elapsed:.1f} s"
    assert (await _get_healthz(*kept)).startswith(b"HTTP/1.1 200")
    lines = [r for r in caplog.records if r.name == "gatekeeper.http.limits"]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    assert "refused" in lines[0].getMessage()
    await _close(*(writer for _, writer in [kept, *idle]))
    # a closed connection frees its place
    await asyncio.sleep(0.2)
    again = await _open(served)
    assert (await _get_healthz(*again)).startswith(b"HTTP/1.1 200")
    await _close(again[1])


# ---------------------------------------------------------------------------------------------
# Rate limits per token


async def test_a_runaway_token_is_answered_429_and_does_not_starve_another(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    from gatekeeper.http.auth import hash_token

    runaway, other = "gk_runaway-ci-job", "gk_other-ci-job"
    tokens = [
        {"subject": "runaway", "sha256": hash_token(runaway), "scopes": ["read"]},
        {
            "subject": "other",
            "sha256": hash_token(other),
            "scopes": ["read"],
            "rate_limit": {"requests_per_s": 1000, "burst": 1000},
        },
    ]
    project = _project(project_factory, tokens=tokens, rate_limit={"requests_per_s": 2, "burst": 3})
    live = await start_daemon(project)

    async def get(token: str) -> tuple[int, str | None, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"}
        async with live.session.get(live.url + "/v1/escrows", headers=headers) as response:
            return response.status, response.headers.get("Retry-After"), await response.json()

    statuses = [(await get(runaway))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]  # the burst
    status, retry_after, body = await get(runaway)
    assert status == 429
    assert retry_after == "1"
    assert "runaway" in body["error"]["message"]
    assert runaway not in body["error"]["message"]
    # the other token is not held back by the runaway one
    assert [(await get(other))[0] for _ in range(30)] == [200] * 30
    await asyncio.sleep(0.6)  # 2 requests/s: one more after half a second
    assert (await get(runaway))[0] == 200
    assert (await get(runaway))[0] == 429


def test_rate_limit_bucket_refills_at_the_configured_rate() -> None:
    from gatekeeper.config import RateLimit
    from gatekeeper.http.limits import RateLimiter

    limiter = RateLimiter()
    limit = RateLimit(requests_per_s=10, burst=2)
    assert limiter.retry_after("a", limit) == 0.0
    assert limiter.retry_after("a", limit) == 0.0
    wait = limiter.retry_after("a", limit)
    assert 0.05 < wait <= 0.1
    assert limiter.retry_after("b", limit) == 0.0  # buckets are per token


# ---------------------------------------------------------------------------------------------
# TLS: a real `gatekeeper serve` over HTTPS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key),
            "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def _serve(project: Project, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(project.config_path)]
    return subprocess.Popen(
        [*command, "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def test_serve_speaks_https_with_the_configured_certificate(
    project_factory: Callable[..., Project], tmp_path: Path
) -> None:
    from gatekeeper.http.auth import hash_token

    cert, key = _self_signed(tmp_path)
    token = "gk_tls-reader"
    reader = {"subject": "reader", "sha256": hash_token(token), "scopes": ["read"]}
    tls = {"cert_file": cert.name, "key_file": key.name}
    project = _project(project_factory, tokens=[reader], tls=tls)
    port = _free_port()
    process = _serve(project, port)
    trusted = ssl.create_default_context(cafile=str(cert))
    try:
        async with aiohttp.ClientSession() as session:
            health = None
            for _ in range(150):
                try:
                    async with session.get(
                        f"https://127.0.0.1:{port}/healthz", ssl=trusted
                    ) as response:
                        health = response.status
                        break
                except aiohttp.ClientConnectionError:
                    assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
                    await asyncio.sleep(0.1)
            assert health == 200
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(
                f"https://127.0.0.1:{port}/v1/escrows", ssl=trusted, headers=headers
            ) as response:
                assert response.status == 200
                assert "escrows" in await response.json()
            # plain HTTP gets no answer from a TLS listener
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    await response.read()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert f"listening on https://127.0.0.1:{port}" in stderr.decode()


def test_serve_with_an_unreadable_certificate_exits_1_with_one_line(
    project_factory: Callable[..., Project], tmp_path: Path
) -> None:
    tls = {"cert_file": "missing.crt", "key_file": "missing.key"}
    project = _project(project_factory, tls=tls)
    process = _serve(project, _free_port())
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "TLS certificate or key" in stderr.decode()
    assert "Traceback" not in stderr.decode()


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_a_real_serve_closes_silent_connections_and_refuses_over_the_cap(
    loop: str, project_factory: Callable[..., Project]
) -> None:
    """The limits hold in ``gatekeeper serve`` itself, on either event loop (auto: uvloop
    where installed), and its log stays short however many connections are refused."""
    project = _project(project_factory, header_read_timeout_s=1, max_connections=3)
    port = _free_port()
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(project.config_path)]
    process = subprocess.Popen(
        [*command, "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, **ENV, "GATEKEEPER_EVENT_LOOP": loop},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(150):
            try:
                kept = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        time.sleep(0.2)
        started = time.monotonic()
        for _ in range(100):  # over the cap: closed at once
            extra = socket.create_connection(("127.0.0.1", port), timeout=5)
            with contextlib.suppress(ConnectionResetError):
                assert extra.recv(65536) == b""
            extra.close()
        assert time.monotonic() - started < 5
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        for sock in silent:  # sent nothing: 408 and closed after the header timeout
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408")
            sock.close()
        kept.close()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    limit_lines = [line for line in stderr.decode().splitlines() if "http.limits" in line]
    assert 1 <= len(limit_lines) <= 3, limit_lines


def test_cli_clients_default_to_https_when_the_config_has_tls(
    project_factory: Callable[..., Project],
) -> None:
    from gatekeeper.cli.client import base_url
    from gatekeeper.config import load_config

    tls = {"cert_file": "server.crt", "key_file": "server.key"}
    config = load_config(_project(project_factory, tls=tls).config_path)
    assert base_url(config, None) == "https://127.0.0.1:0"
    assert config.tls is not None and config.tls.cert_file.is_absolute()
