import * as http2 from "node:http2";
import { join } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import { HostService } from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { agentMain, type RunningAgent, run, startAgent } from "./support/agent.js";
import { makePki, type TestPki } from "./support/certs.js";
import { grpcJsHostClient } from "./support/grpcjs.js";

const curlPost = (url: string, contentType: string, body: string, extra: string[] = []) =>
  run("curl", [
    "-sS",
    "-o",
    "-",
    "-w",
    "\n%{http_code}",
    "-X",
    "POST",
    "-H",
    `content-type: ${contentType}`,
    "--data-binary",
    body,
    ...extra,
    url,
  ]);

function split(r: { stdout: string }) {
  const i = r.stdout.lastIndexOf("\n");
  return { body: r.stdout.slice(0, i), status: Number(r.stdout.slice(i + 1)) };
}

/** A raw HTTP/2 gRPC call with `payload` as the (possibly broken) framed message. */
function rawGrpc(
  address: string,
  path: string,
  payload: Buffer,
): Promise<{ status: string | undefined; message: string | undefined }> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(`http://${address}`);
    session.on("error", reject);
    const req = session.request({
      ":method": "POST",
      ":path": path,
      "content-type": "application/grpc",
      te: "trailers",
    });
    let headers: http2.IncomingHttpHeaders = {};
    req.on("response", (h) => (headers = h));
    req.on("trailers", (t) => (headers = { ...headers, ...t }));
    req.on("data", () => {});
    req.on("end", () => {
      session.close();
      resolve({
        status: headers["grpc-status"] as string | undefined,
        message: headers["grpc-message"] as string | undefined,
      });
    });
    req.end(payload);
  });
}

describe("agent: bad input gets a clear error and the agent keeps serving", () => {
  let agent: RunningAgent;
  beforeAll(async () => {
    agent = await startAgent();
  });
  afterAll(async () => {
    await agent?.stop();
  });
  const stillServing = async () => {
    const info = await createDaemonClient(HostService, { socket: agent.socket }).getHostInfo({});
    expect(info.cpu?.threads).toBeGreaterThan(0);
    expect(agent.proc.exitCode).toBeNull();
  };

  it("malformed request bodies: JSON that does not parse, protobuf that does not decode", async () => {
    const url = `http://${agent.address}/vmenv.agent.v1.HostService/GetHostInfo`;
    const json = split(await curlPost(url, "application/json", "{not json"));
    expect(json.status).toBe(400);
    expect(JSON.parse(json.body)).toMatchObject({ code: "invalid_argument" });
    const wrongType = split(await curlPost(url, "application/json", '{"hostname": 42, "nope": {}}'));
    expect(wrongType.status).toBe(200); // unknown fields are ignored, as proto3 JSON allows
    // A gRPC frame that claims 100 bytes but carries 3, and one with bytes that are not protobuf.
    const short = await rawGrpc(
      agent.address,
      "/vmenv.agent.v1.HostService/GetHostInfo",
      Buffer.from([0, 0, 0, 0, 100, 1, 2, 3]),
    );
    expect(short.status).toBe(String(Code.InvalidArgument));
    // Bytes that do not decode as protobuf: INTERNAL, as gRPC's own servers (grpc-go, grpc-java) answer.
    const garbage = await rawGrpc(
      agent.address,
      "/vmenv.agent.v1.HostService/GetHostInfo",
      Buffer.from([0, 0, 0, 0, 2, 0xff, 0xff]),
    );
    expect(garbage.status).toBe(String(Code.Internal));
    expect(decodeURIComponent(garbage.message ?? "")).toMatch(/parse|decode|invalid/i);
    await stillServing();
  });

  it("an unknown method or service", async () => {
    const r = split(
      await curlPost(
        `http://${agent.address}/vmenv.agent.v1.HostService/NoSuchMethod`,
        "application/json",
        "{}",
      ),
    );
    expect(r.status).toBe(404);
    expect(JSON.parse(r.body)).toEqual({
      code: "unimplemented",
      message: expect.stringContaining("unknown method /vmenv.agent.v1.HostService/NoSuchMethod"),
    });
    const g = await rawGrpc(agent.address, "/vmenv.agent.v1.NoSuchService/Get", Buffer.from([0, 0, 0, 0, 0]));
    expect(g.status).toBe(String(Code.Unimplemented));
    expect(decodeURIComponent(g.message ?? "")).toContain("unknown method /vmenv.agent.v1.NoSuchService/Get");
    await stillServing();
  });

  it("a wrong content type", async () => {
    const r = split(
      await curlPost(`http://${agent.address}/vmenv.agent.v1.HostService/GetHostInfo`, "text/plain", "{}"),
    );
    expect(r.status).toBe(415);
    await stillServing();
  });

  it("a second agent on a socket already in use exits with a clear error; the first keeps serving", async () => {
    const r = await run(process.execPath, [
      agentMain,
      "--socket",
      agent.socket,
      "--listen",
      "off",
      "--state-dir",
      join(agent.dir, "second"),
    ]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(
      `vmenv-agent: cannot start: socket ${agent.socket} is in use by another running process (SOCKET_IN_USE)`,
    );
    await stillServing();
  });

  it("bad settings are refused with the setting named", async () => {
    const r = await run(process.execPath, [
      agentMain,
      "--listen",
      "nowhere",
      "--socket",
      join(agent.dir, "x.sock"),
    ]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--listen must be host:port (or "off"), got "nowhere"');
    const t = await run(process.execPath, [agentMain, "--accelerator", "warp"]);
    expect(t.code).not.toBe(0);
    expect(t.stderr).toContain("warp");
  });
});

describe("agent with mutual TLS", () => {
  let pki: TestPki;
  let agent: RunningAgent;
  beforeAll(async () => {
    pki = await makePki();
    agent = await startAgent([
      "--tls-cert",
      pki.serverCert,
      "--tls-key",
      pki.serverKey,
      "--tls-client-ca",
      pki.caCert,
      "--tls-require-client-cert",
    ]);
  });
  afterAll(async () => {
    await agent?.stop();
    await pki?.remove();
  });
  const call = async (tls: { cert?: string; key?: string }) =>
    createDaemonClient(HostService, {
      address: agent.address,
      retry: false,
      tls: {
        ca: await pki.read(pki.caCert),
        ...(tls.cert ? { cert: await pki.read(tls.cert) } : {}),
        ...(tls.key ? { key: await pki.read(tls.key) } : {}),
      },
    }).getHostInfo({});

  it("serves a client with a certificate from the trusted CA", async () => {
    expect((await call({ cert: pki.clientCert, key: pki.clientKey })).cpu?.threads).toBeGreaterThan(0);
  });

  it("refuses a client without a certificate, or with one from another CA, and keeps serving", async () => {
    for (const bad of [{}, { cert: pki.strangerCert, key: pki.strangerKey }]) {
      const err = await call(bad).then(
        () => expect.unreachable("the agent must refuse this client"),
        (e) => ConnectError.from(e),
      );
      expect(err.code).toBe(Code.Unauthenticated);
      expect(err.rawMessage).toMatch(
        bad.cert ? /^client certificate not accepted: / : /^client certificate required/,
      );
    }
    // plain curl without a client certificate: HTTP 401 with a Connect error saying why
    const r = await run("curl", [
      "-sS",
      "--cacert",
      pki.caCert,
      "-X",
      "POST",
      "-H",
      "content-type: application/json",
      "-d",
      "{}",
      `https://${agent.address}/vmenv.agent.v1.HostService/GetHostInfo`,
    ]);
    expect(JSON.parse(r.stdout)).toEqual({
      code: "unauthenticated",
      message: expect.stringContaining("client certificate required"),
    });
    // an independent gRPC client (grpc-js) without a certificate gets the same answer
    const { client, getHostInfo } = grpcJsHostClient(
      agent.address,
      grpc.credentials.createSsl(await pki.read(pki.caCert)),
    );
    try {
      await expect(getHostInfo()).rejects.toMatchObject({ code: grpc.status.UNAUTHENTICATED });
    } finally {
      client.close();
    }
    expect((await call({ cert: pki.clientCert, key: pki.clientKey })).cpu?.threads).toBeGreaterThan(0);
    expect(agent.proc.exitCode).toBeNull();
  });
});
