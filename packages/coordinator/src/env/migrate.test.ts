import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { VmMigrationPhase, VmMigrationProgressSchema, VmState } from "@vmenv/api/agent/v1";
import { MemberSchema } from "@vmenv/api/coordinator/v1";
import pino from "pino";
import { describe, expect, it } from "vitest";
import {
  addUsage,
  type StoredUsage,
  subUsage,
  type Usage,
  usageFromStore,
  usageToStore,
} from "../domain/usage.js";
import { DRAIN_KIND, type DrainInput, drainKind, membersOn } from "../fleet/drain.js";
import type { AgentView } from "../fleet/fleet.js";
import { OperationEngine } from "../ops/engine.js";
import { keys } from "../store/keys.js";
import { memoryStore } from "../store/memory.js";
import type { JsonValue, Txn } from "../store/store.js";
import { memberFromPb } from "./convert.js";
import {
  MIGRATE_KIND,
  type MigrateInput,
  migrateKind,
  migrationPercent,
  packMigrationProgress,
} from "./migrate.js";
import type { EnvRecord, MemberRecord } from "./model.js";
import { type CreateInput, type EnvDeps, environmentKinds } from "./ops.js";
import { MigratingFakeAgent as FakeAgent } from "./testing/fake-agent.js";
import { acmeTree } from "./testing/tree.js";

const MIB = 1024n * 1024n;

const capacity = { vcpus: 8, memoryBytes: 4096n * MIB, gpus: 0, gpuMemoryBytes: 0n };

async function setup() {
  const store = memoryStore();
  const clock = { now: () => Date.now() };
  const logger = pino({ level: "silent" });
  const tree = await acmeTree(store, clock);
  const agents = new Map(["a1", "a2", "a3"].map((id) => [id, new FakeAgent(id)]));
  const allocs = new Map<string, Usage>();
  const cordoned = new Set<string>();
  const draining: Array<[string, string | undefined]> = [];
  const fleet: EnvDeps["fleet"] = {
    views: () =>
      [...agents.keys()].map(
        (id) =>
          ({
            id,
            state: cordoned.has(id) ? "cordoned" : "ready",
            labels: {},
            capacity,
            allocated: allocs.get(id) ?? usageFromStore(undefined),
            networks: [],
          }) as unknown as AgentView,
      ),
    clients: (id) => (agents.get(id) as FakeAgent).clients(),
    async charge(tx: Txn, id: string, d: Usage) {
      const next = addUsage(usageFromStore(await tx.get<StoredUsage>(keys.alloc(id))), d);
      tx.put(keys.alloc(id), usageToStore(next));
      tx.afterCommit(() => allocs.set(id, next));
    },
    async release(tx: Txn, id: string, d: Usage) {
      const next = subUsage(usageFromStore(await tx.get<StoredUsage>(keys.alloc(id))), d);
      tx.put(keys.alloc(id), usageToStore(next));
      tx.afterCommit(() => allocs.set(id, next));
    },
  };
  const deps: EnvDeps = { store, tree, fleet, clock, logger, reservationTtlMs: 60_000 };
  const engine = new OperationEngine({ store, clock, logger, retry: { attempts: 0 } });
  for (const k of environmentKinds(deps)) engine.register(k);
  engine.register(migrateKind(deps));
  engine.register(
    drainKind({
      store,
      engine,
      fleet: {
        async setDraining(id, op) {
          draining.push([id, op]);
          cordoned.add(id);
        },
      },
    }),
  );
  const run = async (kind: string, input: JsonValue, target = "environments/shop") => {
    const op = await engine.start(kind, target, input);
    return engine.wait(op.id, 10_000);
  };
  const env = async (id = "shop") => (await store.get<EnvRecord>(keys.env(id))) as EnvRecord;
  const vmsOn = (a: string) => [...(agents.get(a) as FakeAgent).vms.keys()].sort();
  const alloc = (a: string) => (allocs.get(a) ?? usageFromStore(undefined)).vms;
  const usage = async () => usageFromStore(await store.get<StoredUsage>(keys.usage("acme")));
  const migrate = (over: Partial<MigrateInput> = {}) =>
    run(MIGRATE_KIND, { env: "shop", members: [], agent: "", from: "", settings: null, ...over });
  const createEnv = async (id: string, members: MemberRecord[]) => {
    const input: CreateInput = {
      env: id,
      node: "acme",
      description: "",
      labels: {},
      members,
      start: true,
      fingerprint: id,
    };
    const op = await run("environment.create", input, `environments/${id}`);
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
  };
  return { store, engine, agents, run, env, vmsOn, alloc, usage, migrate, createEnv, draining, cordoned };
}

function member(id: string, opts: { volume?: boolean; agent?: string } = {}): MemberRecord {
  return memberFromPb(
    create(MemberSchema, {
      id,
      role: "",
      spec: {
        vcpus: 1,
        memoryBytes: 128n * MIB,
        disks: opts.volume ? [{ id: "d", volume: "volumes/data" }] : [],
        boot: { method: { case: "directKernel", value: { kernelPath: "/k" } } },
      },
      volumes: opts.volume ? [{ id: "data", sizeBytes: 64n * MIB }] : [],
      ...(opts.agent ? { placement: { agent: `agents/${opts.agent}` } } : {}),
    }),
  );
}

const fake = (t: Awaited<ReturnType<typeof setup>>, id: string) => t.agents.get(id) as FakeAgent;

describe("environment.migrate over fake agents", () => {
  it("moves every running member to the given agent: one running copy each, usage and placement follow", async () => {
    const t = await setup();
    await t.createEnv("shop", [
      member("web-1", { agent: "a1" }),
      member("db-1", { volume: true, agent: "a1" }),
    ]);
    expect(t.vmsOn("a1")).toEqual(["vms/shop-db-1", "vms/shop-web-1"]);
    const before = await t.usage();

    const op = await t.migrate({ agent: "a2" });
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(op.steps.map((s) => s.id)).toEqual([
      "select",
      ...["claim", "prepare", "perform", "finish", "confirm"].map((s) => `${s}.web-1`),
      ...["claim", "volumes", "prepare", "perform", "finish", "confirm"].map((s) => `${s}.db-1`),
    ]);
    const e = await t.env();
    expect(e.members.map((m) => [m.id, m.agent, m.state])).toEqual([
      ["web-1", "a2", "RUNNING"],
      ["db-1", "a2", "RUNNING"],
    ]);
    expect(e.transition).toBe("");
    expect(t.vmsOn("a1")).toEqual([]);
    expect([...fake(t, "a1").volumes.keys()]).toEqual([]);
    expect(fake(t, "a2").running().sort()).toEqual(["vms/shop-db-1", "vms/shop-web-1"]);
    expect([...fake(t, "a2").volumes.keys()]).toEqual(["volumes/shop-db-1-data"]);
    expect([t.alloc("a1"), t.alloc("a2")]).toEqual([0, 2]);
    expect(await t.usage()).toEqual(before);
    expect(await t.store.list(keys.claimPrefix)).toEqual([]);
    // The API's metadata: the last member's VmMigrationProgress.
    expect(packMigrationProgress(op)?.typeUrl).toContain("VmMigrationProgress");
  });

  it("rolls a failed perform back: the source runs on, the destination is clean, the claim released", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("db-1", { volume: true, agent: "a1" })]);
    fake(t, "a1").fail.add("migrate");
    const op = await t.migrate({ agent: "a2" });
    expect(op.state).toBe("failed");
    expect(op.error?.message).toContain("the destination closed the stream");
    expect(op.error?.metadata.agent).toBe("agents/a1");
    expect(fake(t, "a1").running()).toEqual(["vms/shop-db-1"]);
    expect(t.vmsOn("a2")).toEqual([]);
    expect([...fake(t, "a2").volumes.keys()]).toEqual([]);
    expect([t.alloc("a1"), t.alloc("a2")]).toEqual([1, 0]);
    expect(await t.store.list(keys.claimPrefix)).toEqual([]);
    const e = await t.env();
    expect(e.members.map((m) => [m.id, m.agent, m.state])).toEqual([["db-1", "a1", "RUNNING"]]);
    expect(e.transition).toBe("");
  });

  it("rolls a failed finish back to the source (the destination never ran)", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("web-1", { agent: "a1" })]);
    fake(t, "a2").fail.add("finish");
    const op = await t.migrate({ agent: "a2" });
    expect(op.state).toBe("failed");
    expect(op.error?.message).toContain("VMM died");
    expect(fake(t, "a1").running()).toEqual(["vms/shop-web-1"]);
    expect(t.vmsOn("a2")).toEqual([]);
    expect((await t.env()).members[0]?.agent).toBe("a1");
  });

  it("never rolls back after finish: a source it cannot clean is left to the collector", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("web-1", { agent: "a1" })]);
    fake(t, "a1").fail.add("deleteVm");
    const op = await t.migrate({ agent: "a2" });
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(fake(t, "a2").running()).toEqual(["vms/shop-web-1"]);
    // The source copy stays paused (not running) until the collector removes it.
    expect(fake(t, "a1").running()).toEqual([]);
    expect((await t.env()).members[0]).toMatchObject({ agent: "a2", state: "RUNNING" });
    expect([t.alloc("a1"), t.alloc("a2")]).toEqual([0, 1]);
  });

  it("goes forward when finish failed after the destination started: one running copy, on the destination", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("web-1", { agent: "a1" })]);
    fake(t, "a2").fail.add("finish-after-start");
    const op = await t.migrate({ agent: "a2" });
    expect(op.state).toBe("failed");
    expect(fake(t, "a2").running()).toEqual(["vms/shop-web-1"]);
    expect(t.vmsOn("a1")).toEqual([]);
    expect((await t.env()).members[0]).toMatchObject({ agent: "a2", state: "RUNNING" });
    expect([t.alloc("a1"), t.alloc("a2")]).toEqual([0, 1]);
    expect(await t.store.list(keys.claimPrefix)).toEqual([]);
  });

  it("goes on when the source agent restarted after the send completed, and rolls back when it had rolled the send back", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("web-1", { agent: "a1" })]);
    // Restarted after the migration completed: the source is still MIGRATING (sent, unconfirmed).
    fake(t, "a1").fail.add("forget-ops");
    const op = await t.migrate({ agent: "a2" });
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(fake(t, "a2").running()).toEqual(["vms/shop-web-1"]);
    expect(t.vmsOn("a1")).toEqual([]);
    expect((await t.env()).members[0]).toMatchObject({ agent: "a2", state: "RUNNING" });

    // Restarted and rolled the send back (the source runs again): the migration fails, nothing moves.
    fake(t, "a2").fail.add("forget-ops");
    const migrateVm = fake(t, "a2").clients().vms.migrateVm;
    fake(t, "a2").clients = ((orig) => () => {
      const c = orig();
      (c.vms as { migrateVm: unknown }).migrateVm = async (r: { name: string }) => {
        const started = await migrateVm(r as never);
        (fake(t, "a2").vms.get(r.name) as { state: VmState }).state = VmState.RUNNING;
        return started;
      };
      return c;
    })(fake(t, "a2").clients.bind(fake(t, "a2")));
    const back = await t.migrate({ agent: "a3" });
    expect(back.state).toBe("failed");
    expect(back.error).toMatchObject({ reason: "MIGRATION_ROLLED_BACK", metadata: { agent: "agents/a2" } });
    expect(fake(t, "a2").running()).toEqual(["vms/shop-web-1"]);
    expect(t.vmsOn("a3")).toEqual([]);
    expect((await t.env()).members[0]).toMatchObject({ agent: "a2", state: "RUNNING" });
  });

  it("keeps members already moved when a later one fails", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("web-1", { agent: "a1" }), member("web-2", { agent: "a1" })]);
    let calls = 0;
    const a2 = fake(t, "a2");
    const clients = a2.clients.bind(a2);
    a2.clients = () => {
      const c = clients();
      const prepare = c.vms.prepareVmMigration.bind(c.vms);
      (c.vms as { prepareVmMigration: unknown }).prepareVmMigration = async (r: never) => {
        if (++calls > 1) throw new ConnectError("out of ports", Code.ResourceExhausted);
        return prepare(r);
      };
      return c;
    };
    const op = await t.migrate({ agent: "a2" });
    expect(op.state).toBe("failed");
    expect(op.error?.message).toContain("out of ports");
    const e = await t.env();
    expect(e.members.map((m) => [m.id, m.agent, m.state])).toEqual([
      ["web-1", "a2", "RUNNING"],
      ["web-2", "a1", "RUNNING"],
    ]);
    expect(fake(t, "a1").running()).toEqual(["vms/shop-web-2"]);
    expect(a2.running()).toEqual(["vms/shop-web-1"]);
    expect([t.alloc("a1"), t.alloc("a2")]).toEqual([1, 1]);
  });

  it("chooses a destination by placement, never the source; refuses a member that is not running, paused or stopped", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("web-1", { agent: "a1" })]);
    const op = await t.migrate();
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect((await t.env()).members[0]?.agent).not.toBe("a1");

    await t.store.transact(async (tx) => {
      const e = (await tx.get<EnvRecord>(keys.env("shop"))) as EnvRecord;
      (e.members[0] as MemberRecord).state = "LOST";
      tx.put(keys.env("shop"), e);
    });
    const refused = await t.migrate({ agent: "a3" });
    expect(refused.state).toBe("failed");
    expect(refused.error).toMatchObject({
      code: "failed-precondition",
      reason: "MEMBER_NOT_MOVABLE",
      metadata: { member: "web-1", state: "LOST" },
    });
    expect(t.vmsOn("a3")).toEqual([]);
  });

  it("moves stopped and paused members cold, with their volumes, and each ends as it was", async () => {
    const t = await setup();
    await t.createEnv("shop", [
      member("db-1", { volume: true, agent: "a1" }),
      member("web-1", { agent: "a1" }),
    ]);
    expect((await t.run("environment.stop", { env: "shop", members: ["db-1"] })).state).toBe("succeeded");
    expect((await t.run("environment.suspend", { env: "shop", members: ["web-1"] })).state).toBe("succeeded");
    const op = await t.migrate({ agent: "a2" });
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    // Only the stopped member needed its VMM started (paused) on the source to be sent.
    expect(op.steps.map((s) => s.id).filter((id) => id.startsWith("wake."))).toEqual(["wake.db-1"]);
    const a2 = fake(t, "a2");
    expect([...a2.vms.values()].map((v) => [v.name, VmState[v.state]]).sort()).toEqual([
      ["vms/shop-db-1", "STOPPED"],
      ["vms/shop-web-1", "PAUSED"],
    ]);
    expect([...a2.volumes.keys()]).toHaveLength(1);
    expect(t.vmsOn("a1")).toEqual([]);
    expect([...fake(t, "a1").volumes.keys()]).toEqual([]);
    const e = await t.env();
    expect(e.members.map((m) => [m.id, m.agent, m.state])).toEqual([
      ["db-1", "a2", "STOPPED"],
      ["web-1", "a2", "PAUSED"],
    ]);
    expect([t.alloc("a1"), t.alloc("a2")]).toEqual([0, 2]);
  });

  it("rolls a failed cold migration back: the stopped member is stopped again on its source, a paused one stays paused", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("db-1", { agent: "a1" }), member("web-1", { agent: "a1" })]);
    expect((await t.run("environment.stop", { env: "shop", members: ["db-1"] })).state).toBe("succeeded");
    expect((await t.run("environment.suspend", { env: "shop", members: ["web-1"] })).state).toBe("succeeded");
    fake(t, "a2").fail.add("finish");
    const op = await t.migrate({ agent: "a2", members: ["db-1"] });
    expect(op.state).toBe("failed");
    const op2 = await t.migrate({ agent: "a2", members: ["web-1"] });
    expect(op2.state).toBe("failed");
    expect([...fake(t, "a1").vms.values()].map((v) => [v.name, VmState[v.state]]).sort()).toEqual([
      ["vms/shop-db-1", "STOPPED"],
      ["vms/shop-web-1", "PAUSED"],
    ]);
    expect(t.vmsOn("a2")).toEqual([]);
    const e = await t.env();
    expect(e.members.map((m) => [m.id, m.agent, m.state])).toEqual([
      ["db-1", "a1", "STOPPED"],
      ["web-1", "a1", "PAUSED"],
    ]);
    expect([t.alloc("a1"), t.alloc("a2")]).toEqual([2, 0]);
  });

  it("reports progress in percent from the VMM's figures", () => {
    const p = create(VmMigrationProgressSchema, {
      phase: VmMigrationPhase.PRE_COPY,
      memoryTransferredBytes: 64n * MIB,
      memoryTotalBytes: 128n * MIB,
    });
    expect(migrationPercent(p)).toBe(50);
    expect(migrationPercent({ ...p, phase: VmMigrationPhase.COMPLETED })).toBe(100);
  });
});

describe("agent.drain over fake agents", () => {
  it("moves every member of every environment off the agent, two environments at a time", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("web-1", { agent: "a1" }), member("db-1", { agent: "a2" })]);
    await t.createEnv("blog", [member("app", { agent: "a1" })]);
    await t.createEnv("wiki", [member("app", { agent: "a1" })]);
    const input: DrainInput = { agent: "a1", reason: "disk swap", settings: null, timeoutMs: 0 };
    const op = await t.run(DRAIN_KIND, input, "agents/a1");
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(t.vmsOn("a1")).toEqual([]);
    expect((await membersOn(t.store, "a1")).size).toBe(0);
    expect(op.children).toHaveLength(3);
    for (const env of ["shop", "blog", "wiki"])
      for (const m of (await t.env(env)).members) {
        expect(m.state).toBe("RUNNING");
        expect(fake(t, m.agent).running()).toContain(`vms/${env}-${m.id}`);
      }
    // db-1 was on a2 and stays there.
    expect((await t.env()).members.find((m) => m.id === "db-1")?.agent).toBe("a2");
    expect(t.draining[0]).toEqual(["a1", op.id]);
    expect(t.draining.at(-1)).toEqual(["a1", undefined]);
    expect(t.alloc("a1")).toBe(0);
  });

  it("fails naming the members that could not move; what moved stays moved", async () => {
    const t = await setup();
    await t.createEnv("shop", [member("web-1", { agent: "a1" })]);
    await t.createEnv("blog", [member("app", { agent: "a1" })]);
    // A member in a state nothing moves (its VM failed to start, say): it stays where it is.
    await t.store.transact(async (tx) => {
      const e = (await tx.get<EnvRecord>(keys.env("blog"))) as EnvRecord;
      (e.members[0] as MemberRecord).state = "FAILED";
      tx.put(keys.env("blog"), e);
    });
    const input: DrainInput = { agent: "a1", reason: "", settings: null, timeoutMs: 0 };
    const op = await t.run(DRAIN_KIND, input, "agents/a1");
    expect(op.state).toBe("failed");
    expect(op.error).toMatchObject({ reason: "DRAIN_INCOMPLETE", metadata: { members: "blog/app" } });
    expect((await t.env()).members[0]?.agent).not.toBe("a1");
    expect(t.vmsOn("a1")).toEqual(["vms/blog-app"]);
    expect(t.draining.at(-1)).toEqual(["a1", undefined]);
  });
});
