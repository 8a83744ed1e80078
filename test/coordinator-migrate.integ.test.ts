/**
 * Live migration and drain through the coordinator: a real coordinator, three real agents (separate
 * state, TCP on loopback), QEMU under TCG, 128 MiB guests.
 */
import { readFile } from "node:fs/promises";
import { VmState } from "@vmenv/api/agent/v1";
import { AgentState, MemberState, OperationState, StepState } from "@vmenv/api/coordinator/v1";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cliMain, killProcessesUnder, type RunningAgent, run } from "./support/agent.js";
import {
  agentClients,
  type CoordinatorClients,
  envOf,
  type Fleet,
  failure,
  finalOp,
  guestMember,
  startFleet,
  succeeded,
  vmsOn,
} from "./support/env.js";
import { clients, consoleRun, isReady, MIB, qemusUnder, until } from "./support/vm.js";

describe("migration and drain: real coordinator, three real agents, QEMU under TCG", () => {
  let fleet: Fleet;
  let c: CoordinatorClients;

  const agentOf = (id: string) => fleet.agentOf(id);
  const usageOf = async (node: string) => {
    const u = (await c.tree.getNode({ name: `nodes/${node}` })).usage;
    return { vms: u?.vms ?? 0, vcpus: u?.vcpus ?? 0, memoryBytes: u?.memoryBytes ?? 0n };
  };
  const placedVms = async (id: string) =>
    (await c.agents.getAgent({ name: `agents/${id}` })).allocated?.vms ?? 0;
  /** Seconds the guest has been up, read from /proc/uptime on its serial console. */
  const uptime = async (a: RunningAgent, vm: string) => {
    await until(() => agentClients(a).vms.getVm({ name: vm }), isReady, 90_000, `${vm} ready`);
    const m = await consoleRun(clients(a.socket), vm, "cat /proc/uptime", /\n(\d+\.\d+) \d+\.\d+/, 30_000);
    return Number(m[1]);
  };
  const member = async (id: string, agent: string, volumeMib = 0) => ({
    ...(await guestMember(id, "", volumeMib ? { volumeMib } : {})),
    placement: { agent: `agents/${agent}` },
  });

  beforeAll(async () => {
    fleet = await startFleet({
      agents: 3,
      // The rebalancer runs when a test asks (RebalanceFleet), never between a test's steps.
      coordinatorArgs: ["--rebalance-interval-ms", "0"],
      node: { id: "acme", policy: { maxVms: 8, maxMemoryBytes: 2048n * MIB } },
    });
    c = fleet.c;
  }, 120_000);
  afterAll(() => fleet?.stop());

  /** Starts a migration of `env`'s member on a1 with a slow stream and waits until its perform step runs. */
  const slowMigration = async (env: string, to: string, bytesPerSecond: bigint) => {
    const op = await c.envs.migrateEnvironment({
      name: `environments/${env}`,
      agent: `agents/${to}`,
      // A slow stream keeps the migration running for seconds: time to kill something during it.
      settings: { maxBandwidthBytesPerSecond: bytesPerSecond },
    });
    await until(
      () => c.ops.getOperation({ name: op.name }),
      (o) =>
        o.steps.some((s) => s.id === "perform.app" && s.state === StepState.RUNNING) ||
        [OperationState.SUCCEEDED, OperationState.FAILED, OperationState.CANCELLED].includes(o.state),
      120_000,
      "the perform step to start",
    );
    return op;
  };
  const oneMemberEnv = async (env: string) =>
    succeeded(
      c,
      c.envs.createEnvironment({
        environmentId: env,
        environment: { node: "nodes/acme", members: [await member("app", "a1")] },
        start: true,
      }),
    );

  it("live-migrates a running two-VM environment: guests keep their uptime, usage and placement follow, the source is left empty", async () => {
    const created = await succeeded(
      c,
      c.envs.createEnvironment({
        environmentId: "mig",
        environment: {
          node: "nodes/acme",
          members: [await member("web-1", "a1"), await member("db-1", "a1", 16)],
        },
        start: true,
      }),
    );
    expect(envOf(created).members.map((m) => m.agent)).toEqual(["agents/a1", "agents/a1"]);
    const a1 = agentOf("a1");
    const a2 = agentOf("a2");
    const before = {
      web: await uptime(a1, "vms/mig-web-1"),
      db: await uptime(a1, "vms/mig-db-1"),
    };
    const usageBefore = await usageOf("acme");

    const t0 = Date.now();
    const op = await succeeded(
      c,
      c.envs.migrateEnvironment({ name: "environments/mig", agent: "agents/a2" }),
    );
    const seconds = (Date.now() - t0) / 1000;
    const env = envOf(op);
    expect(env.members.map((m) => [m.id, m.agent, m.state])).toEqual([
      ["web-1", "agents/a2", MemberState.RUNNING],
      ["db-1", "agents/a2", MemberState.RUNNING],
    ]);
    expect(op.steps.filter((s) => s.id.startsWith("perform.")).map((s) => s.agent)).toEqual([
      "agents/a1",
      "agents/a1",
    ]);
    // Nothing left on the source (VMs, volumes, QEMU processes); both run on the destination.
    expect(await vmsOn(a1)).toEqual([]);
    expect((await agentClients(a1).blocks.listVolumes({ pageSize: 100 })).volumes).toEqual([]);
    expect(await qemusUnder(a1.dir)).toEqual([]);
    const there = await vmsOn(a2);
    expect(there.map((v) => [v.name, v.state]).sort()).toEqual([
      ["vms/mig-db-1", VmState.RUNNING],
      ["vms/mig-web-1", VmState.RUNNING],
    ]);
    // The guests did not reboot: their uptime went on.
    const after = { web: await uptime(a2, "vms/mig-web-1"), db: await uptime(a2, "vms/mig-db-1") };
    expect(after.web).toBeGreaterThan(before.web);
    expect(after.db).toBeGreaterThan(before.db);
    // Same VMs in the tree; the fleet counts them on a2 only.
    expect(await usageOf("acme")).toEqual(usageBefore);
    expect([await placedVms("a1"), await placedVms("a2")]).toEqual([0, 2]);
    process.stderr.write(
      `migration of 2 running TCG guests (one with a 16 MiB volume) through the coordinator: ${seconds.toFixed(1)} s\n`,
    );
  }, 180_000);

  it("drains an agent: it ends empty and CORDONED, every VM running elsewhere", async () => {
    const op = await c.agents.drainAgent({ name: "agents/a2", reason: "maintenance" });
    expect(op.kind).toBe("agent.drain");
    // While it runs the agent is DRAINING, names the drain, and cannot be uncordoned.
    const draining = await until(
      () => c.agents.getAgent({ name: "agents/a2" }),
      (a) => a.state === AgentState.DRAINING,
      30_000,
      "a2 DRAINING",
    );
    expect(draining.operation).toBe(op.name);
    const refused = await failure(c.agents.uncordonAgent({ name: "agents/a2" }));
    expect(refused.info?.reason).toBe("AGENT_DRAINING");
    const done = await finalOp(c, op);
    expect(done.state, done.error?.message).toBe(OperationState.SUCCEEDED);
    expect(done.children).toHaveLength(1);
    const a2 = await c.agents.getAgent({ name: "agents/a2" });
    expect(a2.state).toBe(AgentState.CORDONED);
    expect(a2.operation).toBe("");
    expect(a2.allocated?.vms ?? 0).toBe(0);
    expect(await vmsOn(agentOf("a2"))).toEqual([]);
    const env = await c.envs.getEnvironment({ name: "environments/mig" });
    for (const m of env.members) {
      expect(m.agent).not.toBe("agents/a2");
      expect(m.state).toBe(MemberState.RUNNING);
      const vm = await agentClients(agentOf(m.agent)).vms.getVm({ name: m.vm });
      expect(vm.state).toBe(VmState.RUNNING);
    }
    await c.agents.uncordonAgent({ name: "agents/a2" });

    // The CLI: one member back onto a2.
    const moved = env.members.find((m) => m.id === "web-1");
    const cli = await run(
      process.execPath,
      [
        cliMain,
        "--coordinator",
        fleet.coord.socket,
        "env",
        "migrate",
        "mig",
        "--member",
        "web-1",
        "--to",
        "a2",
      ],
      { timeoutMs: 120_000 },
    );
    expect(cli.code, cli.stderr).toBe(0);
    expect(cli.stdout).toContain("environment.migrate environments/mig: succeeded");
    const after = await c.envs.getEnvironment({ name: "environments/mig" });
    expect(after.members.map((m) => [m.id, m.agent])).toEqual([
      ["web-1", "agents/a2"],
      ["db-1", env.members.find((m) => m.id === "db-1")?.agent],
    ]);
    expect(moved?.agent).not.toBe("agents/a2");
  }, 180_000);

  it("a coordinator killed during perform resumes the migration after its restart: one copy, on the destination", async () => {
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/mig", force: true }));
    await oneMemberEnv("crash");
    const a1 = agentOf("a1");
    const a2 = agentOf("a2");
    const before = await uptime(a1, "vms/crash-app");
    const op = await slowMigration("crash", "a2", 8n * MIB);
    await fleet.coord.kill();
    await fleet.startCoordinator();
    const done = await finalOp(c, op);
    expect(done.state, done.error?.message).toBe(OperationState.SUCCEEDED);
    expect(done.resumeCount).toBe(1);
    const env = await c.envs.getEnvironment({ name: "environments/crash" });
    expect(env.members.map((m) => [m.agent, m.state])).toEqual([["agents/a2", MemberState.RUNNING]]);
    expect(await vmsOn(a1)).toEqual([]);
    expect(await qemusUnder(a1.dir)).toEqual([]);
    expect((await vmsOn(a2)).map((v) => [v.name, v.state])).toEqual([["vms/crash-app", VmState.RUNNING]]);
    expect(await uptime(a2, "vms/crash-app")).toBeGreaterThan(before);
    expect([await placedVms("a1"), await placedVms("a2")]).toEqual([0, 1]);
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/crash", force: true }));
  }, 180_000);

  it("a destination killed during the migration leaves the source running and the operation FAILED saying why", async () => {
    await oneMemberEnv("kill");
    const a1 = agentOf("a1");
    const a3 = agentOf("a3");
    const before = await uptime(a1, "vms/kill-app");
    const op = await slowMigration("kill", "a3", 128n * 1024n);
    // The destination host dies: its agent and its incoming VMM.
    await a3.kill();
    await killProcessesUnder(a3.dir);
    const done = await finalOp(c, op);
    expect(done.state).toBe(OperationState.FAILED);
    // The source's migration broke (at 128 KiB/s it cannot have completed before the kill).
    expect(done.error?.message).toMatch(/vm\.migrate vms\/kill-app failed/);
    // Exactly one copy runs: the source, which kept running (no reboot).
    const env = await c.envs.getEnvironment({ name: "environments/kill" });
    expect(env.members.map((m) => [m.agent, m.state])).toEqual([["agents/a1", MemberState.RUNNING]]);
    const vm = await agentClients(a1).vms.getVm({ name: "vms/kill-app" });
    expect(vm.state).toBe(VmState.RUNNING);
    expect(await uptime(a1, "vms/kill-app")).toBeGreaterThan(before);
    process.stderr.write(`destination killed during perform: ${done.error?.message}\n`);
    expect([await placedVms("a1"), await placedVms("a3")]).toEqual([1, 0]);
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/kill", force: true }));
  }, 180_000);

  it("a destination that died before prepare: the claim is released, the source runs on, FAILED saying why", async () => {
    const a4 = await fleet.addAgent("a4");
    await oneMemberEnv("dead");
    await a4.kill();
    await killProcessesUnder(a4.dir);
    const done = await finalOp(
      c,
      await c.envs.migrateEnvironment({ name: "environments/dead", agent: "agents/a4" }),
    );
    expect(done.state).toBe(OperationState.FAILED);
    // Refused at prepare (unreachable) or, once the heartbeat deadline passed, at placement (DOWN).
    expect(done.error?.message).toMatch(/a4/);
    process.stderr.write(`destination dead before prepare: ${done.error?.message}\n`);
    const env = await c.envs.getEnvironment({ name: "environments/dead" });
    expect(env.members.map((m) => [m.agent, m.state])).toEqual([["agents/a1", MemberState.RUNNING]]);
    expect((await agentClients(agentOf("a1")).vms.getVm({ name: "vms/dead-app" })).state).toBe(
      VmState.RUNNING,
    );
    expect(await placedVms("a4")).toBe(0);

    // Refused before anything starts: a DOWN agent cannot be drained; names are checked.
    await until(
      () => c.agents.getAgent({ name: "agents/a4" }),
      (a) => a.state === AgentState.DOWN,
      30_000,
      "a4 DOWN",
    );
    expect((await failure(c.agents.drainAgent({ name: "agents/a4" }))).info?.reason).toBe("AGENT_DOWN");
    // A stopped member moves cold (its VMM started paused to send it, stopped again at the other end)
    // and starts there.
    await succeeded(c, c.envs.stopEnvironment({ name: "environments/dead", force: true }));
    const cold = await succeeded(
      c,
      c.envs.migrateEnvironment({ name: "environments/dead", agent: "agents/a2" }),
    );
    expect(cold.steps.some((s) => s.id === "wake.app")).toBe(true);
    expect(envOf(cold).members.map((m) => [m.agent, m.state])).toEqual([["agents/a2", MemberState.STOPPED]]);
    expect((await agentClients(agentOf("a2")).vms.getVm({ name: "vms/dead-app" })).state).toBe(
      VmState.STOPPED,
    );
    expect((await vmsOn(agentOf("a1"))).map((v) => v.name)).not.toContain("vms/dead-app");
    const started = await succeeded(c, c.envs.startEnvironment({ name: "environments/dead" }));
    expect(envOf(started).members.map((m) => [m.agent, m.state])).toEqual([
      ["agents/a2", MemberState.RUNNING],
    ]);
    expect(
      (await failure(c.envs.migrateEnvironment({ name: "environments/dead", agent: "a2" }))).info?.reason,
    ).toBe("INVALID_ARGUMENT");
    expect(
      (await failure(c.envs.migrateEnvironment({ name: "environments/dead", agent: "agents/nope" }))).info
        ?.reason,
    ).toBe("AGENT_NOT_FOUND");
    expect(
      (await failure(c.envs.migrateEnvironment({ name: "environments/dead", memberIds: ["ghost"] }))).info
        ?.reason,
    ).toBe("MEMBER_NOT_FOUND");
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/dead", force: true }));
  }, 120_000);

  it("rebalances: of two VMs that overload a small agent, one moves live to the least loaded agent", async () => {
    // An agent offering 290 MiB: bin-packing puts both 128 MiB members there (88%, above 85%).
    const meminfo = await readFile("/proc/meminfo", "utf8");
    const totalMib = Math.floor(Number(/MemTotal:\s+(\d+) kB/.exec(meminfo)?.[1]) / 1024);
    const small = await fleet.addAgent("small", ["--reserved-memory-mib", String(totalMib - 290)]);
    const created = await succeeded(
      c,
      c.envs.createEnvironment({
        environmentId: "hot",
        environment: {
          node: "nodes/acme",
          members: [await guestMember("w-1", ""), await guestMember("w-2", "")],
        },
        start: true,
      }),
    );
    expect(envOf(created).members.map((m) => m.agent)).toEqual(["agents/small", "agents/small"]);

    const plan = await c.agents.rebalanceFleet({ dryRun: true });
    expect(plan.moves.map((m) => [m.sourceAgent, m.memberId, m.operation])).toEqual([
      ["agents/small", "w-1", ""],
    ]);
    const move = plan.moves[0];
    expect(move?.sourceLoadBefore).toBeGreaterThan(0.85);
    expect(move?.sourceLoadAfter).toBeLessThan(0.5);
    expect(move?.destinationLoadAfter).toBeLessThan(0.1);

    const t0 = Date.now();
    const started = await c.agents.rebalanceFleet({});
    const op = await finalOp(c, await c.ops.getOperation({ name: started.moves[0]?.operation ?? "" }));
    expect(op.state, op.error?.message).toBe(OperationState.SUCCEEDED);
    expect(op.kind).toBe("environment.migrate");
    const to = started.moves[0]?.destinationAgent ?? "";
    expect(to).toBe(move?.destinationAgent);
    const env = await c.envs.getEnvironment({ name: "environments/hot" });
    expect(env.members.map((m) => [m.id, m.agent, m.state])).toEqual([
      ["w-1", to, MemberState.RUNNING],
      ["w-2", "agents/small", MemberState.RUNNING],
    ]);
    expect((await vmsOn(agentOf(to))).map((v) => [v.name, v.state])).toContainEqual([
      "vms/hot-w-1",
      VmState.RUNNING,
    ]);
    expect((await vmsOn(small)).map((v) => v.name)).toEqual(["vms/hot-w-2"]);
    process.stderr.write(`rebalance of one 128 MiB TCG guest: ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);

    // Under the watermark now: the next pass (here through the CLI) moves nothing, and says why.
    const socket = fleet.coord.socket;
    const cli = await run(process.execPath, [cliMain, "--coordinator", socket, "agent", "rebalance"]);
    expect(cli.code, cli.stderr).toBe(0);
    expect(cli.stdout).toMatch(/^nothing to move \(watermark 85%\): no READY agent is above the watermark/);
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/hot", force: true }));
  }, 120_000);
});
