import { mkdtemp, rm, stat, writeFile } from "node:fs/promises";
import * as http from "node:http";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { Health, HealthCheckResponse_ServingStatus } from "@vmenv/api/grpc/health/v1";
import { ServerReflection } from "@vmenv/api/grpc/reflection/v1";
import { ServerReflection as ServerReflectionV1alpha } from "@vmenv/api/grpc/reflection/v1alpha";
import pino from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { createDaemonClient } from "./client.js";
import { EchoService, echoService } from "./echo.js";
import { invalidArgument, notFound } from "./errors.js";
import { bind, type RpcServer, serve, unimplementedService } from "./server.js";

/** A pino logger whose lines the test can read. */
function memoryLogger() {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _enc, cb) {
      for (const l of String(chunk).split("\n")) if (l) lines.push(JSON.parse(l));
      cb();
    },
  });
  return { logger: pino({ level: "info" }, stream), lines };
}

function httpPost(
  target: { socketPath: string } | { port: number },
  path: string,
  body: string,
  headers: Record<string, string>,
): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        ...target,
        host: "127.0.0.1",
        method: "POST",
        path,
        headers: { ...headers, "content-length": Buffer.byteLength(body) },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () =>
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            body: Buffer.concat(chunks).toString(),
          }),
        );
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

describe("serve", () => {
  let dir: string;
  let server: RpcServer | undefined;
  let log: ReturnType<typeof memoryLogger>;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "vmenv-rpc-"));
    log = memoryLogger();
  });
  afterEach(async () => {
    await server?.close(100);
    server = undefined;
    await rm(dir, { recursive: true, force: true });
  });

  const start = (services = [echoService()]) =>
    serve({
      services,
      logger: log.logger,
      unixSocket: { path: join(dir, "s.sock") },
      tcp: { host: "127.0.0.1", port: 0 },
    }).then((s) => {
      server = s;
      return s;
    });

  it("answers gRPC on the Unix socket and on TCP with the same handlers", async () => {
    const s = await start();
    expect((await stat(join(dir, "s.sock"))).mode & 0o777).toBe(0o660);
    for (const cfg of [{ socket: s.unixSocket }, { address: s.tcpAddress }]) {
      const c = createDaemonClient(EchoService, cfg);
      expect((await c.echo({ message: "hi" })).message).toBe("hi");
      const got = [];
      for await (const m of c.echoStream({ message: "s", count: 3 })) got.push(m.sequence);
      expect(got).toEqual([0, 1, 2]);
    }
  });

  it("answers Connect JSON and gRPC-Web over HTTP/1.1 on both listeners", async () => {
    const s = await start();
    const port = Number(s.tcpAddress?.split(":")[1]);
    for (const target of [{ socketPath: join(dir, "s.sock") }, { port }]) {
      const r = await httpPost(target, "/vmenv.testing.v1.EchoService/Echo", '{"message":"json"}', {
        "content-type": "application/json",
      });
      expect(r.status).toBe(200);
      expect(JSON.parse(r.body)).toEqual({ message: "json" });
      expect(r.headers["x-request-id"]).toMatch(/^[0-9a-f-]{36}$/);
    }
    // gRPC-Web: one length-prefixed message frame, then a trailer frame.
    const msg = Buffer.from([0x0a, 0x02, 0x77, 0x62]); // field 1 = "wb"
    const frame = Buffer.concat([Buffer.from([0, 0, 0, 0, msg.length]), msg]).toString("latin1");
    const r = await new Promise<Buffer>((resolve, reject) => {
      const req = http.request(
        {
          port,
          host: "127.0.0.1",
          method: "POST",
          path: "/vmenv.testing.v1.EchoService/Echo",
          headers: { "content-type": "application/grpc-web+proto" },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c) => chunks.push(c));
          res.on("end", () => resolve(Buffer.concat(chunks)));
        },
      );
      req.on("error", reject);
      req.end(Buffer.from(frame, "latin1"));
    });
    expect(r.subarray(5, 5 + msg.length)).toEqual(msg);
    expect(r.toString("latin1")).toMatch(/grpc-status: ?0/);
  });

  it("maps domain errors to their code with ErrorInfo and hides unknown ones as INTERNAL", async () => {
    const s = await start([
      bind(EchoService, {
        echo(req) {
          if (req.message === "missing") throw notFound("vm", "vms/web-1");
          if (req.message === "bad") throw invalidArgument("message", "must not be bad");
          throw new Error("secret database password in stack");
        },
      }),
    ]);
    const c = createDaemonClient(EchoService, { socket: s.unixSocket as string, retry: false });
    const err = (m: string) =>
      c.echo({ message: m }).then(
        () => expect.unreachable(),
        (e) => ConnectError.from(e),
      );
    const nf = await err("missing");
    expect(nf.code).toBe(Code.NotFound);
    expect(nf.rawMessage).toBe("vm vms/web-1 not found");
    const [info] = nf.findDetails(ErrorInfoSchema);
    expect(info).toMatchObject({
      reason: "VM_NOT_FOUND",
      domain: "vmenv.dev",
      metadata: { vm: "vms/web-1" },
    });
    expect((await err("bad")).code).toBe(Code.InvalidArgument);
    const internal = await err("boom");
    expect(internal.code).toBe(Code.Internal);
    expect(internal.rawMessage).not.toContain("secret");
    expect(internal.rawMessage).toMatch(/request id [0-9a-f-]{36}/);
    const logged = log.lines.find((l) => l.msg === "unexpected error in handler") as {
      err: { message: string };
    };
    expect(logged.err.message).toContain("secret database password");
  });

  it("logs one structured line per call with method, code and duration", async () => {
    const s = await start([unimplementedService(EchoService, "arrives later")]);
    const c = createDaemonClient(EchoService, { socket: s.unixSocket as string, retry: false });
    const e = await c.echo({ message: "x" }).catch((x) => ConnectError.from(x));
    expect(e).toBeInstanceOf(ConnectError);
    expect((e as ConnectError).code).toBe(Code.Unimplemented);
    expect((e as ConnectError).rawMessage).toBe(
      "vmenv.testing.v1.EchoService/Echo is not implemented yet: arrives later",
    );
    const rpcLines = log.lines.filter((l) => l.msg === "rpc");
    expect(rpcLines).toHaveLength(1);
    expect(rpcLines[0]).toMatchObject({ method: "vmenv.testing.v1.EchoService/Echo", code: "Unimplemented" });
    expect(typeof rpcLines[0]?.durationMs).toBe("number");
  });

  it("refuses a socket a live server holds, and replaces a stale one", async () => {
    const s = await start();
    await expect(
      serve({ services: [echoService()], logger: log.logger, unixSocket: { path: s.unixSocket as string } }),
    ).rejects.toMatchObject({ reason: "SOCKET_IN_USE" });
    // The first server still answers.
    expect(
      (await createDaemonClient(EchoService, { socket: s.unixSocket as string }).echo({ message: "a" }))
        .message,
    ).toBe("a");
    // A socket file nobody listens on (a crashed agent's) is replaced.
    const stale = join(dir, "stale.sock");
    const l = net.createServer().listen(stale);
    await new Promise((r) => l.once("listening", r));
    await new Promise<void>((r) => {
      // Close the listening fd without unlinking, as a killed process would leave it.
      (l as unknown as { _handle: { close(): void } })._handle.close();
      r();
    });
    const second = await serve({
      services: [echoService()],
      logger: log.logger,
      unixSocket: { path: stale },
    });
    expect((await createDaemonClient(EchoService, { socket: stale }).echo({ message: "b" })).message).toBe(
      "b",
    );
    await second.close(10);
    // A regular file in the way is never removed.
    const file = join(dir, "file.sock");
    await writeFile(file, "keep me");
    await expect(
      serve({ services: [], logger: log.logger, unixSocket: { path: file } }),
    ).rejects.toMatchObject({
      reason: "SOCKET_PATH_NOT_A_SOCKET",
    });
  });

  it("serves health Check and Watch per service", async () => {
    const s = await start();
    const h = createDaemonClient(Health, { socket: s.unixSocket as string });
    expect((await h.check({ service: "vmenv.testing.v1.EchoService" })).status).toBe(
      HealthCheckResponse_ServingStatus.SERVING,
    );
    expect((await h.check({ service: "" })).status).toBe(HealthCheckResponse_ServingStatus.SERVING);
    await expect(h.check({ service: "nope.Service" })).rejects.toMatchObject({ code: Code.NotFound });
    const seen: HealthCheckResponse_ServingStatus[] = [];
    const ac = new AbortController();
    const watching = (async () => {
      try {
        for await (const r of h.watch({ service: "vmenv.testing.v1.EchoService" }, { signal: ac.signal })) {
          seen.push(r.status);
          if (seen.length === 1)
            s.health.set("vmenv.testing.v1.EchoService", HealthCheckResponse_ServingStatus.NOT_SERVING);
          if (seen.length === 2) ac.abort();
        }
      } catch {
        // cancelled by the test
      }
    })();
    await watching;
    expect(seen).toEqual([
      HealthCheckResponse_ServingStatus.SERVING,
      HealthCheckResponse_ServingStatus.NOT_SERVING,
    ]);
  });

  it("lists services and files through reflection v1", async () => {
    const s = await start();
    const r = createDaemonClient(ServerReflection, { address: s.tcpAddress as string });
    async function* reqs() {
      yield { host: "", messageRequest: { case: "listServices" as const, value: "" } };
      yield {
        host: "",
        messageRequest: { case: "fileContainingSymbol" as const, value: "vmenv.testing.v1.EchoService.Echo" },
      };
      yield { host: "", messageRequest: { case: "fileContainingSymbol" as const, value: "no.Such" } };
    }
    const out = [];
    for await (const m of r.serverReflectionInfo(reqs())) out.push(m.messageResponse);
    expect(out[0]?.case).toBe("listServicesResponse");
    const names = out[0]?.case === "listServicesResponse" ? out[0].value.service.map((x) => x.name) : [];
    expect(names).toEqual([
      "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection",
      "grpc.reflection.v1alpha.ServerReflection",
      "vmenv.testing.v1.EchoService",
    ]);
    expect(out[1]?.case).toBe("fileDescriptorResponse");
    expect(out[2]).toMatchObject({ case: "errorResponse", value: { errorCode: Code.NotFound } });
  });

  it("answers reflection v1alpha (what older grpcurl speaks) with the files a symbol needs", async () => {
    const s = await start();
    const r = createDaemonClient(ServerReflectionV1alpha, { socket: s.unixSocket as string });
    async function* reqs() {
      yield {
        host: "",
        messageRequest: { case: "fileContainingSymbol" as const, value: "vmenv.testing.v1.EchoService" },
      };
      yield {
        host: "",
        messageRequest: { case: "fileByFilename" as const, value: "grpc/health/v1/health.proto" },
      };
    }
    const names: string[][] = [];
    for await (const m of r.serverReflectionInfo(reqs())) {
      if (m.messageResponse.case !== "fileDescriptorResponse")
        throw new Error(`unexpected ${m.messageResponse.case}`);
      names.push(
        m.messageResponse.value.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b).name),
      );
    }
    expect(names[0]).toEqual(["vmenv/testing/v1/echo.proto"]);
    expect(names[1]).toEqual(["grpc/health/v1/health.proto"]);
  });

  it("shuts down gracefully: unary calls finish, streams end with UNAVAILABLE, new calls are refused", async () => {
    const s = await start();
    const c = createDaemonClient(EchoService, { socket: s.unixSocket as string, retry: false });
    const slow = c.echo({ message: "slow", delayMs: 300 });
    const stream = (async () => {
      let n = 0;
      try {
        for await (const _ of c.echoStream({ message: "s", count: 0, intervalMs: 20 })) n++;
        return { n, code: undefined };
      } catch (e) {
        return { n, code: ConnectError.from(e).code };
      }
    })();
    await new Promise((r) => setTimeout(r, 100));
    expect(s.inFlight()).toBe(2);
    const closed = s.close(2000);
    expect((await slow).message).toBe("slow");
    const st = await stream;
    expect(st.code).toBe(Code.Unavailable);
    expect(st.n).toBeGreaterThan(0);
    await closed;
    server = undefined;
    await expect(stat(join(dir, "s.sock"))).rejects.toThrow();
    await expect(
      createDaemonClient(EchoService, { socket: join(dir, "s.sock"), retry: false }).echo({}),
    ).rejects.toMatchObject({
      code: Code.Unavailable,
    });
  });

  it("aborts unary calls that outlive the grace period", async () => {
    const s = await start();
    const c = createDaemonClient(EchoService, { socket: s.unixSocket as string, retry: false });
    const slow = c.echo({ message: "slow", delayMs: 10_000 }).catch((e) => ConnectError.from(e));
    await new Promise((r) => setTimeout(r, 100));
    const t0 = Date.now();
    await s.close(200);
    server = undefined;
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(((await slow) as ConnectError).code).toBe(Code.Unavailable);
  });
});
