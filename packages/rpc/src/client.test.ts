import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { CreateNodeRequestSchema, ResourceService } from "@vmenv/api/coordinator/v1";
import { EchoService } from "@vmenv/api/testing/v1";
import pino from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { type ClientConfig, createDaemonClient, createDaemonTransport, isRetrySafe } from "./client.js";
import { REQUEST_ID_HEADER } from "./request-id.js";
import { bind, type RpcServer, type ServiceBinding, serve } from "./server.js";

const silent = pino({ level: "silent" });

/** Resolves with the ConnectError a call rejected with; fails the test if it succeeded. */
function failure(p: Promise<unknown>): Promise<ConnectError> {
  return p.then(
    () => expect.unreachable("the call succeeded"),
    (e: unknown) => ConnectError.from(e),
  );
}

/** An Echo implementation that fails `failures` times with `code`, then echoes; counts its calls. */
function flakyEcho(failures: number, code = Code.Unavailable) {
  const seen = { calls: 0, requestIds: [] as (string | null)[] };
  const binding = bind(EchoService, {
    echo(req, ctx) {
      seen.calls++;
      seen.requestIds.push(ctx.requestHeader.get(REQUEST_ID_HEADER));
      if (seen.calls <= failures) throw new ConnectError(`failure ${seen.calls}`, code);
      return { message: req.message };
    },
  });
  return { binding, seen };
}

describe("client retry against a real server", () => {
  let dir: string;
  let server: RpcServer | undefined;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "vmenv-client-"));
  });
  afterEach(async () => {
    await server?.close(100);
    server = undefined;
    await rm(dir, { recursive: true, force: true });
  });

  async function start(binding: ServiceBinding): Promise<string> {
    const path = join(dir, "s.sock");
    server = await serve({ services: [binding], logger: silent, unixSocket: { path } });
    return path;
  }

  it("retries a NO_SIDE_EFFECTS method that failed with UNAVAILABLE and returns the 3rd answer", async () => {
    const { binding, seen } = flakyEcho(2);
    const c = createDaemonClient(EchoService, { socket: await start(binding) });
    expect((await c.echo({ message: "third time" })).message).toBe("third time");
    expect(seen.calls).toBe(3);
    // Every attempt is the same call: the server logs one request id for all three.
    expect(new Set(seen.requestIds).size).toBe(1);
    expect(seen.requestIds[0]).toMatch(/^[0-9a-f-]{36}$/);
  });

  it("with retry: false fails at once with the server's error", async () => {
    const { binding, seen } = flakyEcho(2);
    const c = createDaemonClient(EchoService, { socket: await start(binding), retry: false });
    const e = await failure(c.echo({ message: "x" }));
    expect(e.code).toBe(Code.Unavailable);
    expect(e.rawMessage).toBe("failure 1");
    expect(seen.calls).toBe(1);
  });

  it("gives up after maxAttempts and reports the last failure", async () => {
    const { binding, seen } = flakyEcho(5);
    const c = createDaemonClient(EchoService, {
      socket: await start(binding),
      retry: { maxAttempts: 2, initialBackoffMs: 1, maxBackoffMs: 1 },
    });
    const e = await failure(c.echo({ message: "x" }));
    expect(e.code).toBe(Code.Unavailable);
    expect(e.rawMessage).toBe("failure 2");
    expect(seen.calls).toBe(2);
  });

  it.each([
    ["FAILED_PRECONDITION", Code.FailedPrecondition],
    ["INTERNAL", Code.Internal],
    ["DEADLINE_EXCEEDED", Code.DeadlineExceeded],
    ["RESOURCE_EXHAUSTED", Code.ResourceExhausted],
  ])("never retries %s, even on a method without side effects", async (_name, code) => {
    const { binding, seen } = flakyEcho(1, code);
    const c = createDaemonClient(EchoService, { socket: await start(binding) });
    const e = await failure(c.echo({ message: "x" }));
    expect(e.code).toBe(code);
    expect(seen.calls).toBe(1);
  });

  describe("a method with side effects (CreateNode, idempotency unknown)", () => {
    function flakyCreateNode(failures: number) {
      const seen = { calls: 0 };
      const binding = bind(ResourceService, {
        createNode(req) {
          seen.calls++;
          if (seen.calls <= failures) throw new ConnectError("overloaded", Code.Unavailable);
          return { name: `nodes/${req.nodeId}` };
        },
      });
      return { binding, seen };
    }

    it("is not sent again after UNAVAILABLE when it carries no request_id", async () => {
      const { binding, seen } = flakyCreateNode(1);
      const c = createDaemonClient(ResourceService, { socket: await start(binding) });
      const e = await failure(c.createNode({ nodeId: "acme", node: {} }));
      expect(e.code).toBe(Code.Unavailable);
      expect(seen.calls).toBe(1);
    });

    it("is sent again after UNAVAILABLE when it carries a request_id the server replays from", async () => {
      const { binding, seen } = flakyCreateNode(2);
      const c = createDaemonClient(ResourceService, { socket: await start(binding) });
      const node = await c.createNode({ nodeId: "acme", node: {}, requestId: "5b0c1f9e-req" });
      expect(node.name).toBe("nodes/acme");
      expect(seen.calls).toBe(3);
    });

    it("is sent again when it never reached the daemon (a daemon restarting)", async () => {
      const path = join(dir, "late.sock");
      const seen = { calls: 0 };
      const c = createDaemonClient(ResourceService, {
        socket: path,
        retry: { maxAttempts: 100, initialBackoffMs: 10, maxBackoffMs: 40 },
      });
      // Nothing listens yet: the first attempts fail to connect, and a call that never arrived is
      // safe to send again whatever the method does.
      const call = c.createNode({ nodeId: "late", node: {} });
      await new Promise((r) => setTimeout(r, 150));
      server = await serve({
        services: [
          bind(ResourceService, {
            createNode(req) {
              seen.calls++;
              return { name: `nodes/${req.nodeId}` };
            },
          }),
        ],
        logger: silent,
        unixSocket: { path },
      });
      expect((await call).name).toBe("nodes/late");
      expect(seen.calls).toBe(1);
    });
  });
});

describe("isRetrySafe", () => {
  const unavailable = new ConnectError("x", Code.Unavailable);
  const createNode = ResourceService.method.createNode;
  const echo = EchoService.method.echo;

  it("reads the idempotency level from the proto", () => {
    // The cases below rely on these: Echo is NO_SIDE_EFFECTS, CreateNode has no level set.
    expect(echo.idempotency).toBe(1);
    expect(createNode.idempotency).toBe(0);
  });

  it("refuses UNAVAILABLE on a method with side effects and no request_id", () => {
    expect(isRetrySafe(unavailable, createNode, create(CreateNodeRequestSchema, { nodeId: "a" }))).toBe(
      false,
    );
  });

  it("allows UNAVAILABLE on a method with side effects when the request has a request_id", () => {
    const msg = create(CreateNodeRequestSchema, { nodeId: "a", requestId: "r-1" });
    expect(isRetrySafe(unavailable, createNode, msg)).toBe(true);
  });

  it("allows UNAVAILABLE on NO_SIDE_EFFECTS and IDEMPOTENT methods", () => {
    expect(isRetrySafe(unavailable, echo, {})).toBe(true);
    expect(isRetrySafe(unavailable, { idempotency: 2, input: createNode.input }, {})).toBe(true);
  });

  it("refuses every other code, whatever the method and request", () => {
    const msg = create(CreateNodeRequestSchema, { requestId: "r-1" });
    for (const code of [Code.Internal, Code.FailedPrecondition, Code.DeadlineExceeded, Code.Aborted]) {
      const e = new ConnectError("x", code);
      expect(isRetrySafe(e, echo, {})).toBe(false);
      expect(isRetrySafe(e, createNode, msg)).toBe(false);
    }
  });
});

describe("connection errors", () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "vmenv-client-"));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("a socket that does not exist is UNAVAILABLE naming the socket", async () => {
    const path = join(dir, "nope.sock");
    const c = createDaemonClient(EchoService, { socket: path, retry: false });
    const e = await failure(c.echo({ message: "x" }));
    expect(e.code).toBe(Code.Unavailable);
    expect(e.rawMessage).toBe(`cannot reach unix:${path}: no such socket`);
  });

  it("keeps the same clear message after the default retries", async () => {
    const path = join(dir, "nope.sock");
    const e = await failure(createDaemonClient(EchoService, { socket: path }).echo({ message: "x" }));
    expect(e.code).toBe(Code.Unavailable);
    expect(e.rawMessage.startsWith(`cannot reach unix:${path}`)).toBe(true);
    expect(e.rawMessage).toContain("no such socket");
  });

  it("a TCP port nobody listens on is UNAVAILABLE: connection refused", async () => {
    const e = await failure(
      createDaemonClient(EchoService, { address: "127.0.0.1:1", retry: false }).echo({ message: "x" }),
    );
    expect(e.code).toBe(Code.Unavailable);
    expect(e.rawMessage).toBe("cannot reach 127.0.0.1:1: connection refused");
  });
});

describe("createDaemonTransport", () => {
  it("wants exactly one of socket and address", () => {
    const both: ClientConfig = { socket: "/tmp/x.sock", address: "127.0.0.1:7070" };
    expect(() => createDaemonTransport(both)).toThrow(
      "give exactly one of a Unix socket path and a TCP address",
    );
    expect(() => createDaemonTransport({})).toThrow(
      "give exactly one of a Unix socket path and a TCP address",
    );
  });

  it.each(["localhost", "127.0.0.1", "http://127.0.0.1:7070", ":7070", "::1:7070", "host:port", "a b:1"])(
    "refuses the malformed address %j",
    (address) => {
      expect(() => createDaemonTransport({ address })).toThrow(
        `address "${address}" is not of the form host:port`,
      );
    },
  );

  it.each(["127.0.0.1:7070", "[::1]:7070", "agent.example.com:443"])("accepts %j", (address) => {
    expect(createDaemonTransport({ address })).toHaveProperty("unary");
  });
});
