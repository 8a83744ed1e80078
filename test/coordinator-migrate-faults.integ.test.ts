/**
 * Fault injection during live migration through the coordinator: a real coordinator, three real agents
 * (separate state, TCP on loopback), QEMU under TCG, 128 MiB guests with no NICs (agents on one host
 * would derive the same bridge and tap names). After every fault exactly one copy of the guest runs —
 * the source, or the destination once finish succeeded — the operation's state says which, and nothing
 * is left on the other agent.
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { VmState } from "@vmenv/api/agent/v1";
import {
  AgentState,
  type MemberSchema,
  MemberState,
  type Operation,
  OperationState,
  StepState,
} from "@vmenv/api/coordinator/v1";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { killProcessesUnder } from "./support/agent.js";
import {
  agentClients,
  type CoordinatorClients,
  type Fleet,
  finalOp,
  guestMember,
  startFleet,
  succeeded,
  vmsOn,
} from "./support/env.js";
import { MIB, qemusUnder, until } from "./support/vm.js";

const FINAL = [OperationState.SUCCEEDED, OperationState.FAILED, OperationState.CANCELLED];

describe("live migration under faults: real coordinator, three real agents, QEMU under TCG", () => {
  let fleet: Fleet;
  let c: CoordinatorClients;
  /** The crash points of a one-member migration, in order, as the clean run logged them. */
  let points: { step: string; phase: string }[] = [];

  const start = (env: NodeJS.ProcessEnv = {}, args: string[] = []) => fleet.startCoordinator({ env, args });
  const stop = () => fleet.stopCoordinator();
  const agentOf = (id: string) => fleet.agentOf(id);
  /** Restarts an agent (killed before) on the same state and port, so the coordinator finds it again. */
  const restartAgent = async (id: string) => {
    const since = Date.now();
    await fleet.restartAgent(id);
    // Back in the fleet (after its fencing), and the coordinator has heard from the new process (not
    // READY only because the deadline has not passed yet), before anything is asked of it.
    await until(
      () => c.agents.getAgent({ name: `agents/${id}` }),
      (a) =>
        a.state === AgentState.READY &&
        !!a.host?.agentStartTime &&
        timestampMs(a.host.agentStartTime) >= since,
      60_000,
      `agents/${id} READY again, heard from after its restart`,
    );
  };
  /** Deletes what an earlier (failed) test left, so one failure does not cascade. */
  const deleteAllEnvs = async () => {
    for (const e of (await c.envs.listEnvironments({ pageSize: 100 })).environments)
      await succeeded(c, c.envs.deleteEnvironment({ name: e.name, force: true }));
  };
  const placedVms = async (id: string) =>
    (await c.agents.getAgent({ name: `agents/${id}` })).allocated?.vms ?? 0;

  beforeAll(async () => {
    fleet = await startFleet({
      agents: 3,
      node: { id: "acme", policy: { maxVms: 8, maxMemoryBytes: 2048n * MIB } },
    });
    c = fleet.c;
  }, 120_000);
  afterAll(() => fleet?.stop());

  /** A member running the test guest, placed on `agent`. */
  const placed = async (id: string, agent: string) =>
    ({ ...(await guestMember(id, "")), placement: { agent: `agents/${agent}` } }) as MessageInitShape<
      typeof MemberSchema
    >;
  const oneMemberEnv = async (env: string, agent: string) =>
    succeeded(
      c,
      c.envs.createEnvironment({
        environmentId: env,
        environment: {
          node: "nodes/acme",
          members: [await placed("app", agent)],
        },
        start: true,
      }),
    );

  /**
   * Exactly one copy of `env`'s member runs, on `on`, and the environment says so; `other` is left with
   * no VM and no QEMU (the collector may take a moment for what a dead agent kept); the fleet charges
   * `on` only.
   */
  const expectOneCopy = async (env: string, on: string, other: string) => {
    // A member whose agent missed its heartbeat deadline meanwhile is LOST until the agent is back.
    const e = await until(
      () => c.envs.getEnvironment({ name: `environments/${env}` }),
      (x) => x.members.every((m) => m.state !== MemberState.LOST),
      60_000,
      `environments/${env} members not LOST`,
    );
    expect(e.members.map((m) => [m.agent, m.state])).toEqual([[`agents/${on}`, MemberState.RUNNING]]);
    const here = await vmsOn(agentOf(on));
    expect(here.map((v) => [v.name, v.state])).toEqual([[`vms/${env}-app`, VmState.RUNNING]]);
    expect(await qemusUnder(agentOf(on).dir)).toHaveLength(1);
    await until(
      async () => ({ vms: await vmsOn(agentOf(other)), qemus: await qemusUnder(agentOf(other).dir) }),
      (x) => x.vms.length === 0 && x.qemus.length === 0,
      60_000,
      `agents/${other} empty`,
    );
    expect([await placedVms(on), await placedVms(other)]).toEqual([1, 0]);
  };

  /** The operation's outcome names the agent that runs the member: the destination iff it SUCCEEDED. */
  const outcome = (op: Operation, from: string, to: string) => {
    expect(
      [OperationState.SUCCEEDED, OperationState.FAILED],
      `${op.name}: ${OperationState[op.state]} ${op.error?.message}`,
    ).toContain(op.state);
    return op.state === OperationState.SUCCEEDED ? to : from;
  };

  const pointOf = (step: string, phase: string) => {
    const i = points.findIndex((p) => p.step === step && p.phase === phase);
    if (i < 0) throw new Error(`no crash point ${step} ${phase} in ${JSON.stringify(points)}`);
    return i + 1;
  };

  it("converges after a coordinator crash at every crash point of environment.migrate: one copy, where the operation says", async () => {
    const t0 = Date.now();
    // One clean run with debug logs counts (and names) the points of a one-member migration.
    await stop();
    await start({}, ["--log-level", "debug"]);
    await oneMemberEnv("hop", "a1");
    const clean = await succeeded(
      c,
      c.envs.migrateEnvironment({ name: "environments/hop", agent: "agents/a2" }),
    );
    points = fleet.coord
      .log()
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { msg?: string; op?: string; step?: string; phase?: string })
      .filter((j) => j.msg === "crash point" && j.op === clean.name)
      .map((j) => ({ step: j.step ?? "", phase: j.phase ?? "" }));
    expect(points.length).toBeGreaterThanOrEqual(18);
    await expectOneCopy("hop", "a2", "a1");

    // The member hops between a1 and a2, the coordinator dying at the n-th point of each hop.
    let at = "a2";
    const outcomes: string[] = [];
    for (let n = 1; n <= points.length; n++) {
      const to = at === "a1" ? "a2" : "a1";
      const rid = `hop-${n}`;
      const done = await fleet.crashAt(n, rid, (x) =>
        x.envs.migrateEnvironment({ name: "environments/hop", agent: `agents/${to}`, requestId: rid }),
      );
      const now = outcome(done, at, to);
      outcomes.push(`${n}:${OperationState[done.state].toLowerCase()}`);
      await expectOneCopy("hop", now, at === now ? to : at);
      at = now;
    }
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/hop", force: true }));
    process.stdout.write(
      `coordinator crash points covered: ${points.length} of environment.migrate (${points
        .map((p) => `${p.step}/${p.phase}`)
        .join(" ")}); outcomes ${outcomes.join(" ")}; ${((Date.now() - t0) / 1000).toFixed(0)} s\n`,
    );
  }, 400_000);

  it("destination agent killed during prepare: the source runs on, FAILED, the destination cleaned when it returns", async () => {
    await deleteAllEnvs();
    await oneMemberEnv("prep", "a1");
    // The coordinator dies once prepare ran on a3 (its incoming VMM exists) but before it recorded it;
    // a3 and its VMMs die too; the restarted coordinator finds a3 gone.
    const done = await fleet.crashAt(
      pointOf("prepare.app", "step-ran"),
      "prep-1",
      (x) =>
        x.envs.migrateEnvironment({ name: "environments/prep", agent: "agents/a3", requestId: "prep-1" }),
      async () => {
        expect(await qemusUnder(agentOf("a3").dir)).toHaveLength(1);
        await agentOf("a3").kill();
        await killProcessesUnder(agentOf("a3").dir);
      },
    );
    expect(done.state).toBe(OperationState.FAILED);
    process.stderr.write(`destination killed during prepare: ${done.error?.message}\n`);
    await restartAgent("a3");
    await expectOneCopy("prep", "a1", "a3");
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/prep", force: true }));
  }, 240_000);

  it("destination agent killed during finish, before it started the guest: the source runs on (resumed), FAILED", async () => {
    await deleteAllEnvs();
    await oneMemberEnv("fin", "a1");
    // The coordinator dies as finish starts; a3 dies with its incoming VMM before finish reaches it.
    const done = await fleet.crashAt(
      pointOf("finish.app", "step-started"),
      "fin-1",
      (x) => x.envs.migrateEnvironment({ name: "environments/fin", agent: "agents/a3", requestId: "fin-1" }),
      async () => {
        await agentOf("a3").kill();
        await killProcessesUnder(agentOf("a3").dir);
      },
    );
    expect(done.state).toBe(OperationState.FAILED);
    process.stderr.write(`destination killed during finish (before the start): ${done.error?.message}\n`);
    await restartAgent("a3");
    await expectOneCopy("fin", "a1", "a3");
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/fin", force: true }));
  }, 240_000);

  it("destination agent killed during finish, after it started the guest: forward only, SUCCEEDED, the source gone", async () => {
    await deleteAllEnvs();
    await oneMemberEnv("fin2", "a1");
    // Finish ran on a3 (the guest started there) and the coordinator died before recording it; then a3
    // dies with its VMM. The migration must not go back (the destination ran the guest): the member is
    // a3's, the paused source is removed, and a3's death is failure detection's business.
    const done = await fleet.crashAt(
      pointOf("finish.app", "step-ran"),
      "fin2-1",
      (x) =>
        x.envs.migrateEnvironment({ name: "environments/fin2", agent: "agents/a3", requestId: "fin2-1" }),
      async () => {
        expect(await qemusUnder(agentOf("a1").dir)).toHaveLength(1);
        await agentOf("a3").kill();
        await killProcessesUnder(agentOf("a3").dir);
      },
    );
    expect(done.state, done.error?.message).toBe(OperationState.SUCCEEDED);
    const e = await c.envs.getEnvironment({ name: "environments/fin2" });
    expect(e.members.map((m) => m.agent)).toEqual(["agents/a3"]);
    // Never two copies: nothing is left on the source.
    expect(await vmsOn(agentOf("a1"))).toEqual([]);
    expect(await qemusUnder(agentOf("a1").dir)).toEqual([]);
    expect([await placedVms("a1"), await placedVms("a3")]).toEqual([0, 1]);
    await restartAgent("a3");
    expect(await qemusUnder(agentOf("a1").dir)).toEqual([]);
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/fin2", force: true }));
    await until(
      async () => ({ vms: await vmsOn(agentOf("a3")), qemus: await qemusUnder(agentOf("a3").dir) }),
      (x) => x.vms.length === 0 && x.qemus.length === 0,
      60_000,
      "agents/a3 empty",
    );
    // a3 takes work again once fenced.
    try {
      await until(
        () => c.agents.getAgent({ name: "agents/a3" }),
        (a) => a.state === AgentState.READY,
        30_000,
        "agents/a3 READY after fencing",
      );
    } catch (err) {
      const lines = fleet.coord
        .log()
        .split("\n")
        .filter((l) => /fenc|agent is|a3/.test(l));
      process.stderr.write(`${lines.slice(-40).join("\n")}\n`);
      throw err;
    }
  }, 240_000);

  /** Starts a migration of `env`'s member to `to` and waits until its perform step runs. */
  const performing = async (env: string, to: string, settings: { bps: bigint; timeoutMs?: number }) => {
    const op = await c.envs.migrateEnvironment({
      name: `environments/${env}`,
      agent: `agents/${to}`,
      settings: {
        maxBandwidthBytesPerSecond: settings.bps,
        ...(settings.timeoutMs
          ? { timeout: { seconds: BigInt(Math.floor(settings.timeoutMs / 1000)), nanos: 0 } }
          : {}),
      },
    });
    const cur = await until(
      () => c.ops.getOperation({ name: op.name }),
      (o) =>
        o.steps.some((s) => s.id === "perform.app" && s.state === StepState.RUNNING) ||
        FINAL.includes(o.state),
      120_000,
      "the perform step to start",
    );
    expect(cur.state, cur.error?.message).toBe(OperationState.RUNNING);
    return op;
  };

  it("source agent killed during perform (its QEMU runs on), restarted: one copy, where the operation says", async () => {
    await deleteAllEnvs();
    await oneMemberEnv("src", "a1");
    const op = await performing("src", "a2", { bps: 4n * MIB });
    // As a partition would look from the coordinator: the agent is gone, its VMM is not.
    await agentOf("a1").kill();
    expect(await qemusUnder(agentOf("a1").dir)).toHaveLength(1);
    await restartAgent("a1");
    const done = await finalOp(c, op);
    const on = outcome(done, "a1", "a2");
    process.stderr.write(
      `source agent killed during perform: ${OperationState[done.state]} ${done.error?.message ?? ""}\n`,
    );
    await expectOneCopy("src", on, on === "a1" ? "a2" : "a1");
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/src", force: true }));
  }, 240_000);

  it("the network between the agents cut (destination VMM frozen): the migration times out, FAILED, the source runs on", async () => {
    await deleteAllEnvs();
    await oneMemberEnv("cut", "a1");
    const op = await performing("cut", "a2", { bps: 256n * 1024n, timeoutMs: 5000 });
    const incoming = await qemusUnder(agentOf("a2").dir);
    expect(incoming).toHaveLength(1);
    const pid = incoming[0] as number;
    // SIGSTOP: the connection stays open but nothing is read from it any more.
    process.kill(pid, "SIGSTOP");
    try {
      await until(
        () => c.ops.getOperation({ name: op.name }),
        (o) => !o.steps.some((s) => s.id === "perform.app" && s.state === StepState.RUNNING),
        120_000,
        "the perform step to end",
      );
    } finally {
      process.kill(pid, "SIGCONT");
    }
    const done = await finalOp(c, op);
    expect(done.state).toBe(OperationState.FAILED);
    process.stderr.write(`network cut during perform: ${done.error?.message}\n`);
    await expectOneCopy("cut", "a1", "a2");
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/cut", force: true }));
  }, 240_000);

  it("drains an agent with four VMs: it ends empty, every VM running elsewhere", async () => {
    await deleteAllEnvs();
    for (const env of ["d1", "d2"])
      await succeeded(
        c,
        c.envs.createEnvironment({
          environmentId: env,
          environment: {
            node: "nodes/acme",
            members: [await placed("x", "a1"), await placed("y", "a1")],
          },
          start: true,
        }),
      );
    expect(await vmsOn(agentOf("a1"))).toHaveLength(4);
    const t0 = Date.now();
    const done = await finalOp(c, await c.agents.drainAgent({ name: "agents/a1", reason: "maintenance" }));
    expect(done.state, done.error?.message).toBe(OperationState.SUCCEEDED);
    const seconds = (Date.now() - t0) / 1000;
    expect(done.children).toHaveLength(2);
    const a1 = await c.agents.getAgent({ name: "agents/a1" });
    expect(a1.state).toBe(AgentState.CORDONED);
    expect(a1.allocated?.vms ?? 0).toBe(0);
    expect(await vmsOn(agentOf("a1"))).toEqual([]);
    expect(await qemusUnder(agentOf("a1").dir)).toEqual([]);
    let elsewhere = 0;
    for (const env of ["d1", "d2"]) {
      const e = await c.envs.getEnvironment({ name: `environments/${env}` });
      for (const m of e.members) {
        expect(m.agent).not.toBe("agents/a1");
        expect(m.state).toBe(MemberState.RUNNING);
        expect((await agentClients(agentOf(m.agent)).vms.getVm({ name: m.vm })).state).toBe(VmState.RUNNING);
        elsewhere += 1;
      }
    }
    expect(elsewhere).toBe(4);
    expect((await placedVms("a2")) + (await placedVms("a3"))).toBe(4);
    process.stderr.write(`drain of 4 running TCG guests: ${seconds.toFixed(1)} s\n`);
    await c.agents.uncordonAgent({ name: "agents/a1" });
    for (const env of ["d1", "d2"])
      await succeeded(c, c.envs.deleteEnvironment({ name: `environments/${env}`, force: true }));
  }, 240_000);
});
