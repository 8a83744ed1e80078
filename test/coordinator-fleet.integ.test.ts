import { rm } from "node:fs/promises";
import { createServer } from "node:net";
import { Code, ConnectError } from "@connectrpc/connect";
import { type Agent, AgentService, AgentState } from "@vmenv/api/coordinator/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cliMain, type RunningAgent, run, startAgent } from "./support/agent.js";
import { type RunningCoordinator, startCoordinator } from "./support/coordinator.js";
import { until } from "./support/vm.js";

const HEARTBEAT = ["--heartbeat-interval-ms", "200", "--heartbeat-timeout-ms", "1500"];

/** The runner's own VMENV_* variables, unset, so that only what a test passes reaches the CLI. */
const noVmenvEnv: NodeJS.ProcessEnv = Object.fromEntries(
  Object.keys(process.env)
    .filter((k) => k.startsWith("VMENV_"))
    .map((k) => [k, undefined]),
);

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as { port: number }).port;
  await new Promise((r) => s.close(r));
  return port;
}

async function failure(p: Promise<unknown>): Promise<ConnectError> {
  try {
    await p;
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("expected the call to fail");
}

describe("coordinator fleet: real coordinator, two real agents", () => {
  let coord: RunningCoordinator | undefined;
  const agents: RunningAgent[] = [];
  let a1: RunningAgent;
  let a2: RunningAgent;
  const client = () => createDaemonClient(AgentService, { socket: (coord as RunningCoordinator).socket });
  const vmenv = (...args: string[]) =>
    run(process.execPath, [cliMain, "--coordinator", (coord as RunningCoordinator).socket, ...args], {
      env: noVmenvEnv,
      timeoutMs: 30_000,
    });
  const get = (id: string) => client().getAgent({ name: `agents/${id}` });

  beforeAll(async () => {
    coord = await startCoordinator(HEARTBEAT, {}, { keepDir: true });
    a1 = await startAgent();
    agents.push(a1);
    a2 = await startAgent();
    agents.push(a2);
  });
  afterAll(async () => {
    for (const a of agents) await a.stop();
    if (coord) {
      await coord.stop();
      await rm(coord.dir, { recursive: true, force: true });
    }
  });

  it("registers agents by API and CLI; list shows them READY with host and capacity", async () => {
    const r1 = await client().registerAgent({
      agentId: "a1",
      agent: { address: a1.address, labels: { zone: "a" } },
    });
    expect(r1.state).toBe(AgentState.READY);
    expect(r1.host?.hostname).not.toBe("");
    expect(r1.host?.capacity?.vcpusAllocatable).toBeGreaterThan(0);

    const cli = await vmenv("agent", "register", "a2", a2.address, "--label", "zone=b");
    expect(cli.stderr).toBe("");
    expect(cli.code).toBe(0);
    expect(cli.stdout).toMatch(/^State:\s+ready$/m);

    // Same id, same address: no change. Same id elsewhere: ALREADY_EXISTS.
    const again = await client().registerAgent({ agentId: "a1", agent: { address: a1.address } });
    expect(again.etag).toBe(r1.etag);
    const moved = await failure(client().registerAgent({ agentId: "a1", agent: { address: a2.address } }));
    expect(moved.code).toBe(Code.AlreadyExists);

    const list = await client().listAgents({});
    expect(list.agents.map((a) => [a.name, AgentState[a.state], a.labels.zone])).toEqual([
      ["agents/a1", "READY", "a"],
      ["agents/a2", "READY", "b"],
    ]);
    for (const a of list.agents) {
      expect(a.host?.cpu?.threads).toBeGreaterThan(0);
      expect(a.host?.capacity?.memoryAllocatableBytes).toBeGreaterThan(0n);
      expect(a.allocated?.vcpus).toBe(0);
    }

    const table = await vmenv("agent", "list");
    expect(table.code).toBe(0);
    expect(table.stdout).toMatch(/^ID\s+ADDRESS\s+STATE\s+VCPUS\s+MEMORY\s+HEARTBEAT$/m);
    const cap = list.agents[0]?.host?.capacity?.vcpusAllocatable;
    expect(table.stdout).toMatch(new RegExp(`^a1\\s+${a1.address}\\s+ready\\s+0/${cap}\\s+0 B/\\S+`, "m"));
    expect(table.stdout).toMatch(new RegExp(`^a2\\s+${a2.address}\\s+ready\\s`, "m"));
  });

  it("refuses an unreachable address with UNAVAILABLE naming it, and keeps no agent", async () => {
    const address = `127.0.0.1:${await freePort()}`;
    const err = await failure(client().registerAgent({ agentId: "typo", agent: { address } }));
    expect(err.code).toBe(Code.Unavailable);
    expect(err.rawMessage).toContain(address);
    expect(err.findDetails(ErrorInfoSchema)[0]).toMatchObject({
      reason: "AGENT_UNREACHABLE",
      metadata: { agent: "agents/typo", address },
    });
    expect((await failure(get("typo"))).code).toBe(Code.NotFound);
    expect((await client().listAgents({})).agents).toHaveLength(2);
  });

  it("cordons and uncordons (CLI), labels (CLI), and filters the list by state", async () => {
    const c = await vmenv("agent", "cordon", "a1", "--reason", "disk swap");
    expect(c.code).toBe(0);
    const cordoned = await get("a1");
    expect([cordoned.state, cordoned.stateMessage]).toEqual([AgentState.CORDONED, "cordoned: disk swap"]);
    const only = await client().listAgents({ states: [AgentState.CORDONED] });
    expect(only.agents.map((a) => a.name)).toEqual(["agents/a1"]);
    expect((await vmenv("agent", "uncordon", "a1")).code).toBe(0);
    expect((await get("a1")).state).toBe(AgentState.READY);

    const l = await vmenv("agent", "label", "a2", "rack=r7", "zone-");
    expect(l.stderr).toBe("");
    expect((await get("a2")).labels).toEqual({ rack: "r7" });
  });

  it("marks a SIGKILLed agent DOWN within the timeout, and READY again when it comes back", async () => {
    const port = a2.address.split(":").pop() as string;
    const killedAt = Date.now();
    await a2.kill();
    const down = await until(
      () => get("a2"),
      (a: Agent) => a.state === AgentState.DOWN,
      10_000,
      "a2 DOWN",
    );
    const detectMs = Date.now() - killedAt;
    console.log(`fleet: SIGKILLed agent marked DOWN after ${detectMs} ms (timeout 1500 ms, interval 200 ms)`);
    expect(detectMs).toBeGreaterThanOrEqual(1500 - 200 - 100);
    expect(detectMs).toBeLessThan(1500 + 2 * 200 + 1000);
    expect(down.stateMessage).toMatch(/^no heartbeat since \S+: .*connection refused/);
    expect((await get("a1")).state).toBe(AgentState.READY);

    // A new agent process on the same state and port.
    const back = await startAgent(["--listen", `127.0.0.1:${port}`], {}, { dir: a2.dir });
    agents.splice(agents.indexOf(a2), 1, back);
    a2 = back;
    const up = await until(
      () => get("a2"),
      (a: Agent) => a.state === AgentState.READY,
      10_000,
      "a2 READY",
    );
    expect(up.stateMessage).toBe("");
  });

  it("keeps the fleet across a coordinator SIGKILL and restart", async () => {
    const before = (await client().listAgents({})).agents;
    const old = coord as RunningCoordinator;
    await old.kill();
    coord = await startCoordinator(HEARTBEAT, {}, { dir: old.dir, keepDir: true });
    const after = await until(
      () => client().listAgents({}),
      (r) => r.agents.length === 2 && r.agents.every((a) => a.state === AgentState.READY),
      10_000,
      "both agents READY after the restart",
    );
    expect(after.agents.map((a) => [a.name, a.address, a.labels, a.createTime?.seconds])).toEqual(
      before.map((a) => [a.name, a.address, a.labels, a.createTime?.seconds]),
    );
    // Heartbeats run again: the last one is recent.
    await new Promise((r) => setTimeout(r, 500));
    const a1After = await get("a1");
    expect(Date.now() - Number(a1After.lastHeartbeatTime?.seconds ?? 0n) * 1000).toBeLessThan(2000);
  });

  it("removes an agent (CLI); it is gone for good, and its id is free again", async () => {
    const r = await vmenv("agent", "remove", "a2");
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe("removed agents/a2\n");
    expect((await failure(get("a2"))).code).toBe(Code.NotFound);
    const missing = await vmenv("agent", "remove", "a2");
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("agents/a2 not found");
    const again = await client().registerAgent({ agentId: "a2", agent: { address: a2.address } });
    expect(again.state).toBe(AgentState.READY);
  });

  it("refuses DrainAgent of an unknown agent or a bad name (drains: coordinator-migrate.integ.test.ts)", async () => {
    expect((await failure(client().drainAgent({ name: "agents/nope" }))).code).toBe(Code.NotFound);
    expect((await failure(client().drainAgent({ name: "a1" }))).code).toBe(Code.InvalidArgument);
  });
});
