import { join } from "node:path";
import { HostService } from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningAgent, repoRoot, run, startAgent } from "./support/agent.js";
import { grpcJsHostClient } from "./support/grpcjs.js";

const buf = join(repoRoot, "node_modules/.bin/buf");

describe("agent interop: independent clients reach HostService", () => {
  let agent: RunningAgent;
  beforeAll(async () => {
    agent = await startAgent();
  });
  afterAll(async () => {
    await agent?.stop();
  });

  it("grpc-js over TCP and over the Unix socket gets the same host as vmenv's own client", async () => {
    const ours = await createDaemonClient(HostService, { socket: agent.socket }).getHostInfo({});
    expect(ours.cpu?.threads).toBeGreaterThan(0);
    for (const target of [agent.address, `unix://${agent.socket}`]) {
      const { client, getHostInfo } = grpcJsHostClient(target);
      try {
        const theirs = (await getHostInfo()) as {
          hostname: string;
          agentVersion: string;
          cpu: { model: string; threads: number };
          memory: { totalBytes: string };
          numaNodes: { id: number; cpus: number[] }[];
          effectiveAccelerator: string;
        };
        expect(theirs.hostname).toBe(ours.hostname);
        expect(theirs.agentVersion).toBe(ours.agentVersion);
        expect(theirs.cpu.model).toBe(ours.cpu?.model);
        expect(theirs.cpu.threads).toBe(ours.cpu?.threads);
        expect(theirs.memory.totalBytes).toBe(String(ours.memory?.totalBytes));
        expect(theirs.numaNodes.map((n) => n.cpus)).toEqual(ours.numaNodes.map((n) => n.cpus));
        expect(theirs.effectiveAccelerator).toBe("ACCELERATOR_KIND_TCG");
      } finally {
        client.close();
      }
    }
  });

  it("buf curl lists every service through reflection and calls Health/Check and HostService", async () => {
    const base = ["curl", "--protocol", "grpc", "--http2-prior-knowledge"];
    const list = await run(buf, [...base, "--list-services", `http://${agent.address}`]);
    expect(list.stderr).toBe("");
    const services = list.stdout.trim().split("\n");
    for (const s of [
      "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection",
      "vmenv.agent.v1.HostService",
      "vmenv.agent.v1.VmService",
      "vmenv.agent.v1.BlockService",
      "vmenv.agent.v1.NetworkService",
      "vmenv.agent.v1.GpuService",
      "vmenv.agent.v1.DiagnosticsService",
    ]) {
      expect(services).toContain(s);
    }
    const health = await run(buf, [
      ...base,
      "--data",
      '{"service":"vmenv.agent.v1.HostService"}',
      `http://${agent.address}/grpc.health.v1.Health/Check`,
    ]);
    expect(JSON.parse(health.stdout)).toEqual({ status: "SERVING" });
    // Over the Unix socket too, with the HostService schema from reflection only.
    const info = await run(buf, [
      ...base,
      "--unix-socket",
      agent.socket,
      "http://localhost/vmenv.agent.v1.HostService/GetHostInfo",
    ]);
    expect(info.stderr).toBe("");
    const j = JSON.parse(info.stdout) as { cpu: { threads: number }; agentVersion: string };
    expect(j.cpu.threads).toBeGreaterThan(0);
    expect(j.agentVersion).toMatch(/^\d+\.\d+\.\d+/);
  });

  it("plain curl gets the host info with a Connect JSON POST over HTTP/1.1, on TCP and the socket", async () => {
    const args = ["-sS", "--http1.1", "-X", "POST", "-H", "content-type: application/json", "-d", "{}"];
    const tcp = await run("curl", [
      ...args,
      `http://${agent.address}/vmenv.agent.v1.HostService/GetHostInfo`,
    ]);
    const unix = await run("curl", [
      ...args,
      "--unix-socket",
      agent.socket,
      "http://localhost/vmenv.agent.v1.HostService/GetHostInfo",
    ]);
    for (const r of [tcp, unix]) {
      expect(r.code).toBe(0);
      const j = JSON.parse(r.stdout) as { hostname: string; memory: { totalBytes: string } };
      expect(j.hostname.length).toBeGreaterThan(0);
      expect(BigInt(j.memory.totalBytes)).toBeGreaterThan(0n);
    }
  });

  it("features that are not built yet answer UNIMPLEMENTED with a clear message, creating nothing", async () => {
    const call = (method: string, body: unknown) =>
      run("curl", [
        "-sS",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        JSON.stringify(body),
        `http://${agent.address}/vmenv.agent.v1.NetworkService/${method}`,
      ]);
    const r = await call("CreateNetwork", {
      networkId: "masqueraded",
      network: { cidr: "10.213.7.0/24", masquerade: true },
    });
    const j = JSON.parse(r.stdout) as { code: string; message: string };
    expect(j.code).toBe("unimplemented");
    expect(j.message).toMatch(/^network\.masquerade is not implemented yet: .+/);
    const g = JSON.parse((await call("GetNetwork", { name: "networks/masqueraded" })).stdout) as {
      code: string;
    };
    expect(g.code).toBe("not_found");
  });
});
